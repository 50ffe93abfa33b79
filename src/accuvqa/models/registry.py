"""The one door to every model: `MODEL_USE` names a registered builder.

A model module registers itself with `@register_model(name, keys=..., ...)` (timm's
`register_model` / `create_model` pattern), declaring:
- `keys`: a frozen dataclass of its own config keys, each a `config_key(default, meaning)` (its one
  description, shown by `--help` and docs/config.md), checked by its `validate` with the
  `require_*` helpers below;
- `inputs`: the batch keys its `forward` takes, in order;
- `token_param` / `answer_param`: the parameters whose first dimension is the token / answer
  dictionary size, so loading weights names the right dictionary for any model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from accuvqa.errors import ConfigError


def config_key(default: Any = dataclasses.MISSING, doc: str = "", *, group: Optional[str] = None,
               factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config key's dataclass field: its default (or default `factory`) and its one-line meaning `doc`."""
    metadata = {"doc": doc, **({"group": group} if group else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require_positive(obj: Any, keys: Sequence[str], where: Callable[[str], str]) -> None:
    """ConfigError naming the first of `keys` whose value on `obj` is not positive."""
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {getattr(obj, key)}{where(key)}")


def require_rate(obj: Any, keys: Sequence[str], where: Callable[[str], str]) -> None:
    """ConfigError naming the first of `keys` (dropout rates) whose value on `obj` is not in [0, 1)."""
    for key in keys:
        if not 0.0 <= getattr(obj, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(obj, key)}{where(key)}")


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of accuvqa knows about one model."""

    name: str
    builder: Callable[..., Any]  # (cfg, token_size, answer_size, pretrained_emb) -> nn.Module
    keys: type  # frozen dataclass of the model's config keys
    inputs: tuple[str, ...] = ("img_feat", "ques_ix")
    token_param: str = "embedding.weight"
    answer_param: str = "proj.weight"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, keys: type, inputs: tuple[str, ...] = ("img_feat", "ques_ix"),
                   token_param: str = "embedding.weight", answer_param: str = "proj.weight"
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `builder(cfg, token_size, answer_size, pretrained_emb=None)` as `name`."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, keys, tuple(inputs), token_param, answer_param)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registered model `name`; a ConfigError listing the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"MODEL_USE {name!r} is not a registered model; registered: "
                          f"{', '.join(list_models())}") from None


def model_key_types(name: str) -> dict[str, Any]:
    """The config keys the registered model `name` declares, with their types."""
    keys = model_spec(name).keys
    hints = typing.get_type_hints(keys)
    return {f.name: hints[f.name] for f in dataclasses.fields(keys)}


def build_model(cfg: Any, token_size: int, answer_size: int, pretrained_emb: Any = None) -> Any:
    """The model named by cfg.MODEL_USE (default mcan), built for the given dictionary sizes."""
    spec = model_spec(getattr(cfg, "MODEL_USE", "mcan"))
    return spec.builder(cfg, token_size, answer_size, pretrained_emb)


def model_inputs(cfg: Any, batch: Mapping[str, Any]) -> tuple[Any, ...]:
    """The batch entries the configured model's forward takes, in order."""
    return tuple(batch[key] for key in model_spec(getattr(cfg, "MODEL_USE", "mcan")).inputs)
