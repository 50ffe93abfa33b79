"""The prepared GPU check: on one CUDA GPU, in at most 8 minutes, the figures of docs/gpu.md.

    .venv/bin/python benchmarks/gpu_check.py --mcan-vqa .cache/mcan-vqa          # a GPU machine with the venv
    PYTHONPATH=src python3 benchmarks/gpu_check.py --mcan-vqa .cache/mcan-vqa    # a machine whose python3 has torch
    .venv/bin/python benchmarks/gpu_check.py --short                             # CPU, seconds (CI runs it)

It runs, each step in a fresh process, in one scratch folder (--work, default a temporary one):

1. the CUDA tests, `pytest -q tests/test_cuda.py` (on the CPU they skip: "skipped: no CUDA");
2. a synthetic VQA v2-layout tree (`benchmarks/make_vqa_tree.py`) and `accuvqa prepare` on it;
3. `accuvqa check` under `--AMP fp16` and `--AMP bf16`: each verdict line and the worst relative
   difference (the tolerance is four units of the format's rounding, src/accuvqa/check.py; fp16
   needs CUDA: on the CPU its row says "n/a (fp16 needs CUDA)");
4. a bit-identical resume: an uninterrupted `accuvqa train`, and the same run stopped by a real
   SIGTERM at update N (`ACCUVQA_FAIL_AT=0:N:term`) then continued with the very command it prints
   on its last stderr line ("continue with: accuvqa train ... --RESUME True"); the two final epoch
   checkpoints' state_dict tensors compared with torch.equal. When they differ, a second
   uninterrupted run says whether the device's kernels are deterministic at all;
5. throughput of MCAN-small (`--config small`): whole `accuvqa train` runs in fp32 and `--AMP bf16`
   beside mcan-vqa's own training step on the same device (benchmarks/throughput_vs_mcan_vqa.py's
   functions; mcan-vqa is imported from the checkout --mcan-vqa names, never copied);
6. a markdown table (device, date, torch version; each row's figure and the command that gave it)
   written to --out (default docs/gpu.md) and printed.

--short (the CPU, CI): a tiny tree, a tiny model (the rows say so), a few updates; --out then
defaults to a temporary file, never docs/gpu.md. Every step gets what is left of --budget-s (480 s)
as its time limit, so the whole check ends within it; a step past it is recorded as timed out.
Exit status 0 when every row holds (CUDA tests passed or skipped, check equivalent, resume
bit-identical, every run finished), else 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]  # accuvqa without an install; the benchmarks beside

import torch

import throughput_vs_mcan_vqa as throughput
from accuvqa.checkpoint import checkpoint_path, load_checkpoint

# a tiny MCAN for --short (the tree keeps its real shapes: 2048-d features, 20,573 tokens, 3,129 answers)
TINY = ["--LAYER", "1", "--HIDDEN_SIZE", "32", "--MULTI_HEAD", "4", "--FF_SIZE", "64", "--FLAT_MLP_SIZE", "32",
        "--FLAT_OUT_SIZE", "64", "--WORD_EMBED_SIZE", "16"]
FP16_ON_CPU = "n/a (fp16 needs CUDA)"
NO_CHECKOUT = "not run: no mcan-vqa checkout (--mcan-vqa)"
ROWS = ("CUDA tests", "data", "check, AMP fp16", "check, AMP bf16", "resume after SIGTERM",
        "train fp32", "train AMP bf16", "mcan-vqa step")


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the full check (a GPU, minutes) or --short (the CPU, seconds)."""

    images: int  # train2014 images of the tree
    questions_per_image: int
    val_images: int
    batch_size: int  # BATCH_SIZE of check, resume and throughput runs
    resume_epochs: int
    repeats: int  # throughput runs of each kind, alternating
    orig_steps: int  # timed mcan-vqa steps per run
    threads: int  # NUM_THREADS (1 in --short: 2 threads on 2 busy cores run tiny matrices 10x slower)
    tree_workers: int | None  # make_vqa_tree.py --workers (None: its default, every CPU)
    model: tuple[str, ...] = ()  # model overrides (--short: TINY)


FULL = Sizes(images=2000, questions_per_image=5, val_images=4, batch_size=64, resume_epochs=2, repeats=2,
             orig_steps=20, threads=min(8, os.cpu_count() or 1), tree_workers=None)
SHORT = Sizes(images=4, questions_per_image=4, val_images=1, batch_size=4, resume_epochs=2, repeats=1,
              orig_steps=2, threads=1, tree_workers=1, model=tuple(TINY))


@dataclass
class Row:
    """One line of the table: what was measured, its figure, what else it showed, the command."""

    name: str
    figure: str
    detail: str
    command: str
    holds: bool = True  # False: a failure, a verdict against, a timeout


class StepFailed(Exception):
    """A step's process failed or ran out of time: what its row says, and the command."""

    def __init__(self, figure: str, command: str = "") -> None:
        super().__init__(figure)
        self.figure, self.command = figure, command


@dataclass
class GpuCheck:
    """The state the steps share: scratch folder, device, sizes, the time left."""

    work: Path
    device: str
    sizes: Sizes
    deadline: float
    mcan_vqa: Path | None
    rows: list[Row] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def tree(self) -> Path:
        return self.work / "tree"

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def env(self, settings: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of every step: src/ on PYTHONPATH, `accuvqa` on PATH (so a printed command runs)."""
        env = throughput.accuvqa_env(settings)
        env["PATH"] = os.pathsep.join([str(accuvqa_bin(self.work)), env.get("PATH", "")])
        return env

    def run(self, cmd: list[str] | str, settings: dict[str, str] | None = None,
            ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        """Run one step's process (a list, or a bash command line) within the budget; StepFailed otherwise."""
        shown = self.shown(cmd, settings)
        if self.left() < 1:
            raise StepFailed("not run: the time budget (--budget-s) was spent", shown)
        try:
            done = subprocess.run(cmd, shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str)
                                  else None, cwd=self.work, env=self.env(settings), capture_output=True, text=True,
                                  timeout=self.left(), check=False)
        except subprocess.TimeoutExpired:
            raise StepFailed("timed out: the time budget (--budget-s) was spent", shown) from None
        if done.returncode not in ok:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise StepFailed(f"failed (exit {done.returncode}): {tail[0][:300]}", shown)
        return done

    def shown(self, cmd: list[str] | str, settings: dict[str, str] | None = None) -> str:
        """A command as the table shows it: `accuvqa ...`, paths under the scratch folder as $WORK,
        the tree's overrides as $TREE and --short's tiny model as $TINY."""
        words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        runner = throughput.accuvqa_command()
        if words[:len(runner)] == runner:
            words = ["accuvqa", *words[len(runner):]]
        text = " ".join(shlex.quote(w) for w in words)
        for long, short in ((" ".join(throughput.tree_overrides(self.tree)), "$TREE"),
                            (" ".join(self.sizes.model), "$TINY")):
            if long:  # as whole words, never inside a quoted argument
                text = re.sub(rf"(?<= ){re.escape(long)}(?= |$)", short, text)
        text = text.replace(sys.executable, "python").replace(str(self.work), "$WORK")
        text = text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
        return " ".join([*(f"{k}={v}" for k, v in (settings or {}).items()), text])

    def accuvqa(self, command: str, *extra: str) -> list[str]:
        """`accuvqa COMMAND --config small` on the tree, with this check's device, threads and model."""
        return ["accuvqa", command, "--config", "small", *throughput.tree_overrides(self.tree),
                "--DEVICE", self.device, "--NUM_THREADS", str(self.sizes.threads), *self.sizes.model, *extra]


def accuvqa_bin(work: Path) -> Path:
    """A folder whose `accuvqa` starts accuvqa: the venv's, else a small script in the scratch folder."""
    venv = ROOT / ".venv/bin"
    if (venv / "accuvqa").is_file():
        return venv
    shim = work / "bin/accuvqa"
    if not shim.exists():
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m accuvqa \"$@\"\n")
        shim.chmod(0o755)
    return shim.parent


def attempt(check: GpuCheck, fn, *args, **kwargs) -> tuple[object, str | None]:
    """(fn's result, None), or (None, what its row says) when it failed (a throughput function's sys.exit)
    or ran past the budget."""
    try:
        return fn(*args, timeout=max(1.0, check.left()), **kwargs), None
    except subprocess.TimeoutExpired:
        return None, "timed out: the time budget (--budget-s) was spent"
    except SystemExit as e:
        return None, f"failed: {str(e).strip().splitlines()[-1][:300]}"


def cuda_tests(check: GpuCheck) -> list[Row]:
    """`pytest -q tests/test_cuda.py`: its summary ("skipped: no CUDA" on the CPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_cuda.py")]
    done = check.run(cmd, ok=(0, 1))
    summary = [s for s in done.stdout.strip().splitlines() if s.strip()][-1].strip("= ")
    counts = re.sub(r" in [\d.]+s.*$", "", summary)
    if not torch.cuda.is_available():
        return [Row("CUDA tests", "skipped: no CUDA", counts, check.shown(cmd), holds=done.returncode == 0)]
    return [Row("CUDA tests", counts, summary, check.shown(cmd), holds=done.returncode == 0)]


def data(check: GpuCheck) -> list[Row]:
    """The synthetic VQA v2 tree and `accuvqa prepare` on it; the figure: train questions."""
    s = check.sizes
    make = [sys.executable, str(ROOT / "benchmarks/make_vqa_tree.py"), "--images", str(s.images),
            "--questions-per-image", str(s.questions_per_image), "--val-images", str(s.val_images),
            "--out", str(check.tree), "--overwrite", *(["--workers", str(s.tree_workers)] if s.tree_workers else [])]
    prepare = ["accuvqa", "prepare", "--config", "small", *throughput.tree_overrides(check.tree), "--VERBOSE", "False"]
    start = time.monotonic()
    check.run(make)
    made = time.monotonic()
    done = check.run(prepare)
    counts = dict(re.findall(r"^\s+(train|val)\s+(\d+) questions", done.stdout, re.MULTILINE))
    return [Row("data", counts["train"], f"train questions ({counts['val']} val) on {s.images} + {s.val_images} "
                f"images, 2048-d features of 10-100 regions; tree {made - start:.0f} s, prepare "
                f"{time.monotonic() - made:.0f} s", f"{check.shown(make)} && {check.shown(prepare)}")]


def run_check(check: GpuCheck, amp: str) -> list[Row]:
    """`accuvqa check --AMP amp`: the worst relative difference and the verdict line."""
    name = f"check, AMP {amp}"
    cmd = check.accuvqa("check", "--BATCH_SIZE", str(check.sizes.batch_size), "--AMP", amp)
    if amp == "fp16" and not check.cuda:
        return [Row(name, FP16_ON_CPU, "fp16 autocast needs a GradScaler, which needs CUDA", check.shown(cmd))]
    done = check.run(cmd, ok=(0, 1))
    rel = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+\S+\s+\S+\s+(\S+)\s+\S+\s+\S+\s*$", done.stdout, re.MULTILINE)]
    verdict = next(line for line in done.stdout.splitlines() if line.startswith("verdict:"))
    return [Row(name, f"{max(rel):.2e}", verdict, check.shown(cmd), holds=done.returncode == 0)]


def final_weights(check: GpuCheck, version: str) -> dict[str, torch.Tensor]:
    """The state_dict of a run's last epoch checkpoint."""
    path = checkpoint_path(check.work / "ckpts", version, check.sizes.resume_epochs)
    return load_checkpoint(path)["state_dict"]


def equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tensors torch.equal in both, tensors in either)."""
    return sum(k in b and torch.equal(v, b[k]) for k, v in a.items()), len(a.keys() | b.keys())


def resume(check: GpuCheck) -> list[Row]:
    """Uninterrupted vs stopped by SIGTERM and continued with the printed command: torch.equal weights?"""
    s = check.sizes
    for folder in ("ckpts", "results"):  # a --work used before: a new run never replaces an old one's checkpoints
        shutil.rmtree(check.work / folder, ignore_errors=True)
    base = check.accuvqa("train", "--BATCH_SIZE", str(s.batch_size), "--MAX_EPOCH", str(s.resume_epochs),
                         "--EVAL_EVERY_EPOCH", "False", "--VERBOSE", "False",
                         "--CKPTS_PATH", str(check.work / "ckpts"), "--RESULT_PATH", str(check.work / "results"))
    whole = [*base, "--VERSION", "resume-whole"]
    done = check.run(whole)
    updates = int(re.search(r"updates\s+(\d+)", done.stdout).group(1))
    stop_at = max(1, updates * 3 // 4)  # in the last epoch, mid-way
    drill = {"ACCUVQA_FAIL_AT": f"0:{stop_at}:term"}
    stopped = [*base, "--VERSION", "resume-stopped"]
    done = check.run(stopped, drill, ok=(128 + signal.SIGTERM,))  # saved and stopped
    last = done.stderr.strip().splitlines()[-1]
    if "continue with: " not in last:
        raise StepFailed(f"failed: the stopped run's last stderr line names no command: {last[:200]}",
                         check.shown(stopped, drill))
    continued = last.split("continue with: ", 1)[1]
    check.run(continued)  # verbatim, through bash, `accuvqa` on PATH
    same, total = equal_tensors(final_weights(check, "resume-whole"), final_weights(check, "resume-stopped"))
    detail = (f"{same} of {total} state_dict tensors torch.equal: epoch{s.resume_epochs}.pkl of the run stopped by "
              f"SIGTERM at update {stop_at} of {updates} and continued vs the uninterrupted run")
    if same != total:  # is it resume, or are the device's kernels not deterministic at all?
        check.run([*base, "--VERSION", "resume-whole-again"])
        again, _ = equal_tensors(final_weights(check, "resume-whole"), final_weights(check, "resume-whole-again"))
        detail += ("; two uninterrupted runs are bit-identical, so resume loses state" if again == total else
                   f"; two uninterrupted runs differ too ({again} of {total} equal): the device's kernels are "
                   f"not deterministic")
    command = (f"{check.shown(whole)} ; {check.shown(stopped, drill)} ; then the command it prints, verbatim: "
               f"{check.shown(continued)}")
    return [Row("resume after SIGTERM", "bit-identical" if same == total else "NOT bit-identical", detail, command,
                holds=same == total)]


def throughput_rows(check: GpuCheck) -> list[Row]:
    """Whole `accuvqa train` runs (fp32, AMP bf16) and mcan-vqa's step, alternating; samples/s."""
    s = check.sizes
    shutil.rmtree(check.work / "throughput", ignore_errors=True)
    loader = ["--NUM_WORKERS", "4", "--PIN_MEM", "True"] if check.cuda else []  # docs/hardware.md's GPU advice
    kinds = {"train fp32": [], "train AMP bf16": ["--AMP", "bf16"]}
    extra = {name: ["--DEVICE", check.device, *s.model, *loader, *amp] for name, amp in kinds.items()}
    runs: dict[str, list[dict]] = {name: [] for name in [*kinds, "mcan-vqa step"]}
    orig_cmd = (throughput.original_command(check.mcan_vqa, check.tree, s.batch_size, s.threads, s.orig_steps,
                                            check.device, " ".join(s.model)) if check.mcan_vqa else [])
    failed: dict[str, str | None] = {}  # name -> what its row says when it failed
    for r in range(s.repeats):  # alternating: fp32, bf16, mcan-vqa, fp32, ...
        for name in kinds:
            if not failed.get(name):
                res, failed[name] = attempt(check, throughput.run_accuvqa, check.tree, s.batch_size, s.threads,
                                            extra[name], check.work / "throughput", f"{name.split()[-1]}-{r}")
                runs[name] += [res] if res else []
        if check.mcan_vqa and not failed.get("mcan-vqa step"):
            res, failed["mcan-vqa step"] = attempt(check, throughput.run_original_process, check.mcan_vqa, check.tree,
                                                   s.batch_size, s.threads, s.orig_steps, check.device,
                                                   " ".join(s.model))
            runs["mcan-vqa step"] += [res] if res else []
    orig = statistics.median(x["samples_s"] for x in runs["mcan-vqa step"]) if runs["mcan-vqa step"] else None
    size = "tiny model ($TINY)" if s.model else "MCAN-small"
    rows = []
    for name in kinds:
        cmd = check.shown(throughput.train_command(check.tree, s.batch_size, s.threads, extra[name],
                                                   check.work / "throughput", f"{name.split()[-1]}-0")[0])
        if failed.get(name) or not runs[name]:
            rows.append(Row(name, failed.get(name) or "not run", "", cmd, holds=False))
            continue
        whole = statistics.median(x["samples_s"] for x in runs[name])
        in_loop = statistics.median(x["in_loop_samples_s"] for x in runs[name])
        rows.append(Row(name, f"{whole:.1f}", (
            f"samples/s of the whole process (start-up, data, every update, the checkpoint), median of "
            f"{len(runs[name])}" + (f", {whole / orig:.2f}x mcan-vqa's step" if orig else "")
            + f"; {runs[name][0]['updates']} updates of {s.batch_size} in "
            f"{statistics.median(x['wall_s'] for x in runs[name]):.1f} s; in the training loop {in_loop:.0f} "
            f"samples/s" + (f" ({in_loop / orig:.2f}x)" if orig else "") + f"; {size}"), cmd))
    if not check.mcan_vqa:
        rows.append(Row("mcan-vqa step", NO_CHECKOUT, "", ""))
    elif failed.get("mcan-vqa step"):
        rows.append(Row("mcan-vqa step", failed["mcan-vqa step"], "", check.shown(orig_cmd), holds=False))
    else:
        steps = runs["mcan-vqa step"]
        rows.append(Row("mcan-vqa step", f"{orig:.1f}", (
            f"samples/s of its training step alone (median {statistics.median(x['median_step_s'] for x in steps):.4f} "
            f"s/step over {s.orig_steps} steps, median of {len(steps)} processes; padded to 100 regions and "
            f"14 tokens; start-up and loader not counted); {size}"), check.shown(orig_cmd)))
    return rows


def markdown(check: GpuCheck, seconds: float, reproduce: str) -> str:
    """docs/gpu.md: the device, the date, torch, and the table."""
    device = torch.cuda.get_device_name(check.device) if check.cuda else (
        "CPU (short mode)" if check.sizes is SHORT else "CPU")

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# GPU check",
        "",
        "<!-- written by benchmarks/gpu_check.py: rerun it rather than editing by hand -->",
        f"Device: **{device}** · date {datetime.date.today().isoformat()} · torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if check.cuda else "") + f" · {seconds:.0f} s in all"
        + (" · --short: a tiny tree and model, to keep the script working, not figures to quote"
           if check.sizes is SHORT else ""),
        "",
        "<!-- not run by the tests: minutes on a CUDA GPU -->",
        "```bash",
        f"{reproduce}",
        "```",
        "",
        "Each row: what was measured, its figure, what else it showed, and the command that gave it (what each "
        "step does: the docstring of benchmarks/gpu_check.py). "
        "In the commands, `$WORK` is the script's scratch folder, `$TREE` the overrides that read its tree ("
        f"`{cell(' '.join(throughput.tree_overrides(Path('$WORK/tree'))))}`)"
        + (f" and `$TINY` the tiny model (`{' '.join(check.sizes.model)}`)" if check.sizes.model else "") + ".",
        "",
        "| row | figure | detail | command |",
        "|---|---|---|---|",
        *(f"| {r.name} | {cell(r.figure)} | {cell(r.detail)} | {f'`{cell(r.command)}`' if r.command else ''} |"
          for r in check.rows),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="tiny sizes for the CPU (CI): seconds, not figures")
    parser.add_argument("--out", type=Path, help="the table's file (default docs/gpu.md; --short: a temporary file)")
    parser.add_argument("--mcan-vqa", type=Path, help="a checkout of MILVLG/mcan-vqa (its Net is imported)")
    parser.add_argument("--device", help="cuda when torch sees a GPU, else cpu")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="every step ends within this many seconds")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.out is None:
        args.out = (Path(tempfile.mkstemp(prefix="gpu_check_", suffix=".md")[1]) if args.short
                    else ROOT / "docs/gpu.md")
    if args.mcan_vqa and not (args.mcan_vqa / "core/model/net.py").is_file():
        sys.exit(f"{args.mcan_vqa}: no core/model/net.py (a checkout of github.com/MILVLG/mcan-vqa goes there)")
    python = (".venv/bin/python" if Path(sys.executable).parent == ROOT / ".venv/bin" else "PYTHONPATH=src python3")
    reproduce = " ".join([f"{python} benchmarks/gpu_check.py",
                          *(["--short"] if args.short else []),
                          *([f"--mcan-vqa {args.mcan_vqa}"] if args.mcan_vqa else [])])
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        check = GpuCheck(work, device, SHORT if args.short else FULL, start + args.budget_s,
                         args.mcan_vqa.resolve() if args.mcan_vqa else None)
        steps = [(cuda_tests, "CUDA tests"), (data, "data"), (lambda c: run_check(c, "fp16"), "check, AMP fp16"),
                 (lambda c: run_check(c, "bf16"), "check, AMP bf16"), (resume, "resume after SIGTERM"),
                 (throughput_rows, "train fp32")]
        for fn, name in steps:
            print(f"[{time.monotonic() - start:5.0f} s] {name} ...", file=sys.stderr, flush=True)
            try:
                check.rows += fn(check)
            except StepFailed as e:
                check.rows.append(Row(name, e.figure, "", e.command, holds=False))
                if name == "data":
                    break  # nothing after it has data to read
            except Exception as e:  # a surprise in one step: the others still run and the table is written
                traceback.print_exc()
                check.rows.append(Row(name, f"failed: {type(e).__name__}: {e}", "", "", holds=False))
        for name in ROWS:  # a step that never ran (or broke before its rows) still has its row
            if name not in {r.name for r in check.rows}:
                check.rows.append(Row(name, "not run: an earlier step failed (see above)", "", "", holds=False))
        check.rows.sort(key=lambda r: ROWS.index(r.name))
        table = markdown(check, time.monotonic() - start, reproduce)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    print(f"written to {args.out}")
    return 0 if all(r.holds for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
