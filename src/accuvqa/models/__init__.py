"""VQA models."""

from accuvqa.models.mcan import MCAN, build_model, make_mask

__all__ = ["MCAN", "build_model", "make_mask"]
