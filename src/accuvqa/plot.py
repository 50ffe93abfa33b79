"""`accuvqa plot`: accuracy, losses and learning rate per epoch from runs' metrics.jsonl, as a PNG.

One run: accuracy overall and per answer type, evaluation loss, training loss and learning rate.
Several runs (`--VERSION a,b,c`): the same panels with one line per run, to compare them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from accuvqa.config import Config
from accuvqa.errors import ConfigError, DataError
from accuvqa.files import atomic_write

PANELS = ("accuracy", "evaluation loss", "training loss", "learning rate")  # the axes' titles, in order
_STYLES = (("-", "o"), ("--", "x"), (":", "s"), ("-.", "^"))  # one per run, so overlapping runs stay visible


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl file (evaluations, epochs' training figures); a clear error when missing
    or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no metrics file {path}: train a run first (accuvqa train --VERSION ...)")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            line["split"]
            float(line["accuracy"] if "accuracy" in line else line["train_loss"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} line {number} is not a metrics line "
                            f"(JSON with 'epoch', 'split', 'accuracy' or 'train_loss')") from None
        lines.append(line)
    if not lines:
        raise DataError(f"{path} holds no evaluation yet")
    return lines


def run_versions(cfg: Config) -> list[str]:
    """The runs named by VERSION: one name, or several separated by commas."""
    versions = [v.strip() for v in cfg.run_version.split(",")]
    if "" in versions:
        raise ConfigError(f"VERSION {cfg.run_version!r} has an empty run name: write --VERSION a,b,c")
    twice = sorted({v for v in versions if versions.count(v) > 1})
    if twice:
        raise ConfigError(f"VERSION {cfg.run_version!r} names {', '.join(twice)} twice")
    return versions


def _by_epoch(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the lines holding `key`, in epoch order; a later line wins for one epoch."""
    values = {line.get("epoch") or 0: line[key] for line in lines if line.get(key) is not None}
    return sorted(values), [values[e] for e in sorted(values)]


def draw_runs(runs: Mapping[str, list[dict]]) -> Any:
    """A matplotlib Figure of the runs' metrics lines, one panel per PANELS entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    acc_ax, eval_ax, train_ax, lr_ax = grid.flat
    several = len(runs) > 1
    for i, (version, lines) in enumerate(runs.items()):
        linestyle, marker = _STYLES[i % len(_STYLES)] if several else ("-", "o")
        style = {"linestyle": linestyle, "marker": marker, "color": f"C{i}"} if several else {"marker": marker}
        name = f"{version} " if several else ""
        by_split: dict[str, list[dict]] = defaultdict(list)
        for line in lines:
            if "accuracy" in line:
                by_split[line["split"]].append(line)
        for split, evaluations in sorted(by_split.items()):
            evaluations = sorted(evaluations, key=lambda x: x.get("epoch") or 0)
            epochs = [x.get("epoch") or 0 for x in evaluations]
            acc_ax.plot(epochs, [x["accuracy"] for x in evaluations], label=f"{name}{split} overall", **style)
            if not several:  # per answer type: one run only, or the panel is unreadable
                for answer_type in sorted({t for x in evaluations for t in x.get("per_answer_type", {})}):
                    acc_ax.plot(epochs, [x.get("per_answer_type", {}).get(answer_type) for x in evaluations],
                                marker=marker, linestyle="--", alpha=0.7, label=f"{split} {answer_type}")
            losses = [x.get("loss") for x in evaluations]
            if any(v is not None for v in losses):
                eval_ax.plot(epochs, losses, label=f"{name}{split}", **style)
        for ax, key in ((train_ax, "train_loss"), (lr_ax, "lr")):
            epochs, values = _by_epoch(lines, key)
            if epochs:
                ax.plot(epochs, values, label=version if several else "train", **style)
    acc_ax.set(ylabel="VQA accuracy (%)")
    eval_ax.set(ylabel="BCE per question", yscale="log")
    train_ax.set(ylabel="BCE per question (epoch mean)", yscale="log")
    lr_ax.set(ylabel="learning rate at the epoch's end")
    for ax, title in zip(grid.flat, PANELS):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    if several:
        fig.suptitle("runs " + ", ".join(runs))
    fig.tight_layout()
    return fig


def plot_runs(metrics_paths: Mapping[str, str | Path], out_path: str | Path) -> Path:
    """Read each run's metrics.jsonl ({version: path}), draw them into one PNG at `out_path`."""
    import matplotlib.pyplot as plt

    fig = draw_runs({version: read_metrics(path) for version, path in metrics_paths.items()})
    try:
        return atomic_write(out_path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """One run's metrics.jsonl as a PNG."""
    return plot_runs({Path(metrics_path).parent.name: metrics_path}, out_path)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa plot`: one run -> <RESULT_PATH>/<VERSION>/metrics.png; several -> one picture comparing them."""
    versions = run_versions(cfg)
    results = Path(cfg.RESULT_PATH)
    paths = {v: results / v / "metrics.jsonl" for v in versions}
    for version, path in paths.items():
        if not path.is_file():
            known = sorted(p.parent.name for p in results.glob("*/metrics.jsonl"))
            raise DataError(f"no metrics file {path}: train a run first (accuvqa train --VERSION {version}); "
                            + (f"runs with metrics in {results}: {', '.join(known)}" if known
                               else f"no run in {results} has metrics yet"))
    out = getattr(args, "out", None) or (results / versions[0] / "metrics.png" if len(versions) == 1
                                         else results / f"compare_{'_'.join(versions)}.png")
    print(f"wrote {plot_runs(paths, out)}")
    return 0
