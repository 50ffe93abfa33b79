"""Samples/s of a whole `accuvqa train` run against the original mcan-vqa network's training step.

    .venv/bin/python benchmarks/throughput_vs_mcan_vqa.py --mcan-vqa /path/to/mcan-vqa --tree /tmp/perf/tree \
        [--batch-size 16] [--repeats 2] [--orig-steps 12] [--variant NAME "--KEY VALUE ..."]... \
        [--device cpu|cuda] [--overrides "--KEY VALUE ..."]

--mcan-vqa is a checkout of github.com/MILVLG/mcan-vqa (its `core/model/net.py` is imported from
there, never copied); --tree is the --out of `benchmarks/make_vqa_tree.py`, prepared (`accuvqa
prepare`, so the packed store exists).

(a) accuvqa: `accuvqa train --config configs/small.yml` on the tree's train split, one epoch,
    no evaluation, in a fresh process; samples/s = updates x BATCH_SIZE / the process's wall time
    (start-up, data, model, every update and the epoch's checkpoint included). Each --variant adds
    its overrides (e.g. `--variant nobucket "--BUCKET_WINDOW 0"`; a NAME=VALUE word is set in the
    run's environment instead, e.g. `--variant heap "MALLOC_MMAP_THRESHOLD_=33554432"`); the first
    variant is "preset".
(b) mcan-vqa: its `Net` (MCAN-small's sizes, the same dictionary sizes) in a fresh process, the
    training step of its `core/exec.py` timed alone (zero_grad, forward, `BCELoss(reduction='sum')`
    on the sigmoid output, backward, the loss read on the host, the per-parameter gradient norms it
    logs, Adam with its betas/eps), on the same questions in the same batches, padded as its loader
    pads them: 100 regions and 14 tokens. samples/s = BATCH_SIZE / median step time; the loader
    and start-up are not counted for (b).

The runs alternate (a variants..., b, a variants..., b, ...) `--repeats` times; the script prints
each run, the medians, and the ratios a / b.

--device (default cpu) is where both run: (a) gets `--DEVICE` with it, (b) moves its `Net` there, and on
a GPU each timed step also copies its batch to the device (as `core/exec.py` does in its loop) and
ends with `torch.cuda.synchronize()`. --overrides are config overrides given to every (a) run and
to the config (b) takes its sizes from (e.g. a tiny model for a quick check: benchmarks/gpu_check.py
--short). (a) runs `.venv/bin/accuvqa` when there is one, else `python -m accuvqa` with src/ on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_overrides(tree: Path) -> list[str]:
    """The overrides that read a tree written by make_vqa_tree.py."""
    return ["--DATASET", "vqa", "--DATASET_PATH", str(tree / "vqa"), "--FEATURE_PATH", str(tree / "coco_extract"),
            "--TOKEN_DICT_PATH", str(tree / "token_dict.json"), "--ANSWER_DICT_PATH", str(tree / "answer_dict.json")]


def accuvqa_command() -> list[str]:
    """How to start accuvqa: the virtual environment's script, else this Python with src/ on the path
    (a machine with torch but no .venv, e.g. a lent GPU machine; see `accuvqa_env`)."""
    script = ROOT / ".venv/bin/accuvqa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "accuvqa"]


def accuvqa_env(settings: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with src/ first on PYTHONPATH, plus `settings`."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **(settings or {}))


def train_command(tree: Path, batch_size: int, threads: int, extra: list[str], work: Path,
                  tag: str) -> tuple[list[str], dict[str, str]]:
    """The command line of one whole `accuvqa train` run of (a), and the environment settings among `extra`."""
    env_settings = [e for e in extra if re.match(r"^[A-Z_][A-Z0-9_]*=", e)]
    extra = [e for e in extra if e not in env_settings]
    cmd = [*accuvqa_command(), "train", "--config", str(ROOT / "configs/small.yml"),
           *tree_overrides(tree), "--BATCH_SIZE", str(batch_size), "--MAX_EPOCH", "1", "--EVAL_EVERY_EPOCH", "False",
           "--VERBOSE", "False", "--NUM_THREADS", str(threads), "--VERSION", tag,
           "--CKPTS_PATH", str(work / "ckpts"), "--RESULT_PATH", str(work / "results"), *extra]
    return cmd, dict(e.split("=", 1) for e in env_settings)


def run_accuvqa(tree: Path, batch_size: int, threads: int, extra: list[str], work: Path, tag: str,
                timeout: float | None = None) -> dict:
    """One whole `accuvqa train` run in a fresh process: wall time, updates, samples/s."""
    cmd, settings = train_command(tree, batch_size, threads, extra, work, tag)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=accuvqa_env(settings), timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"accuvqa train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    updates = int(re.search(r"updates\s+(\d+)", done.stdout).group(1))
    in_loop = float(re.search(r"samples/s\s+(\d+)", done.stdout).group(1))
    return {"wall_s": wall, "updates": updates, "samples_s": updates * batch_size / wall, "in_loop_samples_s": in_loop}


def mcan_vqa_net(cfg, token_size: int, answer_size: int, checkout: Path):
    """mcan-vqa's `Net` (imported from its checkout) with the sizes of `cfg`, seeded, in training mode."""
    import torch

    sys.path.insert(0, str(checkout))
    from core.model.net import Net  # mcan-vqa's network, from its checkout

    orig_cfg = types.SimpleNamespace(
        HIDDEN_SIZE=cfg.HIDDEN_SIZE, MULTI_HEAD=cfg.MULTI_HEAD, HIDDEN_SIZE_HEAD=cfg.HIDDEN_SIZE // cfg.MULTI_HEAD,
        FF_SIZE=cfg.FF_SIZE, DROPOUT_R=cfg.DROPOUT_R, LAYER=cfg.LAYER, FLAT_MLP_SIZE=cfg.FLAT_MLP_SIZE,
        FLAT_GLIMPSES=cfg.FLAT_GLIMPSES, FLAT_OUT_SIZE=cfg.FLAT_OUT_SIZE, WORD_EMBED_SIZE=cfg.WORD_EMBED_SIZE,
        IMG_FEAT_SIZE=cfg.IMG_FEAT_SIZE, USE_GLOVE=False)
    torch.manual_seed(0)
    return Net(orig_cfg, None, token_size, answer_size).train()


def overrides_dict(overrides: str) -> dict[str, str]:
    """"--KEY VALUE ..." -> {KEY: VALUE}."""
    words = overrides.split()
    if len(words) % 2 or not all(w.startswith("--") for w in words[::2]):
        sys.exit(f"--overrides {overrides!r}: expected pairs of --KEY VALUE")
    return {k[2:]: v for k, v in zip(words[::2], words[1::2])}


def original_command(checkout: Path, tree: Path, batch_size: int, threads: int, orig_steps: int,
                     device: str = "cpu", overrides: str = "") -> list[str]:
    """The command line of one process timing mcan-vqa's step (b)."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--mcan-vqa", str(checkout), "--tree", str(tree),
            "--batch-size", str(batch_size), "--threads", str(threads), "--orig-steps", str(orig_steps),
            "--device", device, *([f"--overrides={overrides}"] if overrides else [])]


def run_original_process(checkout: Path, tree: Path, batch_size: int, threads: int, orig_steps: int,
                         device: str = "cpu", overrides: str = "", timeout: float | None = None) -> dict:
    """(b) in a fresh process: median, min and max step time, samples/s."""
    child = subprocess.run(original_command(checkout, tree, batch_size, threads, orig_steps, device, overrides),
                           capture_output=True, text=True, env=accuvqa_env(), timeout=timeout)
    if child.returncode != 0:
        sys.exit(f"mcan-vqa step failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_original(args: argparse.Namespace) -> dict:
    """One process timing mcan-vqa's training step (called with --child)."""
    import numpy as np
    import torch

    from accuvqa.config import load_config
    from accuvqa.data.loader import epoch_batches, make_dataset
    from accuvqa.data.records import load_records
    from accuvqa.data.vocab import build_vocab
    from accuvqa.runtime import Runtime

    torch.set_num_threads(args.threads)
    pairs = tree_overrides(args.tree)
    cfg = load_config(ROOT / "configs/small.yml", {k.lstrip("-"): v for k, v in zip(pairs[::2], pairs[1::2])}
                      | overrides_dict(args.overrides) | {"BATCH_SIZE": args.batch_size, "BUCKET_WINDOW": 0})
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    dataset = make_dataset(cfg, records, vocab)
    batches = epoch_batches(len(dataset), cfg, 0, Runtime(torch.device("cpu")))
    net = mcan_vqa_net(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix), args.mcan_vqa).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=cfg.LR_BASE, betas=cfg.OPT_BETAS, eps=cfg.OPT_EPS)
    loss_fn = torch.nn.BCELoss(reduction="sum")
    named_params = list(net.named_parameters())

    def padded(batch: dict) -> tuple:
        img = torch.zeros(batch["img_feat"].shape[0], cfg.IMG_FEAT_PAD_SIZE, cfg.IMG_FEAT_SIZE)
        img[:, : batch["img_feat"].shape[1]] = batch["img_feat"]
        ques = torch.zeros(batch["ques_ix"].shape[0], cfg.MAX_TOKEN, dtype=torch.int64)
        ques[:, : batch["ques_ix"].shape[1]] = batch["ques_ix"]
        return img, ques, batch["answer_scores"]

    seconds = []
    for i in range(args.orig_steps + 1):  # the first step is a warm-up
        img, ques, target = padded(dataset[batches[i % len(batches)]])
        start = time.perf_counter()
        if cuda:  # core/exec.py copies each batch to the GPU in its loop
            img, ques, target = img.to(device), ques.to(device), target.to(device)
        optim.zero_grad()
        loss = loss_fn(net(img, ques), target)
        loss.backward()
        float(loss.cpu().data.numpy())
        [np.asarray(torch.norm(p.grad).cpu().data.numpy()) for _, p in named_params if p.grad is not None]
        optim.step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds[1:])
    return {"median_step_s": step, "min_step_s": min(seconds[1:]), "max_step_s": max(seconds[1:]),
            "samples_s": args.batch_size / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mcan-vqa", type=Path, required=True, help="a checkout of MILVLG/mcan-vqa")
    parser.add_argument("--tree", type=Path, required=True, help="a prepared make_vqa_tree.py tree")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--orig-steps", type=int, default=12, help="timed mcan-vqa steps per run")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[],
                        help="another accuvqa run with these overrides")
    parser.add_argument("--device", default="cpu", help="where both run: cpu (default), cuda or cuda:N")
    parser.add_argument("--overrides", default="", metavar='"--KEY VALUE ..."',
                        help="config overrides for every accuvqa run and for mcan-vqa's sizes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_original(args)))
        return
    if not (args.mcan_vqa / "core/model/net.py").is_file():
        sys.exit(f"{args.mcan_vqa}: no core/model/net.py (clone github.com/MILVLG/mcan-vqa there)")
    variants = [("preset", "")] + [tuple(v) for v in args.variant]
    print(f"load average at start: {os.getloadavg()[0]:.2f}; batch {args.batch_size}, {args.threads} threads, "
          f"device {args.device}")
    results: dict[str, list[dict]] = {name: [] for name, _ in variants} | {"mcan-vqa": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in variants:
                res = run_accuvqa(args.tree, args.batch_size, args.threads,
                                  ["--DEVICE", args.device, *args.overrides.split(), *extra.split()], Path(tmp),
                                  f"{name}{r}")
                results[name].append(res)
                print(f"run {r + 1} accuvqa {name:>10}: {res['updates']} updates, {res['wall_s']:.1f} s, "
                      f"{res['samples_s']:.2f} samples/s (in-loop {res['in_loop_samples_s']:.0f})", flush=True)
            res = run_original_process(args.mcan_vqa, args.tree, args.batch_size, args.threads, args.orig_steps,
                                       args.device, args.overrides)
            results["mcan-vqa"].append(res)
            print(f"run {r + 1} mcan-vqa step      : {res['median_step_s']:.3f} s/step "
                  f"({res['min_step_s']:.3f}-{res['max_step_s']:.3f}), {res['samples_s']:.2f} samples/s", flush=True)
    orig = statistics.median(x["samples_s"] for x in results["mcan-vqa"])
    print(f"\nmedians over {args.repeats} runs; mcan-vqa step: {orig:.2f} samples/s")
    print(f"{'accuvqa run':>12}  {'samples/s':>9}  {'min-max':>13}  {'ratio to mcan-vqa':>17}")
    for name, _ in variants:
        values = [x["samples_s"] for x in results[name]]
        print(f"{name:>12}  {statistics.median(values):9.2f}  {min(values):6.2f}-{max(values):6.2f}  "
              f"{statistics.median(values) / orig:17.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
