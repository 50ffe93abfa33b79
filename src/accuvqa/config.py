"""Typed run configuration: MCAN's keys and defaults, YAML loading, overrides, validation."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from accuvqa.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Every key of a run. Names and defaults follow mcan-vqa's `base_cfgs.py` and `small.yml`."""

    # --- run identity and reproducibility
    SEED: int = 0
    VERSION: Optional[str] = None  # None: str(SEED), as mcan-vqa
    DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
    GPU: str = "0"
    NUM_THREADS: int = 0  # CPU threads for torch; 0 keeps torch's default
    VERBOSE: bool = True

    # --- data
    DATASET: str = "vqa"  # vqa | easyvqa
    DATASET_PATH: str = "datasets/vqa"
    FEATURE_PATH: str = "datasets/coco_extract"
    CKPTS_PATH: str = "ckpts"
    RESULT_PATH: str = "results"
    TRAIN_SPLIT: str = "train"
    VAL_FRACTION: float = 0.1  # easyvqa only: share of train images held out for validation
    PRELOAD: bool = False
    NUM_WORKERS: int = 0
    PIN_MEM: bool = False
    USE_GLOVE: bool = False
    WORD_VECTORS: str = "en_vectors_web_lg"  # USE_GLOVE: spaCy package/folder, or a GloVe text file
    WORD_EMBED_SIZE: int = 300
    MAX_TOKEN: int = 14
    IMG_FEAT_PAD_SIZE: int = 100
    IMG_FEAT_SIZE: int = 2048

    # --- model (MCAN small)
    LAYER: int = 6
    HIDDEN_SIZE: int = 512
    MULTI_HEAD: int = 8
    DROPOUT_R: float = 0.1
    FLAT_MLP_SIZE: int = 512
    FLAT_GLIMPSES: int = 1
    FLAT_OUT_SIZE: int = 1024
    FF_SIZE: Optional[int] = None  # None: 4 x HIDDEN_SIZE (resolved when the config is built)

    # --- optimisation
    BATCH_SIZE: int = 64
    GRAD_ACCU_STEPS: Union[int, str] = 1  # or "auto": double on out-of-memory
    LOSS_REDUCTION: str = "sum"  # sum (MCAN) | mean
    AMP: str = "off"  # off | bf16 (autocast) | fp16 (autocast + GradScaler; CUDA)
    MAX_EPOCH: int = 13
    LR_BASE: float = 0.0001
    LR_DECAY_R: float = 0.2
    LR_DECAY_LIST: list[int] = field(default_factory=lambda: [10, 12])
    GRAD_NORM_CLIP: float = -1.0  # <= 0: off
    OPT_BETAS: tuple[float, float] = (0.9, 0.98)
    OPT_EPS: float = 1e-9

    # --- evaluation and checkpoints
    EVAL_EVERY_EPOCH: bool = True
    TEST_SAVE_PRED: bool = False
    RESUME: bool = False
    CKPT_VERSION: Optional[str] = None  # None: VERSION
    CKPT_EPOCH: int = 0
    CKPT_PATH: Optional[str] = None
    TOKEN_DICT_PATH: Optional[str] = None  # pin the token dictionary (JSON {token: id})
    ANSWER_DICT_PATH: Optional[str] = None  # pin the answer dictionary (mcan-vqa answer_dict.json)

    # --- derived values (never set, always computed)
    @property
    def run_version(self) -> str:
        """The run's name: VERSION, or the seed when VERSION is unset."""
        return self.VERSION if self.VERSION is not None else str(self.SEED)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of every key (for checkpoints and logs)."""
        out = dataclasses.asdict(self)
        out["OPT_BETAS"] = list(self.OPT_BETAS)
        return out

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some keys changed."""
        values = {**self.to_dict(), **changes}
        if "HIDDEN_SIZE" in changes and "FF_SIZE" not in changes:
            values["FF_SIZE"] = None  # derived again from the new HIDDEN_SIZE
        return _build(values, {k: "replace()" for k in changes})


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
_TYPES: dict[str, Any] = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in typing.get_args(tp) else []))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return "pair of " + _type_name(typing.get_args(tp)[0])
    return tp.__name__


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert `value` to the declared type of `key`, or raise a ConfigError saying why."""
    tp = _TYPES[key]
    try:
        return _coerce_to(tp, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) from {source}"
        ) from None


def _coerce_to(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        for inner in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _coerce_to(inner, value)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (inner,) = typing.get_args(tp)
        return [_coerce_to(inner, v) for v in value]
    if origin is tuple:
        inner = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            raise TypeError
        return tuple(_coerce_to(t, v) for t, v in zip(inner, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def _check_key(key: str, source: str) -> None:
    if key not in _TYPES:
        close = difflib.get_close_matches(key.upper(), KEYS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _validate(cfg: Config, sources: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f" (from {sources[key]})" if key in sources else ""

    positive = ["BATCH_SIZE", "MAX_EPOCH", "LAYER", "HIDDEN_SIZE", "MULTI_HEAD", "FLAT_MLP_SIZE",
                "FLAT_GLIMPSES", "FLAT_OUT_SIZE", "WORD_EMBED_SIZE", "MAX_TOKEN",
                "IMG_FEAT_PAD_SIZE", "IMG_FEAT_SIZE"]
    for key in positive + (["FF_SIZE"] if cfg.FF_SIZE is not None else []):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {getattr(cfg, key)}{where(key)}")
    if cfg.LR_BASE <= 0:
        raise ConfigError(f"LR_BASE must be positive, got {cfg.LR_BASE}{where('LR_BASE')}")
    if cfg.HIDDEN_SIZE % cfg.MULTI_HEAD:
        raise ConfigError(
            f"HIDDEN_SIZE ({cfg.HIDDEN_SIZE}) must be divisible by MULTI_HEAD ({cfg.MULTI_HEAD})"
            f"{where('HIDDEN_SIZE') or where('MULTI_HEAD')}; e.g. HIDDEN_SIZE "
            f"{cfg.HIDDEN_SIZE // cfg.MULTI_HEAD * cfg.MULTI_HEAD or cfg.MULTI_HEAD}"
        )
    if isinstance(cfg.GRAD_ACCU_STEPS, str):
        if cfg.GRAD_ACCU_STEPS != "auto":
            raise ConfigError(f"GRAD_ACCU_STEPS must be a positive integer or 'auto', got "
                              f"{cfg.GRAD_ACCU_STEPS!r}{where('GRAD_ACCU_STEPS')}")
    elif cfg.GRAD_ACCU_STEPS < 1:
        raise ConfigError(
            f"GRAD_ACCU_STEPS must be at least 1, got {cfg.GRAD_ACCU_STEPS}{where('GRAD_ACCU_STEPS')}"
        )
    check_batch_split(cfg, world_size=1)
    if not 0.0 <= cfg.DROPOUT_R < 1.0:
        raise ConfigError(f"DROPOUT_R must be in [0, 1), got {cfg.DROPOUT_R}{where('DROPOUT_R')}")
    if cfg.LOSS_REDUCTION not in ("sum", "mean"):
        raise ConfigError(f"LOSS_REDUCTION must be 'sum' or 'mean', got {cfg.LOSS_REDUCTION!r}")
    if cfg.AMP not in ("off", "bf16", "fp16"):
        raise ConfigError(f"AMP must be off, bf16 or fp16, got {cfg.AMP!r}{where('AMP')}")
    if cfg.DATASET not in ("vqa", "easyvqa"):
        raise ConfigError(f"DATASET must be 'vqa' or 'easyvqa', got {cfg.DATASET!r}")
    if not 0.0 < cfg.VAL_FRACTION < 1.0:
        raise ConfigError(f"VAL_FRACTION must be in (0, 1), got {cfg.VAL_FRACTION}")
    if cfg.NUM_WORKERS < 0:
        raise ConfigError(f"NUM_WORKERS must be >= 0, got {cfg.NUM_WORKERS}")


def check_batch_split(cfg: Config, world_size: int) -> None:
    """Raise ConfigError unless BATCH_SIZE splits into world_size shares of >= GRAD_ACCU_STEPS."""
    if cfg.BATCH_SIZE % world_size:
        raise ConfigError(
            f"BATCH_SIZE ({cfg.BATCH_SIZE}) must be divisible by the number of processes "
            f"({world_size}): BATCH_SIZE is the effective batch over all processes"
        )
    per_process = cfg.BATCH_SIZE // world_size
    if cfg.GRAD_ACCU_STEPS != "auto" and cfg.GRAD_ACCU_STEPS > per_process:
        raise ConfigError(
            f"GRAD_ACCU_STEPS ({cfg.GRAD_ACCU_STEPS}) is larger than the per-process batch "
            f"({per_process} = BATCH_SIZE {cfg.BATCH_SIZE} / {world_size} processes): "
            f"every micro-batch needs at least one sample"
        )


def _build(values: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    converted = {k: _coerce(k, v, sources.get(k, "defaults")) for k, v in values.items()}
    if converted.get("FF_SIZE") is None:
        converted["FF_SIZE"] = 4 * converted.get("HIDDEN_SIZE", Config.HIDDEN_SIZE)
    cfg = Config(**converted)
    _validate(cfg, sources)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys; syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {path}{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of KEY: value, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides` (e.g. from the command line).

    Override values may be strings as typed on a command line ("4", "True", "[10, 12]"); they are
    read as YAML scalars and converted to the key's type.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        for key, value in read_yaml(path).items():
            _check_key(str(key), str(path))
            values[key] = value
            sources[key] = str(path)
    for key, value in (overrides or {}).items():
        _check_key(key, "command-line overrides")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                pass  # keep the raw string; the type check below reports a mismatch
        values[key] = value
        sources[key] = f"--{key}"
    return _build(values, sources)
