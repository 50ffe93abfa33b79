"""Training runs in float64, for the tests that compare whole runs (GRAD_ACCU_STEPS, number of processes,
resume across world sizes): in float32 two runs that differ only by summation order drift apart by 1e-4
and more within a few dozen Adam updates (eps 1e-9 turns rounding-sized gradients into full steps), and by
how much depends on the CPU; in float64 they agree to ~1e-12, so a tight bound tests the claim itself.

accuvqa has no config key for the dtype, so this harness runs the real entry points (`train()`, the CLI,
torchrun's processes) with torch's default dtype float64 (the model is built in float64) and every batch of
the dataset in float64. In-process: `with float64_training(): train(cfg)`. In a subprocess (and every
process it starts, torchrun's included): `env=FLOAT64_ENV`, whose PYTHONPATH puts tests/float64_site
first, so its sitecustomize calls `enable()` at start-up.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
SWITCH = "ACCUVQA_TEST_FLOAT64"
FLOAT64_ENV = {SWITCH: "1", "PYTHONPATH": os.pathsep.join([str(HERE / "float64_site"), str(HERE.parent / "src")])}


def enable() -> Callable[[], None]:
    """Build models in float64 and give every dataset batch's floating tensors in float64; return the undo."""
    from accuvqa.data.dataset import VQADataset

    original, dtype = VQADataset.__getitem__, torch.get_default_dtype()

    def getitem(self: VQADataset, indices):  # noqa: ANN001 - VQADataset.__getitem__'s own signature
        return {k: v.double() if v.is_floating_point() else v for k, v in original(self, indices).items()}

    VQADataset.__getitem__ = getitem
    torch.set_default_dtype(torch.float64)

    def undo() -> None:
        VQADataset.__getitem__ = original
        torch.set_default_dtype(dtype)

    return undo


@contextmanager
def float64_training() -> Iterator[None]:
    """Within: `train()`, `load_trained()` and the datasets work in float64 (see the module docstring)."""
    undo = enable()
    try:
        yield
    finally:
        undo()
