"""Reading TOML on every Python the project supports: the standard library's `tomllib` (3.11 and
newer), else `tomli` (Python 3.10; a dependency there only), the same parser under its earlier name.

Every reader of TOML in the project (recipes, sweeps, targets, the recipe list, the docs generator,
the tests) imports `loads`, `load` and `TOMLDecodeError` from here, never `tomllib` itself. Writing
TOML is `tomli_w`'s, on every version. This module imports nothing of the project (and no torch).
"""

from __future__ import annotations

try:
    import tomllib as _toml
except ModuleNotFoundError:  # Python 3.10: tomllib is tomli, adopted into the standard library in 3.11
    import tomli as _toml

loads = _toml.loads
load = _toml.load
TOMLDecodeError = _toml.TOMLDecodeError
PARSER = _toml.__name__  # "tomllib" or "tomli": which one was taken (the tests check the fallback)

__all__ = ["PARSER", "TOMLDecodeError", "load", "loads"]
