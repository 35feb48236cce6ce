"""Modal screens: help, a path prompt, the session compare view."""
