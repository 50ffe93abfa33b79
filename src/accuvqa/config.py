"""Typed run configuration: MCAN's keys and defaults, YAML loading, overrides, validation."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from accuvqa.errors import ConfigError
# importing the registry imports accuvqa.models, which registers every model
from accuvqa.models.registry import config_key, list_models, model_key_types, model_spec, require_positive

PRESETS = importlib.resources.files("accuvqa") / "configs"  # YAML presets shipped in the package
GROUPS = ("data", "model", "training", "run")  # the sections of --help and docs/config.md, in this order
_data, _model, _training, _run = (functools.partial(config_key, group=group) for group in GROUPS)


@dataclass(frozen=True)
class Config:
    """Every key of a run. Names and defaults follow mcan-vqa's `base_cfgs.py` and `small.yml`; each key's
    group and meaning are on its field, the one source of `--help` and docs/config.md (config_doc.py)."""

    # --- run identity and reproducibility
    SEED: int = _run(0, "seed of every random generator, the batch order included")
    VERSION: Optional[str] = _run(None, "the run's name (null: the seed); plot takes several, comma-separated")
    DEVICE: str = _run("auto", "auto, cpu, cuda or cuda:N")
    GPU: str = _run("0", "accepted for mcan-vqa's configs and ignored: pick devices with DEVICE and "
                         "CUDA_VISIBLE_DEVICES (docs/hardware.md)")
    NUM_THREADS: int = _run(0, "CPU threads for torch (0: torch's default)")
    DIST_TIMEOUT: int = _run(600, "seconds a collective waits for the other processes before the job fails")
    VERBOSE: bool = _run(True, "print progress and log lines")

    # --- data
    DATASET: str = _data("vqa", "vqa: VQA v2 layout at DATASET_PATH / FEATURE_PATH; easyvqa: the bundled easy-VQA; "
                                "folder: your images and questions at DATASET_PATH (metadata.jsonl or Parquet, "
                                "docs/own-data.md), features extracted into FEATURE_PATH; gqa, clevr: openvqa's "
                                "GQA and CLEVR layouts (docs/datasets.md); clevr_shapes: the bundled CLEVR-style reasoning "
                                "set, generated at DATASET_PATH")
    DATASET_PATH: str = _data("datasets/vqa", "folder of the VQA v2 question and annotation JSON files")
    FEATURE_PATH: str = _data("datasets/coco_extract",
                              "folder with train2014/, val2014/, test2015/ of region features (.npz)")
    STORE_PATH: str = _data("", "writable folder for the prepared stores (question arrays, packed features) when "
                                "the data folders are read-only ('': beside the data)")
    CKPTS_PATH: str = _run("ckpts", "folder of the checkpoints (ckpt_<VERSION>/epoch<N>.pkl)")
    RESULT_PATH: str = _run("results", "folder of each run's metrics, config.yml, log.txt, events and predictions")
    TRAIN_SPLIT: str = _data("train", "splits to train on, joined by +: train, train+val, train+val+vg")
    VAL_FRACTION: float = _data(0.1, "easyvqa: share of the train images held out as the val split")
    GQA_GRID: bool = _data(False, "gqa: join each image's grid features (gqa-grid, 49 cells) to its region features as "
                                  "more regions, as openvqa's MCAN does (USE_AUX_FEAT)")
    SCENE_IMAGES: int = _data(3000, "clevr_shapes: train images of the reasoning set (val and test: a sixth each)")
    PRELOAD: bool = _data(False, "read the packed features into memory instead of memory-mapping them")
    NUM_WORKERS: int = _data(0, "loader worker processes (0: load in the training process)")
    PIN_MEM: bool = _data(False, "with NUM_WORKERS > 0: pin batches in page-locked memory (faster copies to a GPU)")
    BUCKET_WINDOW: int = _data(16, "> 1: batches of similar region counts within windows of this many batches, "
                                   "order still fixed by SEED (0 or 1: off, batches as drawn)")
    USE_GLOVE: bool = _data(False, "start word embeddings from pre-trained vectors (WORD_VECTORS)")
    WORD_VECTORS: str = _data("en_vectors_web_lg", "USE_GLOVE: a spaCy package or folder, or a GloVe text file")
    WORD_EMBED_SIZE: int = _data(300, "size of a word embedding (300 with GloVe)")
    MAX_TOKEN: int = _data(14, "question tokens kept; longer questions are cut")
    IMG_FEAT_PAD_SIZE: int = _data(100, "image regions kept per image; fewer are padded, more are cut")
    IMG_FEAT_SIZE: int = _data(2048, "size of one region feature (2048 for bottom-up attention)")

    # --- model: which registered model; its own keys (MCAN: LAYER, HIDDEN_SIZE, ...) live in
    # the dataclass the model declares, reached as attributes of the config all the same
    MODEL_USE: str = _model("mcan", "which registered model to build; its own keys follow")

    # --- optimisation
    BATCH_SIZE: int = _training(64, "effective batch: samples per optimizer update, over all processes")
    GRAD_ACCU_STEPS: Union[int, str] = _training(
        1, "micro-batches per update on each process, or auto (double on out-of-memory)")
    LOSS_REDUCTION: str = _training("sum", "sum (MCAN: BCE summed over the batch) or mean (over every item)")
    LOSS_FUNC: str = _training("bce", "bce (sigmoid per answer) or kld (KL divergence of the log-softmax from the "
                                      "soft scores normalised to sum 1)")
    AMP: str = _training("off", "mixed precision: off, bf16 (autocast) or fp16 (autocast + gradient scaling, CUDA)")
    MAX_EPOCH: int = _training(13, "epochs to train")
    LR_BASE: float = _training(0.0001, "learning rate after the warm-up (WARMUP_EPOCH epochs ramp up to it)")
    WARMUP_EPOCH: int = _training(3, "warm-up length as openvqa counts it: LR_BASE x 1/(W+1), 2/(W+1), 3/(W+1), "
                                     "each for (W+1)/4 epochs' updates (3: MCAN's 1/4, 2/4, 3/4 over three epochs; "
                                     "0: none)")
    LR_DECAY_R: float = _training(0.2, "factor applied to the learning rate at each LR_DECAY_LIST epoch")
    LR_DECAY_LIST: list[int] = _training(doc="0-based epochs from which the learning rate is decayed",
                                         factory=lambda: [10, 12])
    GRAD_NORM_CLIP: float = _training(-1.0, "clip the accumulated gradient to this L2 norm (<= 0: off)")
    OPT: str = _training("Adam", "optimizer: any torch.optim class name")
    OPT_PARAMS: dict[str, Any] = _training(doc="keyword arguments of OPT, e.g. {weight_decay: 0.01}", factory=dict)
    OPT_BETAS: tuple[float, float] = _training(
        (0.9, 0.98), "betas of optimizers that take them, unless OPT_PARAMS sets them")
    OPT_EPS: float = _training(1e-9, "eps of optimizers that take it, unless OPT_PARAMS sets it")

    # --- evaluation and checkpoints
    EVAL_EVERY_EPOCH: bool = _training(True, "evaluate on the val split after every epoch (when it has answers)")
    TEST_SAVE_PRED: bool = _run(False, "val: also write every answer with its score (result_val_pred.json)")
    RESUME: bool = _run(False, "continue the run named by VERSION from its newest checkpoint")
    CKPT_EVERY_STEPS: int = _run(0, "also save a resumable checkpoint every N updates (0: at epoch ends only)")
    KEEP_CKPTS: int = _run(2, "mid-epoch checkpoints kept, newest first (0: all); epoch ones are always kept")
    MAX_BAD_UPDATES: int = _training(5, "stop after this many updates in a row with a non-finite loss or gradient")
    LOG_EVERY_STEPS: int = _run(50, "updates (and evaluation batches) between progress lines off a terminal "
                                    "and between TensorBoard training points")
    CKPT_VERSION: Optional[str] = _run(None, "run whose checkpoint val/test/predict/resume load (null: VERSION)")
    CKPT_EPOCH: int = _run(0, "epoch of the checkpoint to load (0: the newest)")
    CKPT_PATH: Optional[str] = _run(None, "load this checkpoint file instead (an original mcan-vqa one too)")
    TOKEN_DICT_PATH: Optional[str] = _data(None, "pin the token dictionary to this JSON file ({token: id})")
    ANSWER_DICT_PATH: Optional[str] = _data(
        None, "pin the answer dictionary to this file (mcan-vqa's answer_dict.json)")
    ANSWER_MIN_COUNT: int = _data(8, "an answer enters the answer dictionary when it is some training question's "
                                     "most common answer more than this many times (mcan-vqa: 8)")

    # --- feature extraction (accuvqa extract; prepare of DATASET folder): grid features of a ResNet-style backbone
    BACKBONE: str = _data("resnet50", "resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, "
                                      "resnext101_64x4d, wide_resnet50_2 or wide_resnet101_2 (torchvision's)")
    BACKBONE_LAYER: str = _data("c5", "c5: the last stage's map, 2048-d regions (grid-feats-vqa); c4: layer3, "
                                      "1024-d regions (openvqa's CLEVR features)")
    BACKBONE_WEIGHTS: str = _data("", "the backbone's weights: a state-dict file (torchvision's load strictly) or "
                                      "a torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2 (downloaded "
                                      "where the machine is online); '': none, an error")
    EXTRACT_RESIZE: str = _data("square:448", "square:N resizes each image to N x N (N/32 squared grid cells: 196 at "
                                              "448); short:N resizes its shorter side to N, keeping its shape")
    EXTRACT_BATCH_SIZE: int = _data(8, "images per forward pass of the backbone")

    # the model's own keys: an instance of the dataclass its registration declares
    model_keys: Any = field(default=None, repr=False)
    # checkpoint keys a config file set and that were ignored ({key: (value, file)}): see load_config
    ignored: Mapping[str, tuple[Any, str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_keys is None:
            object.__setattr__(self, "model_keys", model_spec(self.MODEL_USE).keys())

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
        return dataclasses.replace(_build(values, {k: "replace()" for k in changes}), ignored=self.ignored)


# the DATASET values: each names a reader under data/ (data/layout.py picks it)
DATASETS = ("vqa", "easyvqa", "folder", "clevr", "gqa", "clevr_shapes")
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ("model_keys", "ignored"))
# the keys that name a checkpoint of another run or epoch: counted only from the command line (or a Python
# caller's overrides), never from a config file, so a preset (mcan-vqa's small.yml says CKPT_VERSION small,
# CKPT_EPOCH 13) never makes a command load a checkpoint the user did not name
CHECKPOINT_KEYS = ("CKPT_VERSION", "CKPT_EPOCH", "CKPT_PATH")
_TYPES: dict[str, Any] = {k: v for k, v in typing.get_type_hints(Config).items() if k in KEYS}


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
    if tp is bool and isinstance(value, bool):
        return value
    if isinstance(value, bool):  # never an int, float or str
        raise TypeError
    if tp is int and isinstance(value, int):
        return value
    if tp is float and isinstance(value, (int, float, str)):  # YAML 1.1 reads "1e-4" as a string
        return float(value)
    if tp is str and isinstance(value, (str, int, float)):
        return str(value)
    raise TypeError


def _check_key(key: str, source: str, model: str) -> None:
    types = _key_types(model)
    if key in types:
        return
    owners = [name for name in list_models() if key in model_key_types(name)]
    if owners:
        raise ConfigError(f"{key} (in {source}) is a key of model {', '.join(owners)}, not of "
                          f"MODEL_USE {model}; set MODEL_USE or remove the key")
    close = difflib.get_close_matches(key.upper(), list(types), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


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
        raise ConfigError(f"GRAD_ACCU_STEPS must be at least 1, got {cfg.GRAD_ACCU_STEPS}{where('GRAD_ACCU_STEPS')}")
    check_batch_split(cfg, world_size=1)
    _validate_optimizer(cfg, where)
    if cfg.LOSS_REDUCTION not in ("sum", "mean"):
        raise ConfigError(f"LOSS_REDUCTION must be 'sum' or 'mean', got {cfg.LOSS_REDUCTION!r}")
    if cfg.LOSS_FUNC not in ("bce", "kld"):
        raise ConfigError(f"LOSS_FUNC must be 'bce' or 'kld', got {cfg.LOSS_FUNC!r}{where('LOSS_FUNC')}")
    if cfg.AMP not in ("off", "bf16", "fp16"):
        raise ConfigError(f"AMP must be off, bf16 or fp16, got {cfg.AMP!r}{where('AMP')}")
    if cfg.DATASET not in DATASETS:
        close = difflib.get_close_matches(str(cfg.DATASET), DATASETS, n=1)
        raise ConfigError(f"DATASET must be one of {', '.join(DATASETS)}, got {cfg.DATASET!r}{where('DATASET')}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not 0.0 < cfg.VAL_FRACTION < 1.0:
        raise ConfigError(f"VAL_FRACTION must be in (0, 1), got {cfg.VAL_FRACTION}")
    for key in ("NUM_WORKERS", "CKPT_EVERY_STEPS", "KEEP_CKPTS", "BUCKET_WINDOW", "ANSWER_MIN_COUNT", "SCENE_IMAGES",
                "WARMUP_EPOCH"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}{where(key)}")
    require_positive(cfg, ["MAX_BAD_UPDATES", "LOG_EVERY_STEPS", "DIST_TIMEOUT"], where)


def _validate_optimizer(cfg: Config, where: Callable[[str], str]) -> None:
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
    model_spec(model)  # ConfigError listing the registered models
    return model


def _build(values: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    model = _model_of(values, sources)
    for key in values:
        source = sources.get(key, "defaults")
        _check_key(key, "command-line overrides" if source.startswith("--") else source, model)
    types = _key_types(model)
    converted = {k: _coerce(k, v, sources.get(k, "defaults"), types) for k, v in values.items()}
    own = model_key_types(model)
    model_keys = model_spec(model).keys(**{k: v for k, v in converted.items() if k in own})
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
    read as YAML scalars and converted to the key's type. CHECKPOINT_KEYS in the file are ignored
    (kept in `cfg.ignored`, for the line that says which checkpoint a command loads and why).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    ignored: dict[str, tuple[Any, str]] = {}
    if path is not None:
        path = resolve_config_file(path)
        for key, value in read_yaml(path).items():
            if str(key) in CHECKPOINT_KEYS:
                if value not in (None, 0):
                    ignored[str(key)] = (value, str(path))
                continue
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
    return dataclasses.replace(_build(values, sources), ignored=ignored)


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
