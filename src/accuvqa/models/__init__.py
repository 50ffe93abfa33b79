"""VQA models: a registry (`MODEL_USE` -> builder) and the registered models."""

from accuvqa.models import butd as _butd  # noqa: F401  (registers "butd")
from accuvqa.models import mcan as _mcan  # noqa: F401  (registers "mcan")
from accuvqa.models import ban as _ban  # noqa: F401  (registers "ban")
from accuvqa.models import mmnasnet as _mmnasnet  # noqa: F401  (registers "mmnasnet")
from accuvqa.models import mfb as _mfb  # noqa: F401  (registers "mfb", "mfh")
from accuvqa.models.mcan import MCAN, make_mask
from accuvqa.models.registry import build_model, list_models, model_inputs, model_spec, register_model

__all__ = ["MCAN", "build_model", "list_models", "make_mask", "model_inputs", "model_spec", "register_model"]
