"""The errors a user acts on, in the lowest layer so that every layer raises and catches the same ones."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe or stage config that cannot run; the message says what to change."""


class DataError(ValueError):
    """A data file, or a row in it, that cannot be used; the message names the file and line."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded (or placed on its device); the message says what to do."""
