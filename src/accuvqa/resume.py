"""Run state for an exact resume, apart from the file format (`accuvqa.checkpoint`): where the run
stands (`Position`), the running epoch's loss sums, every RNG state; what a checkpoint holds of
them (`checkpoint_state`) and how a run takes them back (`restore_run`)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accuvqa.accumulate import GradientAccumulator
from accuvqa.checkpoint import load_optimizer_state, load_weights
from accuvqa.config import Config
from accuvqa.data.vocab import Vocab

# Position field -> its key in a checkpoint's "position" entry, where they differ: the file keeps the
# key every accuvqa checkpoint has, so old and new versions read each other's checkpoints
_SAVED_AS = {"batches_done": "batch"}


@dataclass
class Position:
    """Where a run stands: what an exact resume must know besides weights, optimizer and RNGs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # updates completed
    batches_done: int = 0  # batches done in the running epoch (0 at an epoch boundary)
    loss_sum: float = 0.0  # the running epoch's training-loss sums, for its log line
    item_sum: float = 0.0
    bad_updates: int = 0  # updates skipped in a row for a non-finite loss or gradient

    def saved(self) -> dict[str, Any]:
        """The checkpoint's "position" entry."""
        return {_SAVED_AS.get(k, k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "Position":
        """The position a checkpoint's "position" entry holds (either name of a renamed field)."""
        read_as = {key: field for field, key in _SAVED_AS.items()}
        return cls(**{read_as.get(k, k): v for k, v in saved.items()})

    def next_epoch(self) -> "Position":
        """The position at the end of the running epoch: no batch done in the next, its sums at zero."""
        return Position(epoch=self.epoch + 1, step=self.step, bad_updates=self.bad_updates)


class RunningLoss:
    """The running epoch's training-loss sums, kept on the device: reading them (a host sync) happens
    only when logging or saving. A mid-epoch checkpoint's sums carry on where they stopped."""

    def __init__(self, pos: Position, reduction: str, device: torch.device) -> None:
        self.reduction = reduction  # LOSS_REDUCTION: the accumulator reports a sum, or a mean per item
        self.loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=device)
        self.item_sum = torch.tensor(pos.item_sum, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, n_items: int) -> None:
        """Count one update's loss over its `n_items` items."""
        self.loss_sum += loss.detach() * (1 if self.reduction == "sum" else n_items)
        self.item_sum += n_items

    def mean(self) -> float:
        """The mean training loss so far in the running epoch."""
        return float(self.loss_sum) / max(float(self.item_sum), 1.0)

    def at(self, pos: Position, batches_done: int) -> Position:
        """`pos` at `batches_done` batches into its epoch, with these sums: what a mid-epoch checkpoint saves."""
        return dataclasses.replace(pos, batches_done=batches_done, loss_sum=float(self.loss_sum),
                                   item_sum=float(self.item_sum))


def rng_state() -> dict[str, Any]:
    """Every random generator's state: Python, NumPy, torch (CPU and each CUDA device)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators to a state saved by `rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(cfg: Config, model: torch.nn.Module, accumulator: GradientAccumulator, vocab: Vocab,
                     position: Position, lr_base: float, extractor: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds: mcan-vqa's keys plus what an exact resume needs (`model` unwrapped), and the
    extractor that computed the training features from images (`accuvqa extract`; None when unknown)."""
    return {
        "state_dict": model.state_dict(),
        "optimizer": accumulator.optimizer.state_dict(),
        "lr_base": lr_base,  # mcan-vqa: the base learning rate of the epoch running or just finished
        "config": cfg.to_dict(),
        "epoch": position.epoch,  # epochs completed
        "step": position.step,  # updates completed
        "position": position.saved(),
        "rng": rng_state(),
        "scaler": accumulator.scaler.state_dict() if accumulator.scaler is not None else None,
        "micro_batches": accumulator.micro_batches,
        "token_to_ix": vocab.token_to_ix,
        "ans_to_ix": vocab.ans_to_ix,
        "vocab_fingerprint": vocab.fingerprint(),
        "extractor": extractor,
    }


def restore_run(cfg: Config, state: dict[str, Any], path: Path, model: torch.nn.Module,
                accumulator: GradientAccumulator, n_samples: int) -> Position:
    """Load a checkpoint's weights (into the unwrapped `model`), optimizer, scaler, micro-batch count
    and RNGs; return its position."""
    load_weights(model, state, path, cfg.MODEL_USE, cfg)
    load_optimizer_state(accumulator.optimizer, state, path)
    if state.get("scaler") and accumulator.scaler is not None:
        accumulator.scaler.load_state_dict(state["scaler"])
    if accumulator.auto and state.get("micro_batches"):
        accumulator.micro_batches = int(state["micro_batches"])
    if "rng" in state:
        restore_rng(state["rng"])
    elif "rng_torch" in state:  # an accuvqa checkpoint from before mid-epoch checkpoints
        torch.set_rng_state(state["rng_torch"])
    if "position" in state:
        return Position.from_saved(state["position"])
    epoch = int(state.get("epoch", cfg.CKPT_EPOCH))
    # an mcan-vqa checkpoint has no step count; mcan-vqa resumes its warm-up counter at
    # int(data_size / BATCH_SIZE * CKPT_EPOCH)
    step = int(state["step"]) if "step" in state else int(n_samples / cfg.BATCH_SIZE * epoch)
    return Position(epoch=epoch, step=step)
