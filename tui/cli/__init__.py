"""Headless subcommands of `frankenlab`; each module defines `register(subparsers)`."""
