"""What a run records beside its checkpoints: config.yml, log.txt, TensorBoard events; progress lines."""

import argparse
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from accuvqa.config import load_config
from accuvqa.evaluate import main as eval_main
from accuvqa.runlog import PlainProgress, RunLog, progress, save_config
from accuvqa.train import train
from conftest import TINY, write_vqa_layout

UPDATE_LINE = re.compile(r"update (\d+) \(epoch (\d)\): train loss (\S+), lr (\S+), grad norm (\S+), (\d+) samples/s")


def _cfg(root: Path, **more):
    """A tiny MCAN on 50 generated questions: 5 updates of 10 per epoch, evaluated on 50 val questions."""
    layout = write_vqa_layout(root, images_per_split=10)
    return load_config(overrides={
        **TINY, "DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": 12,
        "BATCH_SIZE": 10, "CKPTS_PATH": str(root / "ck"), "RESULT_PATH": str(root / "res"), "VERSION": "r",
        "MAX_EPOCH": 2, "LOG_EVERY_STEPS": 2, "VERBOSE": True, **more})


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.RESULT_PATH) / "r/metrics.jsonl").read_text().splitlines()]


def _events(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's event files, read back with TensorBoard's own reader: {tag: {step: value}}."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install accuvqa[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _update_lines(log_text: str) -> dict[int, tuple[float, float, float]]:
    """log.txt's training points: {update: (loss, lr, grad norm)}."""
    return {int(m[1]): (float(m[3]), float(m[4]), float(m[5])) for m in UPDATE_LINE.finditer(log_text)}


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """A two-epoch run with TensorBoard installed, and what it printed on stderr."""
    root = tmp_path_factory.mktemp("tb")
    cfg = _cfg(root)
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        train(cfg)
    finally:
        sys.stderr = old
    return cfg, err.getvalue()


@pytest.mark.slow
def test_tensorboard_events_hold_the_figures_of_metrics_jsonl_and_log_txt(tensorboard_run):
    cfg, _ = tensorboard_run
    run_dir = Path(cfg.RESULT_PATH) / "r"
    scalars = _events(run_dir)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "val/accuracy",
                            "val/accuracy/yes/no", "val/accuracy/other", "val/loss"}
    # a training point every LOG_EVERY_STEPS (2) updates of an epoch, and at its end (5 updates per epoch)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"):
        assert sorted(scalars[tag]) == [2, 4, 5, 7, 9, 10], tag
    # MCAN's warm-up, counted by hand: LR_BASE x 1/4 for the first epoch's 5 updates, x 2/4 for the next 5
    assert [scalars["train/lr"][s] for s in (2, 4, 5, 7, 9, 10)] == pytest.approx([2.5e-5] * 3 + [5e-5] * 3)
    assert all(v > 0 for v in scalars["train/samples_per_s"].values())

    lines = _metrics(cfg)
    assert [(x["split"], x["epoch"], x["step"]) for x in lines] == [("val", 1, 5), ("val", 2, 10)]
    for line in lines:
        step = line["step"]
        assert scalars["val/accuracy"][step] == pytest.approx(line["accuracy"], rel=1e-6)
        for answer_type, value in line["per_answer_type"].items():
            assert scalars[f"val/accuracy/{answer_type}"][step] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert scalars["val/loss"][step] == pytest.approx(line["loss"], rel=1e-6)
        # the epoch's last training point is the epoch's training loss, with the learning rate it ended on
        assert scalars["train/loss"][step] == pytest.approx(line["train_loss"], rel=1e-6)
        assert scalars["train/lr"][step] == pytest.approx(line["lr"], rel=1e-6)

    log_text = (run_dir / "log.txt").read_text()
    points = _update_lines(log_text)
    assert sorted(points) == [2, 4, 5, 7, 9, 10]
    for step, (loss, lr, grad_norm) in points.items():
        assert loss == pytest.approx(scalars["train/loss"][step], rel=1e-5)
        assert lr == pytest.approx(scalars["train/lr"][step], rel=1e-5)
        assert grad_norm == pytest.approx(scalars["train/grad_norm"][step], rel=1e-5)


@pytest.mark.slow
def test_log_txt_holds_the_start_the_epochs_the_evaluations_and_the_end(tensorboard_run):
    cfg, _ = tensorboard_run
    text = (Path(cfg.RESULT_PATH) / "r/log.txt").read_text()
    messages = [line.split(" ", 3)[3] for line in text.splitlines()]
    assert messages[0].startswith("run r starts; config ") and messages[0].endswith("TensorBoard events written")
    assert messages[1].startswith("train: 50 questions, 10 images; 5 updates/epoch; BATCH_SIZE 10 = 10 x 1 x 1")
    epochs = [m for m in messages if m.startswith("epoch ")]
    assert len(epochs) == 2 and all("val accuracy" in m and "; saved " in m for m in epochs)
    line = _metrics(cfg)[1]
    assert f"epoch 2: train loss {line['train_loss']:.4f}" in epochs[1]
    assert f"val accuracy {line['accuracy']:.2f}%" in epochs[1] and epochs[1].endswith("ckpt_r/epoch2.pkl")
    assert messages[-1] == "run r finished"


@pytest.mark.slow
def test_config_yml_loads_back_to_the_run_config(tensorboard_run):
    cfg, _ = tensorboard_run
    assert load_config(Path(cfg.RESULT_PATH) / "r/config.yml") == cfg


def test_config_yml_keeps_values_yaml_would_misread(tmp_path):
    # values YAML would read as another type, mappings, derived and unset keys
    tricky = load_config(overrides={"VERSION": "'007'", "WORD_VECTORS": "'yes'", "GRAD_ACCU_STEPS": "auto",
                                    "OPT_PARAMS": "{weight_decay: 0.01, amsgrad: true}", "LR_BASE": "1e-4",
                                    "TOKEN_DICT_PATH": "'a: b # c'", "AMP": "'off'", "RESULT_PATH": str(tmp_path)})
    path = save_config(tricky)
    assert path == tmp_path / "007/config.yml"
    assert load_config(path) == tricky and load_config(path).FF_SIZE == tricky.FF_SIZE == 2048


@pytest.mark.slow
def test_off_a_terminal_training_and_evaluation_print_a_plain_line_every_n_steps(tensorboard_run):
    cfg, stderr = tensorboard_run
    scalars = _events(Path(cfg.RESULT_PATH) / "r")
    lines = [x for x in stderr.splitlines() if x.startswith("epoch 1/2: ")]
    assert [x.split()[2] for x in lines] == ["2/5", "4/5", "5/5"]
    assert f"loss {scalars['train/loss'][4]:.4f}, lr 2.50e-05, samples_s " in lines[1]
    assert "\r" not in stderr  # no bar redrawn in a log file
    evals = [x.split()[2] for x in stderr.splitlines() if x.startswith("eval val: ")]
    assert evals == ["2/5", "4/5", "5/5"] * 2  # 50 val questions in batches of 10, evaluated twice


@pytest.mark.slow
def test_without_tensorboard_a_run_writes_the_same_metrics_and_no_events(tensorboard_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails
    with_tb, _ = tensorboard_run
    cfg = _cfg(tmp_path)
    train(cfg)
    run_dir = tmp_path / "res/r"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yml", "log.txt", "metrics.jsonl"]
    assert _metrics(cfg) == _metrics(with_tb)  # same numbers, CPU runs are deterministic
    text = (run_dir / "log.txt").read_text()
    assert "TensorBoard events off (pip install accuvqa[tensorboard])" in text.splitlines()[0]
    assert _update_lines(text) == _update_lines((Path(with_tb.RESULT_PATH) / "r/log.txt").read_text())


@pytest.mark.slow
def test_a_resumed_run_appends_to_its_log_and_its_events_go_on(tmp_path, capsys):
    cfg = _cfg(tmp_path, MAX_EPOCH=1, EVAL_EVERY_EPOCH=False)
    train(cfg)
    run_dir = tmp_path / "res/r"
    first = (run_dir / "log.txt").read_text()
    train(cfg.replace(MAX_EPOCH=2, RESUME=True))
    text = (run_dir / "log.txt").read_text()
    assert text.startswith(first) and "run r resumes at update 5; config" in text[len(first):]
    assert sorted(_update_lines(text)) == [2, 4, 5, 7, 9, 10]
    assert sorted(_events(run_dir)["train/loss"]) == [2, 4, 5, 7, 9, 10]
    assert "val/accuracy" not in _events(run_dir)
    # without an evaluation, the epoch's training loss and learning rate are a line of their own
    lines = _metrics(cfg)
    assert [(x["split"], x["epoch"], x["step"], set(x)) for x in lines] == [
        ("train", e, 5 * e, {"epoch", "step", "split", "train_loss", "lr"}) for e in (1, 2)]
    assert lines[1]["train_loss"] == pytest.approx(_events(run_dir)["train/loss"][10], rel=1e-6)
    assert load_config(run_dir / "config.yml") == cfg.replace(MAX_EPOCH=2, RESUME=True)
    # `accuvqa val` appends its summary to the same log
    assert eval_main(cfg.replace(MAX_EPOCH=2), argparse.Namespace(command="val")) == 0
    after = (run_dir / "log.txt").read_text()
    assert after.startswith(text) and f"  accuracy           {_metrics(cfg)[-1]['accuracy']:.2f}%" in after
    package = logging.getLogger("accuvqa")
    assert package.level == logging.NOTSET and not package.handlers  # nothing left behind by the runs


def test_a_run_log_not_on_the_first_process_writes_nothing(tmp_path):
    cfg = load_config(overrides={"RESULT_PATH": str(tmp_path / "res"), "VERSION": "r"})
    with RunLog(cfg, enabled=False) as runlog:
        assert runlog.training(3, 0, 1.5, 1e-4, 2.0, 100.0) == {"loss": "1.5000", "lr": "1.00e-04", "samples_s": "100"}
        runlog.evaluation({"split": "val", "step": 3, "accuracy": 50.0, "per_answer_type": {}, "loss": 1.0})
        runlog.note("nothing")
    assert not (tmp_path / "res").exists()


def test_plain_progress_prints_every_n_steps_and_the_last():
    out = io.StringIO()
    bar = progress(total=7, desc="epoch 1/1", every=3, file=out)
    assert isinstance(bar, PlainProgress)
    for step in range(1, 8):
        bar.set_postfix({"loss": f"{1 / step:.2f}"})
        bar.update(1)
    bar.close()
    assert [re.sub(r"\[\d+ s\]", "[t]", x) for x in out.getvalue().splitlines()] == [
        "epoch 1/1: 3/7 [t], loss 0.33", "epoch 1/1: 6/7 [t], loss 0.17", "epoch 1/1: 7/7 [t], loss 0.14"]
    out = io.StringIO()
    assert list(progress(range(25), desc="features", every=10, file=out)) == list(range(25))
    assert [x.split(" [")[0] for x in out.getvalue().splitlines()] == ["features: 10/25", "features: 20/25",
                                                                        "features: 25/25"]
    resumed = io.StringIO()
    bar = progress(total=10, initial=4, desc="e", every=5, file=resumed)
    for _ in range(6):
        bar.update(1)
    assert [x.split(" [")[0] for x in resumed.getvalue().splitlines()] == ["e: 5/10", "e: 10/10"]


def test_progress_on_a_terminal_is_a_bar_and_silent_when_disabled():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(total=3, desc="x", every=1, file=Terminal()), tqdm)
    quiet = io.StringIO()
    bar = progress(range(3), desc="x", every=1, file=quiet, disable=True)
    assert list(bar) == [0, 1, 2] and quiet.getvalue() == ""
