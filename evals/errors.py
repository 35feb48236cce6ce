"""The errors a user acts on, in the lowest layer so that every layer raises and catches the same ones."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe or stage config that cannot run; the message says what to change."""
