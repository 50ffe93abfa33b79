"""`accuvqa plot`: a PNG of accuracy, losses and learning rate per epoch, of one run or several."""

import json

import numpy as np
import pytest
from PIL import Image

from accuvqa.config import load_config
from accuvqa.errors import ConfigError
from accuvqa.plot import PANELS, draw_runs, read_metrics, run_versions
from conftest import run_cli

# matplotlib's colour cycle, splits sorted: test's lines come first, then val's
VAL_OVERALL_ACCURACY = np.array([0xD6, 0x27, 0x28])  # 4th line of the accuracy panel (C3)
VAL_LOSS = np.array([0xFF, 0x7F, 0x0E])  # 2nd line of the loss panel (C1)


def _write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _run_lines(shift: float, epochs=(1, 2, 3)) -> list[dict]:
    """Training-time val lines with the epoch's training loss and learning rate, as `train` writes them."""
    return [{"epoch": e, "step": 10 * e, "split": "val", "accuracy": 50.0 + 10 * e + shift, "loss": 1.0 / e + shift,
             "per_answer_type": {"yes/no": 60.0 + 5 * e, "other": 40.0 + 15 * e},
             "train_loss": 2.0 / e + shift, "lr": 1e-3 * min(e, 2) / 4} for e in epochs]


def _pixels(path) -> np.ndarray:
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1100, 800)
    return np.asarray(image.convert("RGB")).astype(int)


def _columns(pixels: np.ndarray, colour: np.ndarray, rows: slice, cols: slice) -> int:
    """From the first to the last pixel column of one panel that holds that colour."""
    found = np.flatnonzero((np.abs(pixels[rows, cols] - colour).sum(axis=2) < 30).any(axis=0))
    return int(found[-1] - found[0]) if len(found) else 0


def test_plot_writes_a_png_with_a_curve_in_each_panel(tmp_path):
    lines = _run_lines(0.0)
    lines.append({"epoch": 3, "step": None, "split": "test", "accuracy": 79.0, "loss": 0.4,
                  "per_answer_type": {"yes/no": 75.0, "other": 85.0}})
    _write_metrics(tmp_path / "res" / "p1", lines)
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "p1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote res/p1/metrics.png"
    pixels = _pixels(tmp_path / "res/p1/metrics.png")
    # a line from epoch 1 to epoch 3 crosses most of its panel's width (a legend swatch: ~20 columns)
    top, bottom, left, right = slice(0, 400), slice(400, 800), slice(0, 550), slice(550, 1100)
    assert _columns(pixels, VAL_OVERALL_ACCURACY, top, left) > 300
    assert _columns(pixels, VAL_LOSS, top, right) > 300
    first = np.array([0x1F, 0x77, 0xB4])  # C0: the only line of the training-loss and learning-rate panels
    assert _columns(pixels, first, bottom, left) > 300 and _columns(pixels, first, bottom, right) > 300


def test_one_run_draws_each_metric_of_its_lines():
    lines = _run_lines(0.0)
    fig = draw_runs({"p1": lines})
    acc, eval_loss, train_loss, lr = fig.axes
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in acc.get_lines()}
    assert curves == {"val overall": ([1, 2, 3], [60.0, 70.0, 80.0]), "val other": ([1, 2, 3], [55.0, 70.0, 85.0]),
                      "val yes/no": ([1, 2, 3], [65.0, 70.0, 75.0])}
    assert [list(x.get_ydata()) for x in eval_loss.get_lines()] == [[1.0, 0.5, 1 / 3]]
    assert [list(x.get_ydata()) for x in train_loss.get_lines()] == [[2.0, 1.0, 2 / 3]]
    assert [list(x.get_ydata()) for x in lr.get_lines()] == [[2.5e-4, 5e-4, 5e-4]]


def test_several_runs_draw_one_line_per_run_in_each_panel():
    runs = {"k1": _run_lines(0.0), "k4": _run_lines(0.5), "k8": _run_lines(1.0, epochs=(1, 2))}
    fig = draw_runs(runs)
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 3, ax.get_title()
        assert len({line.get_linestyle() for line in lines}) == 3  # runs that overlap stay distinguishable
    acc, eval_loss, train_loss, lr = fig.axes
    assert [x.get_label() for x in acc.get_lines()] == ["k1 val overall", "k4 val overall", "k8 val overall"]
    for line, (version, run) in zip(train_loss.get_lines(), runs.items()):
        assert line.get_label() == version
        assert list(line.get_xdata()) == [x["epoch"] for x in run]
        assert list(line.get_ydata()) == [x["train_loss"] for x in run]
    assert list(eval_loss.get_lines()[1].get_ydata()) == [x["loss"] for x in runs["k4"]]


def test_plot_of_several_runs_writes_the_out_file(tmp_path):
    _write_metrics(tmp_path / "res/k1", _run_lines(0.0))
    _write_metrics(tmp_path / "res/k4", _run_lines(5.0))
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "k1,k4", "--out", "cmp.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote cmp.png"
    pixels = _pixels(tmp_path / "cmp.png")
    top, left = slice(0, 400), slice(0, 550)
    for colour in ([0x1F, 0x77, 0xB4], [0xFF, 0x7F, 0x0E]):  # C0: k1, C1: k4
        assert _columns(pixels, np.array(colour), top, left) > 300
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "k1,k4", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "wrote res/compare_k1_k4.png", r.stderr
    assert _pixels(tmp_path / "res/compare_k1_k4.png").std() > 10


def test_a_run_without_evaluations_plots_its_training_loss(tmp_path):
    lines = [{"epoch": e, "step": 5 * e, "split": "train", "train_loss": 1.0 / e, "lr": 1e-3} for e in (1, 2)]
    _write_metrics(tmp_path / "t", lines)
    fig = draw_runs({"t": read_metrics(tmp_path / "t/metrics.jsonl")})
    acc, _, train_loss, _ = fig.axes
    assert acc.get_lines() == [] and "not recorded" in [t.get_text() for t in acc.texts]
    assert list(train_loss.get_lines()[0].get_ydata()) == [1.0, 0.5]


def test_plot_of_a_run_without_metrics_is_one_line_exit_2(tmp_path):
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "none", cwd=tmp_path)
    assert r.returncode == 2 and "no metrics file res/none/metrics.jsonl: train a run first" in r.stderr


def test_a_missing_run_among_several_is_named_with_the_runs_there(tmp_path):
    _write_metrics(tmp_path / "res/k1", _run_lines(0.0))
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "k1,k2", "--out", "x.png", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no metrics file res/k2/metrics.jsonl: train a run first (accuvqa train --VERSION k2); " \
           "runs with metrics in res: k1" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("version,message", [("a,,b", "has an empty run name"), ("a,b,a", "names a twice")])
def test_a_bad_list_of_runs_is_a_config_error(version, message):
    with pytest.raises(ConfigError, match=message):
        run_versions(load_config(overrides={"VERSION": version}))


def test_a_malformed_metrics_line_is_named(tmp_path):
    _write_metrics(tmp_path / "m", [{"epoch": 1, "split": "val"}])
    with pytest.raises(Exception, match="line 1 is not a metrics line"):
        read_metrics(tmp_path / "m/metrics.jsonl")
