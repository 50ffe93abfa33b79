"""Everything about checkpoints: what one holds, where it lives, atomic save, safe load, weights.

Files are mcan-vqa's: `<CKPTS_PATH>/ckpt_<VERSION>/epoch<N>.pkl`, a dict with `state_dict`,
`optimizer` and `lr_base`, plus ours (config, step, RNG state, vocabularies and their fingerprint).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from accuvqa.config import Config
from accuvqa.data.records import load_records
from accuvqa.data.vocab import Vocab, build_vocab
from accuvqa.errors import CheckpointError, ConfigError
from accuvqa.files import atomic_write
from accuvqa.models import build_model, model_spec
from accuvqa.runtime import unwrap

log = logging.getLogger(__name__)


def checkpoint_path(ckpts_path: str | Path, version: str, epoch: int) -> Path:
    """`<CKPTS_PATH>/ckpt_<VERSION>/epoch<N>.pkl`, as mcan-vqa names them."""
    return Path(ckpts_path) / f"ckpt_{version}" / f"epoch{epoch}.pkl"


def resolve_checkpoint(cfg: Config, default_epoch: int | None = None) -> Path:
    """The checkpoint a command reads: CKPT_PATH, else run CKPT_VERSION (or VERSION) at CKPT_EPOCH.

    Without CKPT_EPOCH the epoch is `default_epoch`; when that is None too, a ConfigError says
    what to give.
    """
    if cfg.CKPT_PATH:
        return Path(cfg.CKPT_PATH)
    epoch = cfg.CKPT_EPOCH if cfg.CKPT_EPOCH > 0 else default_epoch
    if epoch is None:
        raise ConfigError("no checkpoint named: give --CKPT_EPOCH N (of run CKPT_VERSION, else VERSION) "
                          "or --CKPT_PATH FILE")
    return checkpoint_path(cfg.CKPTS_PATH, cfg.CKPT_VERSION or cfg.run_version, epoch)


def guard_new_run(cfg: Config) -> None:
    """ConfigError when a new (not resumed) run would write over checkpoints of a run of the same name."""
    run_dir = Path(cfg.CKPTS_PATH) / f"ckpt_{cfg.run_version}"
    if not cfg.RESUME and run_dir.is_dir() and any(run_dir.glob("epoch*.pkl")):
        raise ConfigError(
            f"{run_dir} already holds checkpoints of a run named {cfg.run_version!r}; a new run never "
            f"overwrites them: pick another --VERSION, or continue it with --RESUME True --CKPT_EPOCH N")


def checkpoint_state(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: Vocab,
                     epoch: int, step: int, lr_base: float) -> dict[str, Any]:
    """What a checkpoint holds: mcan-vqa's keys plus what an exact resume needs."""
    return {
        "state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_base": lr_base,  # mcan-vqa: the base learning rate of the epoch just finished
        "config": cfg.to_dict(),
        "epoch": epoch,  # epochs completed
        "step": step,  # updates completed
        "rng_torch": torch.get_rng_state(),
        "token_to_ix": vocab.token_to_ix,
        "ans_to_ix": vocab.ans_to_ix,
        "vocab_fingerprint": vocab.fingerprint(),
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically: a crash leaves the old file or the new one, never a torn one."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from e
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not an accuvqa/mcan-vqa checkpoint: no 'state_dict' entry")
    return state


def checkpoint_vocab(cfg: Config, state: dict[str, Any]) -> Vocab:
    """The dictionaries a checkpoint was trained with; an original mcan-vqa one holds none, so they
    are rebuilt from the data (mcan-vqa's rules) or read from TOKEN_DICT_PATH / ANSWER_DICT_PATH."""
    if "token_to_ix" in state:
        return Vocab(state["token_to_ix"], state["ans_to_ix"])
    train_records = [] if cfg.ANSWER_DICT_PATH else load_records(cfg, cfg.TRAIN_SPLIT, need_answers=True)
    return build_vocab(cfg, train_records)


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path, model_use: str = "mcan") -> None:
    """Load a checkpoint's state_dict strictly; size mismatches name the dictionary to pin.

    mcan-vqa saves the weights of a multi-GPU run as `nn.DataParallel` does, every key prefixed
    with 'module.'; that prefix is removed.
    """
    weights = state["state_dict"]
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = model_spec(model_use)
    for key, what, pin in ((spec.token_param, "token dictionary", "TOKEN_DICT_PATH"),
                           (spec.answer_param, "answer dictionary", "ANSWER_DICT_PATH")):
        got = weights.get(key)
        if got is not None and key in expected and tuple(got.shape)[:1] != expected[key][:1]:
            raise CheckpointError(
                f"{path}: {key} has {got.shape[0]} rows but the {what} has {expected[key][0]} entries; "
                f"pin the dictionary the checkpoint was trained with ({pin})")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise CheckpointError(f"{path} does not match the configured model ({model_use}): {detail}; "
                              f"check the model keys (LAYER, HIDDEN_SIZE, ...)") from e


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Restore the optimizer's moments (ours or mcan-vqa's); an empty entry starts afresh."""
    saved = state.get("optimizer")
    if not saved:
        log.warning("%s holds no optimizer state: the optimizer's moments start from zero", path)
        return
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model and OPT ({e}); "
                              f"resume with the config the checkpoint was trained with") from e


def load_trained(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Vocab, Path, int]:
    """Model, vocabularies, path and epoch of the checkpoint that `resolve_checkpoint` names
    (the run's last epoch, MAX_EPOCH, when no epoch is given)."""
    path = resolve_checkpoint(cfg, default_epoch=cfg.MAX_EPOCH)
    state = load_checkpoint(path)
    vocab = checkpoint_vocab(cfg, state)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix))
    load_weights(model, state, path, cfg.MODEL_USE)
    return model.to(device), vocab, path, int(state.get("epoch", cfg.CKPT_EPOCH))
