"""Every config key with its group, type, default and one-line meaning: `--help` and docs/config.md.

Types and defaults come from the dataclasses (`Config`, each model's keys); meanings from the
tables below, which a new key or a new model must fill (a test names any key left out).
Regenerate the page with `python -m accuvqa.config_doc > docs/config.md` (or `make docs`).
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any, NamedTuple

from accuvqa.config import KEYS, Config, _type_name, model_key_types

GROUPS = ("data", "model", "training", "run")

# common key -> (group, meaning)
COMMON: dict[str, tuple[str, str]] = {
    # data
    "DATASET": ("data", "vqa: VQA v2 layout at DATASET_PATH / FEATURE_PATH; easyvqa: the bundled easy-VQA"),
    "DATASET_PATH": ("data", "folder of the VQA v2 question and annotation JSON files"),
    "FEATURE_PATH": ("data", "folder with train2014/, val2014/, test2015/ of region features (.npz)"),
    "TRAIN_SPLIT": ("data", "splits to train on, joined by +: train, train+val, train+val+vg"),
    "VAL_FRACTION": ("data", "easyvqa: share of the train images held out as the val split"),
    "PRELOAD": ("data", "read every feature into memory before training"),
    "BUCKET_WINDOW": ("data", "> 1: batches of similar region counts within windows of this many batches, "
                                  "order still fixed by SEED (0 or 1: off, batches as drawn)"),
    "NUM_WORKERS": ("data", "loader worker processes (0: load in the training process)"),
    "PIN_MEM": ("data", "pin batches in page-locked memory (faster copies to a GPU)"),
    "USE_GLOVE": ("data", "start word embeddings from pre-trained vectors (WORD_VECTORS)"),
    "WORD_VECTORS": ("data", "USE_GLOVE: a spaCy package or folder, or a GloVe text file"),
    "WORD_EMBED_SIZE": ("data", "size of a word embedding (300 with GloVe)"),
    "MAX_TOKEN": ("data", "question tokens kept; longer questions are cut"),
    "IMG_FEAT_PAD_SIZE": ("data", "image regions kept per image; fewer are padded, more are cut"),
    "IMG_FEAT_SIZE": ("data", "size of one region feature (2048 for bottom-up attention)"),
    "TOKEN_DICT_PATH": ("data", "pin the token dictionary to this JSON file ({token: id})"),
    "ANSWER_DICT_PATH": ("data", "pin the answer dictionary to this file (mcan-vqa's answer_dict.json)"),
    # model
    "MODEL_USE": ("model", "which registered model to build; its own keys follow"),
    # training
    "BATCH_SIZE": ("training", "effective batch: samples per optimizer update, over all processes"),
    "GRAD_ACCU_STEPS": ("training", "micro-batches per update on each process, or auto (double on out-of-memory)"),
    "LOSS_REDUCTION": ("training", "sum (MCAN: BCE summed over the batch) or mean (over every item)"),
    "AMP": ("training", "mixed precision: off, bf16 (autocast) or fp16 (autocast + gradient scaling, CUDA)"),
    "MAX_EPOCH": ("training", "epochs to train"),
    "LR_BASE": ("training", "learning rate after the warm-up (the first three epochs ramp up to it)"),
    "LR_DECAY_R": ("training", "factor applied to the learning rate at each LR_DECAY_LIST epoch"),
    "LR_DECAY_LIST": ("training", "0-based epochs from which the learning rate is decayed"),
    "GRAD_NORM_CLIP": ("training", "clip the accumulated gradient to this L2 norm (<= 0: off)"),
    "OPT": ("training", "optimizer: any torch.optim class name"),
    "OPT_PARAMS": ("training", "keyword arguments of OPT, e.g. {weight_decay: 0.01}"),
    "OPT_BETAS": ("training", "betas of optimizers that take them, unless OPT_PARAMS sets them"),
    "OPT_EPS": ("training", "eps of optimizers that take it, unless OPT_PARAMS sets it"),
    "LOSS_FUNC": ("training", "bce (sigmoid per answer) or kld (KL divergence of the log-softmax from the "
                              "soft scores normalised to sum 1)"),
    "MAX_BAD_UPDATES": ("training", "stop after this many updates in a row with a non-finite loss or gradient"),
    "EVAL_EVERY_EPOCH": ("training", "evaluate on the val split after every epoch (when it has answers)"),
    # run
    "SEED": ("run", "seed of every random generator, the batch order included"),
    "VERSION": ("run", "the run's name (null: the seed); plot takes several, comma-separated"),
    "DEVICE": ("run", "auto, cpu, cuda or cuda:N"),
    "GPU": ("run", "mcan-vqa's GPU list (CUDA_VISIBLE_DEVICES)"),
    "NUM_THREADS": ("run", "CPU threads for torch (0: torch's default)"),
    "VERBOSE": ("run", "print progress and log lines"),
    "DIST_TIMEOUT": ("run", "seconds a collective waits for the other processes before the job fails"),
    "LOG_EVERY_STEPS": ("run", "updates (and evaluation batches) between progress lines off a terminal "
                               "and between TensorBoard training points"),
    "CKPTS_PATH": ("run", "folder of the checkpoints (ckpt_<VERSION>/epoch<N>.pkl)"),
    "RESULT_PATH": ("run", "folder of each run's metrics, config.yml, log.txt, events and predictions"),
    "TEST_SAVE_PRED": ("run", "val: also write every answer with its score (result_val_pred.json)"),
    "RESUME": ("run", "continue the run named by VERSION from its newest checkpoint"),
    "CKPT_EVERY_STEPS": ("run", "also save a resumable checkpoint every N updates (0: at epoch ends only)"),
    "KEEP_CKPTS": ("run", "mid-epoch checkpoints kept, newest first (0: all); epoch ones are always kept"),
    "CKPT_VERSION": ("run", "run whose checkpoint val/test/predict/resume load (null: VERSION)"),
    "CKPT_EPOCH": ("run", "epoch of the checkpoint to load (0: the newest)"),
    "CKPT_PATH": ("run", "load this checkpoint file instead (an original mcan-vqa one too)"),
}

_MFB = {
    "HIGH_ORDER": "False: MFB, one factorised bilinear block; True: MFH, two blocks in cascade",
    "HIDDEN_SIZE": "width of the question and image attention MLPs",
    "MFB_K": "factor k of the factorised bilinear pooling (sum-pooling window)",
    "MFB_O": "output size o of each bilinear block",
    "LSTM_OUT_SIZE": "hidden size of the question LSTM",
    "DROPOUT_R": "dropout rate",
    "I_GLIMPSES": "glimpses of the image attention",
    "Q_GLIMPSES": "glimpses of the question attention",
}

# model name -> {key: meaning}; every registered model's keys
MODELS: dict[str, dict[str, str]] = {
    "butd": {
        "HIDDEN_SIZE": "hidden size of the question LSTM and the attention",
        "DROPOUT_R": "dropout rate of the attention",
        "CLASSIFER_DROPOUT_R": "dropout rate of the classifier (openvqa's spelling)",
        "FLAT_OUT_SIZE": "size of the joint question-image vector the classifier reads",
    },
    "ban": {
        "GLIMPSE": "bilinear attention glimpses (maps over region-word pairs)",
        "HIDDEN_SIZE": "hidden size of the question GRU and the joint space",
        "K_TIMES": "rank multiplier of the low-rank bilinear attention",
        "BA_HIDDEN_SIZE": "width of the bilinear attention (null: K_TIMES x HIDDEN_SIZE)",
        "DROPOUT_R": "dropout rate",
        "CLASSIFER_DROPOUT_R": "dropout rate of the classifier (openvqa's spelling)",
        "FLAT_OUT_SIZE": "hidden size of the classifier",
    },
    "mfb": _MFB,
    "mfh": _MFB,
    "mmnasnet": {
        "ARCH": "the searched cells: {enc: [SA|FFN ...], dec: [SA|GA|RSA|FFN ...]}",
        "HIDDEN_SIZE": "width of every cell",
        "REL_HBASE": "head size of the relation embedding of RSA cells",
        "REL_SIZE": "size of each region pair's relative-position features",
        "MULTI_HEAD": "attention heads (must divide HIDDEN_SIZE)",
        "DROPOUT_R": "dropout rate",
        "FLAT_MLP_SIZE": "hidden size of the attentional reduction's MLP",
        "FLAT_GLIMPSES": "glimpses of the attentional reduction",
        "FLAT_OUT_SIZE": "size of the fused question-image vector",
    },
    "mcan": {
        "LAYER": "encoder (SA) and decoder (SGA) layers, each",
        "HIDDEN_SIZE": "width of every attention layer",
        "MULTI_HEAD": "attention heads (must divide HIDDEN_SIZE)",
        "DROPOUT_R": "dropout rate",
        "FLAT_MLP_SIZE": "hidden size of the attentional reduction's MLP",
        "FLAT_GLIMPSES": "glimpses of the attentional reduction",
        "FLAT_OUT_SIZE": "size of the fused question-image vector",
        "FF_SIZE": "width of the feed-forward layers (null: 4 x HIDDEN_SIZE)",
    },
}


class KeyDoc(NamedTuple):
    """One row of the table."""

    key: str
    group: str  # data, model, training, run, or "model (<name>)" for a model's own keys
    type: str
    default: str
    meaning: str


def _default_text(value: Any) -> str:
    """A default as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_default_text(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def undescribed_keys() -> list[str]:
    """Keys (common, or of a registered model) with no meaning in COMMON / MODELS."""
    from accuvqa.models import list_models

    missing = [k for k in KEYS if k not in COMMON]
    for model in list_models():
        missing += [f"{k} (model {model})" for k in model_key_types(model) if k not in MODELS.get(model, {})]
    return missing


def key_docs() -> list[KeyDoc]:
    """Every config key, grouped in GROUPS order, each registered model's keys after MODEL_USE."""
    from accuvqa.models import list_models, model_spec

    hints = typing.get_type_hints(Config)
    rows = {group: [] for group in GROUPS}
    for f in dataclasses.fields(Config):
        if f.name in KEYS:
            group, meaning = COMMON.get(f.name, ("run", "(no description)"))
            rows[group].append(KeyDoc(f.name, group, _type_name(hints[f.name]), _default_text(_field_default(f)),
                                      meaning))
    for model in list_models():
        keys = model_spec(model).keys
        types = model_key_types(model)
        for f in dataclasses.fields(keys):
            rows["model"].append(KeyDoc(f.name, f"model ({model})", _type_name(types[f.name]),
                                        _default_text(_field_default(f)),
                                        MODELS.get(model, {}).get(f.name, "(no description)")))
    return [row for group in GROUPS for row in rows[group]]


def help_text(width: int = 120) -> str:
    """The plain-text table shown by `accuvqa <command> --help`."""
    docs = key_docs()
    key_w = max(len(d.key) for d in docs) + 2
    type_w = max(len(d.type) for d in docs) + 2
    default_w = min(max(len(d.default) for d in docs), 24) + 2  # a longer default pushes its meaning right
    indent = 2 + key_w + type_w + default_w
    lines = ["config keys: --KEY VALUE on the command line, KEY: value in --config FILE.yml", ""]
    group = None
    for d in docs:
        if d.group != group:
            if group is not None:
                lines.append("")
            group = d.group
            lines.append(f"{group}:")
        meaning = textwrap.wrap(d.meaning, max(width - indent, 30)) or [""]
        lines.append(f"  {d.key:<{key_w}}{d.type:<{type_w}}{d.default:<{default_w - 2}}  {meaning[0]}")
        lines += [" " * indent + more for more in meaning[1:]]
    return "\n".join(lines)


def markdown() -> str:
    """docs/config.md: one table per group."""
    out = ["# Config keys", "",
           "Every key of a run, as `--KEY VALUE` on the command line or `KEY: value` in a YAML file given",
           "with `--config`. A run writes its resolved keys to `<RESULT_PATH>/<VERSION>/config.yml`, which",
           "loads back with `--config`. This page is generated: `python -m accuvqa.config_doc > docs/config.md`",
           "(`make docs`); `accuvqa <command> --help` prints the same table."]
    group = None
    for d in key_docs():
        if d.group != group:
            group = d.group
            out += ["", f"## {group}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out.append(f"| `{d.key}` | {d.type} | `{d.default}` | {d.meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def meaning(key: str, model: str) -> str | None:
    """The one-line meaning of a common key or of a key of `model` (None when undescribed)."""
    if key in COMMON:
        return COMMON[key][1]
    return MODELS.get(model, {}).get(key)


if __name__ == "__main__":
    print(markdown(), end="")
