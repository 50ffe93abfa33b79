"""`accuvqa plot`: accuracy and loss per epoch from a run's metrics.jsonl, as a PNG."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from accuvqa.config import Config
from accuvqa.errors import DataError
from accuvqa.files import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    """The evaluation lines of a metrics.jsonl file; a clear error when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no metrics file {path}: train a run first (accuvqa train --VERSION ...)")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            float(line["accuracy"]), line["split"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} line {number} is not a metrics line "
                            f"(JSON with 'epoch', 'split', 'accuracy')") from None
        lines.append(line)
    if not lines:
        raise DataError(f"{path} holds no evaluation yet")
    return lines


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot accuracy (overall and per answer type) and loss against epoch for every split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_split: dict[str, list[dict]] = defaultdict(list)
    for line in read_metrics(metrics_path):
        by_split[line["split"]].append(line)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, lines in sorted(by_split.items()):
        lines.sort(key=lambda x: x.get("epoch") or 0)
        epochs = [x.get("epoch") or 0 for x in lines]
        marker = "o" if len(lines) > 1 else "s"
        acc_ax.plot(epochs, [x["accuracy"] for x in lines], marker=marker, label=f"{split} overall")
        for answer_type in sorted({t for x in lines for t in x.get("per_answer_type", {})}):
            acc_ax.plot(epochs, [x.get("per_answer_type", {}).get(answer_type) for x in lines],
                        marker=marker, linestyle="--", alpha=0.7, label=f"{split} {answer_type}")
        losses = [x.get("loss") for x in lines]
        if any(v is not None for v in losses):
            loss_ax.plot(epochs, losses, marker=marker, label=split)
    acc_ax.set(xlabel="epoch", ylabel="VQA accuracy (%)", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="BCE per question", title="evaluation loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(out_path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """`accuvqa plot`: <RESULT_PATH>/<VERSION>/metrics.png from the run's metrics.jsonl."""
    run_dir = Path(cfg.RESULT_PATH) / cfg.run_version
    print(f"wrote {plot_metrics(run_dir / 'metrics.jsonl', run_dir / 'metrics.png')}")
    return 0
