"""A run resumed on another number of processes: how far its final model is from an uninterrupted run's.

    .venv/bin/python benchmarks/resume_world_size.py [--config configs/easyvqa.yml] [--epochs 2] [--KEY VALUE ...]

Needs the data the config names (`accuvqa prepare --config configs/easyvqa.yml`). CPU, gloo, with
`accuvqa train` and `accuvqa train --nproc 2` in subprocesses (NUM_THREADS 1, DROPOUT_R 0, no
evaluation), each run in a fresh folder:

- `1`: one process, uninterrupted (the reference);
- `1->2`: epoch 1 on one process, the rest resumed (`--RESUME True`) on two;
- `2->1`: epoch 1 on two processes, the rest on one;
- `2`: two processes, uninterrupted; `2->2`: epoch 1 on two, the rest on two again.

Prints, for each against `1`, the largest |logit difference| over every val question and the
largest |weight difference|; and whether `2->2` ends with exactly the weights of `2`. Any other
`--KEY VALUE` goes to every run (e.g. a smaller model: `--LAYER 1 --HIDDEN_SIZE 32`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from accuvqa.checkpoint import load_checkpoint, load_trained
from accuvqa.cli import parse_overrides
from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader, eval_batches, make_dataset
from accuvqa.data.records import load_split
from accuvqa.models import model_inputs
from accuvqa.runtime import to_device

ROOT = Path(__file__).resolve().parents[1]


def train(args: list[str], nproc: int) -> None:
    """`accuvqa train ARGS` in a subprocess, on `nproc` processes; stops the script if it fails."""
    command = [sys.executable, "-m", "accuvqa", "train", *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    r = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(command)}\n{r.stderr[-3000:]}")


@torch.no_grad()
def val_logits(cfg, checkpoint: Path) -> torch.Tensor:
    """The model's logits on every val question, in question order."""
    model, vocab, _, _ = load_trained(cfg.replace(CKPT_PATH=str(checkpoint)), torch.device("cpu"))
    dataset = make_dataset(cfg, load_split(cfg.DATASET_PATH, "val", need_answers=True), vocab)
    model.eval()
    batches = eval_batches(len(dataset), 256)
    return torch.cat([model(*model_inputs(cfg, to_device(b, torch.device("cpu"))))
                      for b in batch_loader(dataset, batches, cfg)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/easyvqa.yml"))
    parser.add_argument("--epochs", type=int, default=2)
    opts, extra = parser.parse_known_args()
    plans = {"1": [(1, opts.epochs)], "1->2": [(1, 1), (2, opts.epochs)], "2->1": [(2, 1), (1, opts.epochs)],
             "2": [(2, opts.epochs)], "2->2": [(2, 1), (2, opts.epochs)]}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--config", opts.config, "--NUM_THREADS", "1", "--DROPOUT_R", "0", "--EVAL_EVERY_EPOCH", "False",
                "--CKPTS_PATH", f"{tmp}/ck", "--RESULT_PATH", f"{tmp}/res", *extra]
        for name, legs in plans.items():
            version = name.replace("->", "to")
            for leg, (nproc, epochs) in enumerate(legs):
                train([*base, "--VERSION", version, "--MAX_EPOCH", str(epochs),
                       *(["--RESUME", "True"] if leg else [])], nproc)
                print(f"trained {name}: {epochs} epochs on {nproc} process(es)", file=sys.stderr)
        cfg = load_config(opts.config, {**parse_overrides(extra), "CKPTS_PATH": f"{tmp}/ck", "NUM_THREADS": 1})
        final = {name: Path(tmp) / "ck" / f"ckpt_{name.replace('->', 'to')}" / f"epoch{opts.epochs}.pkl"
                 for name in plans}
        weights = {name: load_checkpoint(path)["state_dict"] for name, path in final.items()}
        logits = {name: val_logits(cfg, path) for name, path in final.items()}
    print(f"config {opts.config} {' '.join(extra)}; {opts.epochs} epochs; {logits['1'].shape[0]} val questions")
    print(f"{'run':<6} {'max |logit - run 1|':>20} {'max |weight - run 1|':>21}")
    for name in plans:
        dw = max(float((weights[name][k] - weights["1"][k]).abs().max()) for k in weights["1"])
        print(f"{name:<6} {float((logits[name] - logits['1']).abs().max()):>20.3g} {dw:>21.3g}")
    same = all(torch.equal(weights["2->2"][k], weights["2"][k]) for k in weights["2"])
    print(f"2->2 ends with the weights of 2, bit for bit: {same}")


if __name__ == "__main__":
    main()
