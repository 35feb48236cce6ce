"""Plain-data configs for the pipeline: the machinery lives in `evals.config` (the lowest layer,
so that evaluation settings validate the same way); this module is the pipeline's name for it."""
from evals.config import (FieldInfo, RecipeError, config_fields, from_dict, option, require,  # noqa: F401
                          to_dict)
