"""Typed run configuration: MCAN's keys and defaults, YAML loading, overrides, validation."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

from accuvqa.errors import ConfigError

PRESETS = importlib.resources.files("accuvqa") / "configs"  # YAML presets shipped in the package


@dataclass(frozen=True)
class Config:
    """Every key of a run. Names and defaults follow mcan-vqa's `base_cfgs.py` and `small.yml`."""

    # --- run identity and reproducibility
    SEED: int = 0
    VERSION: Optional[str] = None  # None: str(SEED), as mcan-vqa
    DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
    GPU: str = "0"
    NUM_THREADS: int = 0  # CPU threads for torch; 0 keeps torch's default
    DIST_TIMEOUT: int = 600  # seconds a collective waits for the other processes before the job fails
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
    BUCKET_WINDOW: int = 16  # > 1: batches of similar region counts within windows of this many batches
    USE_GLOVE: bool = False
    WORD_VECTORS: str = "en_vectors_web_lg"  # USE_GLOVE: spaCy package/folder, or a GloVe text file
    WORD_EMBED_SIZE: int = 300
    MAX_TOKEN: int = 14
    IMG_FEAT_PAD_SIZE: int = 100
    IMG_FEAT_SIZE: int = 2048

    # --- model: which registered model; its own keys (MCAN: LAYER, HIDDEN_SIZE, ...) live in
    # the dataclass the model declares, reached as attributes of the config all the same
    MODEL_USE: str = "mcan"

    # --- optimisation
    BATCH_SIZE: int = 64
    GRAD_ACCU_STEPS: Union[int, str] = 1  # or "auto": double on out-of-memory
    LOSS_REDUCTION: str = "sum"  # sum (MCAN) | mean
    LOSS_FUNC: str = "bce"  # bce (MCAN) | kld: KL divergence of the log-softmax from the normalised soft scores
    AMP: str = "off"  # off | bf16 (autocast) | fp16 (autocast + GradScaler; CUDA)
    MAX_EPOCH: int = 13
    LR_BASE: float = 0.0001
    LR_DECAY_R: float = 0.2
    LR_DECAY_LIST: list[int] = field(default_factory=lambda: [10, 12])
    GRAD_NORM_CLIP: float = -1.0  # <= 0: off
    OPT: str = "Adam"  # any torch.optim class, e.g. Adamax
    OPT_PARAMS: dict[str, Any] = field(default_factory=dict)  # its keyword arguments, e.g. {weight_decay: 0}
    OPT_BETAS: tuple[float, float] = (0.9, 0.98)  # betas/eps of optimizers that take them, unless OPT_PARAMS says
    OPT_EPS: float = 1e-9

    # --- evaluation and checkpoints
    EVAL_EVERY_EPOCH: bool = True
    TEST_SAVE_PRED: bool = False
    RESUME: bool = False  # alone: continue the run named by VERSION from its newest checkpoint
    CKPT_EVERY_STEPS: int = 0  # also save a resumable checkpoint every N updates (0: at epoch ends only)
    KEEP_CKPTS: int = 2  # mid-epoch checkpoints kept, newest first (0: all); epoch checkpoints are never removed
    MAX_BAD_UPDATES: int = 5  # stop after this many updates in a row with a non-finite loss or gradient
    LOG_EVERY_STEPS: int = 50  # updates between progress lines (off a terminal) and TensorBoard training points
    CKPT_VERSION: Optional[str] = None  # None: VERSION
    CKPT_EPOCH: int = 0
    CKPT_PATH: Optional[str] = None
    TOKEN_DICT_PATH: Optional[str] = None  # pin the token dictionary (JSON {token: id})
    ANSWER_DICT_PATH: Optional[str] = None  # pin the answer dictionary (mcan-vqa answer_dict.json)

    # the model's own keys: an instance of the dataclass its registration declares
    model_keys: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_keys is None:
            object.__setattr__(self, "model_keys", _model_keys_class(self.MODEL_USE)())

    def __getattr__(self, name: str) -> Any:
        # reached only when `name` is not a common key: look among the model's own keys
        keys = self.__dict__.get("model_keys")
        if name.isupper() and keys is not None and hasattr(keys, name):
            return getattr(keys, name)
        raise AttributeError(f"config has no key {name!r} (MODEL_USE {self.__dict__.get('MODEL_USE')!r})")

    # --- derived values (never set, always computed)
    @property
    def run_version(self) -> str:
        """The run's name: VERSION, or the seed when VERSION is unset."""
        return self.VERSION if self.VERSION is not None else str(self.SEED)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of every key, the model's included (for checkpoints and logs)."""
        out = {key: copy.deepcopy(getattr(self, key)) for key in KEYS}
        out["OPT_BETAS"] = list(self.OPT_BETAS)
        out.update(dataclasses.asdict(self.model_keys))
        return out

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some keys changed."""
        values = {**self.to_dict(), **changes}
        if changes.get("MODEL_USE", self.MODEL_USE) != self.MODEL_USE:  # another model: its keys start afresh
            for key in model_key_types(self.MODEL_USE):
                if key not in changes:
                    values.pop(key, None)
        for key, source in getattr(self.model_keys, "DERIVED", {}).items():
            if source in changes and key not in changes:
                values[key] = None  # derived again from the new value
        return _build(values, {k: "replace()" for k in changes})


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "model_keys")
_TYPES: dict[str, Any] = {k: v for k, v in typing.get_type_hints(Config).items() if k in KEYS}


def _model_keys_class(model: str) -> type:
    from accuvqa.models import model_spec  # the registry fills when the models are imported

    return model_spec(model).keys


def model_key_types(model: str) -> dict[str, Any]:
    """The config keys a registered model declares, with their types."""
    keys = _model_keys_class(model)
    hints = typing.get_type_hints(keys)
    return {f.name: hints[f.name] for f in dataclasses.fields(keys)}


def _key_types(model: str) -> dict[str, Any]:
    return {**_TYPES, **model_key_types(model)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in typing.get_args(tp) else []))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if origin is tuple:
        return "pair of " + _type_name(typing.get_args(tp)[0])
    return tp.__name__


def _coerce(key: str, value: Any, source: str, types: Mapping[str, Any]) -> Any:
    """Convert `value` to the declared type of `key`, or raise a ConfigError saying why."""
    tp = types[key]
    if key == "AMP" and value is False:
        value = "off"  # YAML 1.1 reads an unquoted `off` as false
    try:
        return _coerce_to(tp, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) from {source}"
        ) from None


def _coerce_to(tp: Any, value: Any) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise TypeError
        _, inner = typing.get_args(tp)
        return {k: _coerce_to(inner, v) for k, v in value.items()}
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


def _check_key(key: str, source: str, model: str) -> None:
    types = _key_types(model)
    if key in types:
        return
    from accuvqa.models import list_models

    owners = [name for name in list_models() if key in model_key_types(name)]
    if owners:
        raise ConfigError(f"{key} (in {source}) is a key of model {', '.join(owners)}, not of "
                          f"MODEL_USE {model}; set MODEL_USE or remove the key")
    close = difflib.get_close_matches(key.upper(), list(types), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


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


def _validate(cfg: Config, sources: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f" (from {sources[key]})" if key in sources else ""

    require_positive(cfg, ["BATCH_SIZE", "MAX_EPOCH", "WORD_EMBED_SIZE", "MAX_TOKEN", "IMG_FEAT_PAD_SIZE",
                           "IMG_FEAT_SIZE"], where)
    if cfg.LR_BASE <= 0:
        raise ConfigError(f"LR_BASE must be positive, got {cfg.LR_BASE}{where('LR_BASE')}")
    cfg.model_keys.validate(where)
    if isinstance(cfg.GRAD_ACCU_STEPS, str):
        if cfg.GRAD_ACCU_STEPS != "auto":
            raise ConfigError(f"GRAD_ACCU_STEPS must be a positive integer or 'auto', got "
                              f"{cfg.GRAD_ACCU_STEPS!r}{where('GRAD_ACCU_STEPS')}")
    elif cfg.GRAD_ACCU_STEPS < 1:
        raise ConfigError(
            f"GRAD_ACCU_STEPS must be at least 1, got {cfg.GRAD_ACCU_STEPS}{where('GRAD_ACCU_STEPS')}"
        )
    check_batch_split(cfg, world_size=1)
    _validate_optimizer(cfg, where)
    if cfg.LOSS_REDUCTION not in ("sum", "mean"):
        raise ConfigError(f"LOSS_REDUCTION must be 'sum' or 'mean', got {cfg.LOSS_REDUCTION!r}")
    if cfg.LOSS_FUNC not in ("bce", "kld"):
        raise ConfigError(f"LOSS_FUNC must be 'bce' or 'kld', got {cfg.LOSS_FUNC!r}{where('LOSS_FUNC')}")
    if cfg.AMP not in ("off", "bf16", "fp16"):
        raise ConfigError(f"AMP must be off, bf16 or fp16, got {cfg.AMP!r}{where('AMP')}")
    if cfg.DATASET not in ("vqa", "easyvqa"):
        raise ConfigError(f"DATASET must be 'vqa' or 'easyvqa', got {cfg.DATASET!r}")
    if not 0.0 < cfg.VAL_FRACTION < 1.0:
        raise ConfigError(f"VAL_FRACTION must be in (0, 1), got {cfg.VAL_FRACTION}")
    for key in ("NUM_WORKERS", "CKPT_EVERY_STEPS", "KEEP_CKPTS", "BUCKET_WINDOW"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}{where(key)}")
    require_positive(cfg, ["MAX_BAD_UPDATES", "LOG_EVERY_STEPS", "DIST_TIMEOUT"], where)


def _validate_optimizer(cfg: Config, where: Callable[[str], str]) -> None:
    import inspect

    import torch.optim

    opt = getattr(torch.optim, cfg.OPT, None)
    if not (isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer)) or cfg.OPT == "Optimizer":
        names = sorted(n for n, o in vars(torch.optim).items()
                       if isinstance(o, type) and issubclass(o, torch.optim.Optimizer) and n != "Optimizer")
        raise ConfigError(f"OPT {cfg.OPT!r}{where('OPT')} is not a torch.optim optimizer; one of {', '.join(names)}")
    accepted = [p for p in inspect.signature(opt).parameters if p not in ("self", "params")]
    unknown = [k for k in cfg.OPT_PARAMS if k not in accepted]
    if unknown:
        raise ConfigError(f"OPT_PARAMS{where('OPT_PARAMS')}: {cfg.OPT} takes no {', '.join(unknown)}; "
                          f"it takes {', '.join(accepted)}")


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


def _model_of(values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """MODEL_USE of these values, checked to name a registered model."""
    model = _coerce("MODEL_USE", values.get("MODEL_USE", Config.MODEL_USE), sources.get("MODEL_USE", "defaults"),
                    _TYPES)
    _model_keys_class(model)  # ConfigError listing the registered models
    return model


def _build(values: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    model = _model_of(values, sources)
    for key in values:
        source = sources.get(key, "defaults")
        _check_key(key, "command-line overrides" if source.startswith("--") else source, model)
    types = _key_types(model)
    converted = {k: _coerce(k, v, sources.get(k, "defaults"), types) for k, v in values.items()}
    own = model_key_types(model)
    model_keys = _model_keys_class(model)(**{k: v for k, v in converted.items() if k in own})
    cfg = Config(**{k: v for k, v in converted.items() if k not in own}, model_keys=model_keys)
    _validate(cfg, sources)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys; syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {path}{at}: {problem}") from e
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
        path = resolve_config_file(path)
        for key, value in read_yaml(path).items():
            values[str(key)] = value
            sources[str(key)] = str(path)
    for key, value in (overrides or {}).items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                pass  # keep the raw string; the type check below reports a mismatch
        values[key] = value
        sources[key] = f"--{key}"
    return _build(values, sources)


def list_presets() -> list[str]:
    """Names of the config presets shipped inside the package (`--config NAME`, `--MODEL NAME`)."""
    return sorted(p.name[:-len(".yml")] for p in PRESETS.iterdir() if p.name.endswith(".yml"))


def preset_file(name: str) -> Path | None:
    """The packaged preset `name` (no .yml), else `configs/<name>.yml` in the current folder, else None."""
    for candidate in (PRESETS / f"{name}.yml", Path.cwd() / "configs" / f"{name}.yml"):
        if candidate.is_file():
            return Path(str(candidate))
    return None


def resolve_config_file(name_or_path: str | Path) -> Path:
    """A path that exists is itself; a bare name (no .yml) is a preset; anything else a ConfigError."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yml", ".yaml") or len(path.parts) > 1:
        return path  # read_yaml names it when it cannot be read
    found = preset_file(str(name_or_path))
    if found is None:
        raise ConfigError(f"no config preset {str(name_or_path)!r}: a file path or one of "
                          f"{', '.join(list_presets())}")
    return found
