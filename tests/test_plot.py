"""`accuvqa plot`: a PNG of accuracy and loss per epoch, with the curves drawn."""

import json

import numpy as np
from PIL import Image

from conftest import run_cli

# matplotlib's colour cycle, splits sorted: test's lines come first, then val's
VAL_OVERALL_ACCURACY = np.array([0xD6, 0x27, 0x28])  # 4th line of the accuracy panel (C3)
VAL_LOSS = np.array([0xFF, 0x7F, 0x0E])  # 2nd line of the loss panel (C1)


def _write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_plot_writes_a_png_with_a_curve_in_each_panel(tmp_path):
    lines = [{"epoch": e, "step": 10 * e, "split": "val", "accuracy": 50.0 + 10 * e, "loss": 1.0 / e,
              "per_answer_type": {"yes/no": 60.0 + 5 * e, "other": 40.0 + 15 * e}} for e in (1, 2, 3)]
    lines.append({"epoch": 3, "step": None, "split": "test", "accuracy": 79.0, "loss": 0.4,
                  "per_answer_type": {"yes/no": 75.0, "other": 85.0}})
    _write_metrics(tmp_path / "res" / "p1", lines)
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "p1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote res/p1/metrics.png"
    image = Image.open(tmp_path / "res/p1/metrics.png")
    assert image.format == "PNG" and image.size == (1100, 400)
    pixels = np.asarray(image.convert("RGB")).astype(int)

    def columns(colour: np.ndarray, half: slice) -> int:
        """How many pixel columns of one panel hold that colour."""
        return int((np.abs(pixels[:, half] - colour).sum(axis=2) < 30).any(axis=0).sum())

    # a line from epoch 1 to epoch 3 crosses most of its panel's width (a legend swatch: ~20 columns)
    assert columns(VAL_OVERALL_ACCURACY, slice(0, 550)) > 300
    assert columns(VAL_LOSS, slice(550, 1100)) > 300


def test_plot_of_a_run_without_metrics_is_one_line_exit_2(tmp_path):
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "none", cwd=tmp_path)
    assert r.returncode == 2 and "no metrics file res/none/metrics.jsonl: train a run first" in r.stderr
