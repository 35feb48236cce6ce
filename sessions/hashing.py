"""Moved to `pipeline/weight_hashes.py` (the pipeline's distillation teacher names its weights by the
same digest, and the pipeline may not import sessions); these names stay importable from here."""

from frankenlab.pipeline.weight_hashes import WEIGHT_SUFFIXES, file_sha256, weight_files, weights_digest

__all__ = ["WEIGHT_SUFFIXES", "file_sha256", "weight_files", "weights_digest"]
