"""Training: MCAN's schedule, the sampler, GRAD_ACCU_STEPS invariance, and the CLI end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accuvqa.checkpoint import load_checkpoint
from accuvqa.config import load_config
from accuvqa.accumulate import GradientAccumulator
from accuvqa.models import build_model
from accuvqa.data.loader import epoch_batches, make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.runtime import Runtime, to_device
from accuvqa.train import lr_at, make_loss_fn, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"LAYER": 1, "HIDDEN_SIZE": 32, "MULTI_HEAD": 4, "FF_SIZE": 64, "FLAT_MLP_SIZE": 32,
        "FLAT_OUT_SIZE": 64, "WORD_EMBED_SIZE": 16, "NUM_THREADS": 2, "VERBOSE": False}


def test_lr_schedule_warms_up_then_decays_like_mcan():
    cfg = load_config(overrides={"LR_BASE": 1.0, "LR_DECAY_R": 0.5, "LR_DECAY_LIST": [4, 5]})
    per_epoch = 10.5  # data_size / BATCH_SIZE, as mcan-vqa counts it
    # hand-worked: warm-up thresholds int(10.5 * k) = 10, 21, 31 updates
    assert [lr_at(cfg, u, 0, per_epoch) for u in (1, 10)] == [0.25, 0.25]
    assert [lr_at(cfg, u, 1, per_epoch) for u in (11, 21)] == [0.5, 0.5]
    assert [lr_at(cfg, u, 2, per_epoch) for u in (22, 31)] == [0.75, 0.75]
    assert lr_at(cfg, 32, 3, per_epoch) == 1.0
    assert lr_at(cfg, 45, 4, per_epoch) == 0.5  # 0-based epoch 4: first decay
    assert lr_at(cfg, 60, 5, per_epoch) == 0.25


@pytest.mark.parametrize("world", [2, 4])
def test_sample_order_does_not_depend_on_the_number_of_processes(world):
    cfg = load_config(overrides={"BATCH_SIZE": 8, "SEED": 3})
    single = epoch_batches(50, cfg, epoch=1, rt=Runtime(torch.device("cpu")))
    shares = [epoch_batches(50, cfg, 1, Runtime(torch.device("cpu"), rank=r, world_size=world))
              for r in range(world)]
    assert len(single) == 6  # 50 // 8 full batches; the rest is dropped, as mcan-vqa
    for b, batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([s[b] for s in shares]), batch)
    other_epoch = epoch_batches(50, cfg, epoch=2, rt=Runtime(torch.device("cpu")))
    assert not np.array_equal(np.concatenate(single), np.concatenate(other_epoch))


def _twenty_updates(cfg, train_set, held_out_batch, vocab, accu: int) -> torch.Tensor:
    """20 updates exactly as `train` makes them (same pieces), then outputs on held-out inputs."""
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix))
    optimizer = torch.optim.Adam(model.parameters(), betas=cfg.OPT_BETAS, eps=cfg.OPT_EPS)
    acc = GradientAccumulator(model, optimizer, micro_batches=accu, reduction=cfg.LOSS_REDUCTION)
    batches = epoch_batches(len(train_set), cfg, 0, Runtime(torch.device("cpu")))[:20]
    for step, indices in enumerate(batches, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, 0, len(train_set) / cfg.BATCH_SIZE)
        acc.step(to_device(train_set[indices], torch.device("cpu")), make_loss_fn(cfg))
    model.eval()
    with torch.no_grad():
        return model(held_out_batch["img_feat"], held_out_batch["ques_ix"])


def test_grad_accu_steps_does_not_change_what_is_learned(easyvqa_slice):
    """The demo's config, DROPOUT_R 0: 20 updates of BATCH_SIZE 64 in 1, 4 and 7 (uneven) pieces."""
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        "VERBOSE": False, "DATASET_PATH": easyvqa_slice["DATASET_PATH"],
        "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"], "DROPOUT_R": 0})
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    train_set = make_dataset(cfg, records, vocab)
    held_out = make_dataset(cfg, load_records(cfg, "test", need_answers=True)[:300], vocab)
    held_out_batch = held_out[list(range(len(held_out)))]
    outputs = {k: _twenty_updates(cfg, train_set, held_out_batch, vocab, k) for k in (1, 4, 7)}
    diffs = {k: float((outputs[k] - outputs[1]).abs().max()) for k in (4, 7)}
    print("max |logit diff| after 20 updates vs GRAD_ACCU_STEPS 1:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    assert (outputs[1].std(dim=0) > 1e-2).any()  # the model did learn something input-dependent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "accuvqa.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_evaluates_tests_and_predicts_on_a_slice(easyvqa_slice, tmp_path):
    common = ["--config", str(ROOT / "configs/easyvqa.yml"), "--DATASET_PATH", easyvqa_slice["DATASET_PATH"],
              "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"], "--CKPTS_PATH", "ck", "--RESULT_PATH", "res",
              "--VERSION", "e2e"] + [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    r = run_cli("train", *common, "--MAX_EPOCH", "2", "--GRAD_ACCU_STEPS", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "effective batch" in r.stdout and "BATCH_SIZE 64 = 22 x 3 x 1" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "res/e2e/metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["split"]) for x in lines] == [(1, "val"), (2, "val")]
    assert set(lines[0]) >= {"epoch", "step", "split", "accuracy", "per_answer_type", "loss"}
    assert 0 <= lines[1]["accuracy"] <= 100 and set(lines[1]["per_answer_type"]) == {"yes/no", "other"}

    state = load_checkpoint(tmp_path / "ck/ckpt_e2e/epoch2.pkl")
    assert {"state_dict", "optimizer", "lr_base", "config", "step", "vocab_fingerprint"} <= set(state)
    assert "backbone.enc_list.0.mhatt.linear_q.weight" in state["state_dict"]

    r = run_cli("val", *common, "--CKPT_EPOCH", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"accuracy           {lines[1]['accuracy']:.2f}%" in r.stdout  # same model, same split

    r = run_cli("test", *common, "--CKPT_EPOCH", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    submission = json.loads((tmp_path / "res/e2e/result_test.json").read_text())
    questions = json.loads(Path(easyvqa_slice["DATASET_PATH"], "v2_OpenEnded_mscoco_test2015_questions.json").read_text())
    assert [s["question_id"] for s in submission] == [q["question_id"] for q in questions["questions"]]
    assert all(isinstance(s["answer"], str) for s in submission)

    image = next(Path(easyvqa_slice["root"]).rglob("*.npz"))
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", str(image),
                "--question", "What color is the shape?", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split(maxsplit=1) for line in r.stdout.strip().splitlines()]
    assert len(rows) == 5 and all(0.0 <= float(s) <= 1.0 for s, _ in rows)
    assert [float(s) for s, _ in rows] == sorted((float(s) for s, _ in rows), reverse=True)

    import easy_vqa
    png = easy_vqa.get_test_image_paths()[0]
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", png, "--question", "Is there a circle?",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 5
    r = run_cli("predict", *common, "--CKPT_EPOCH", "2", "--image", "nope.png", "--question", "?", cwd=tmp_path)
    assert r.returncode == 2 and "image nope.png does not exist" in r.stderr

    # a second run under the same name never overwrites the first one's checkpoints
    before = (tmp_path / "ck/ckpt_e2e/epoch2.pkl").read_bytes()
    r = run_cli("train", *common, cwd=tmp_path)
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "ck/ckpt_e2e/epoch2.pkl").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["train", "--HIDEN_SIZE", "4"], "did you mean HIDDEN_SIZE"),
    (["train", "--BATCH_SIZE", "many"], "BATCH_SIZE: expected int, got 'many'"),
    (["train", "--HIDDEN_SIZE", "30", "--MULTI_HEAD", "8"], "must be divisible by MULTI_HEAD"),
    (["train", "--BATCH_SIZE", "4", "--GRAD_ACCU_STEPS", "5"], "larger than the per-process batch"),
    (["val", "--DATASET_PATH", "nowhere", "--CKPT_PATH", "missing.pkl"], "checkpoint missing.pkl does not exist"),
    (["train", "--DATASET_PATH", "nowhere"], "missing train question file nowhere/v2_OpenEnded_mscoco_train2014"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_yaml_syntax_error_names_line(tmp_path):
    (tmp_path / "bad.yml").write_text("LAYER: 2\nHIDDEN_SIZE: [1\n")
    r = run_cli("train", "--config", "bad.yml", cwd=tmp_path)
    assert r.returncode == 2 and "YAML syntax error in bad.yml line" in r.stderr


def test_check_command_prints_the_table_and_verdict(easyvqa_slice, tmp_path):
    r = run_cli("check", "--config", str(ROOT / "configs/easyvqa.yml"),
                "--DATASET_PATH", easyvqa_slice["DATASET_PATH"], "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"],
                "--GRAD_ACCU_STEPS", "3", "--DROPOUT_R", "0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 8]
    assert [row[1] for row in rows] == ["64", "32", "21-22", "16", "8"]
    assert all(float(row[3]) < 1e-5 for row in rows)
    assert "verdict: equivalent" in r.stdout and "note: dropout" in r.stdout


def test_check_flags_batchnorm_as_non_equivalent():
    from accuvqa.check import check_equivalence, equivalence_risks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    batch = {"x": torch.randn(16, 4), "y": torch.randn(16, 1)}

    def loss_fn(m, b):
        return ((m(b["x"]) - b["y"]) ** 2).sum(), len(b["x"])

    with pytest.warns(UserWarning, match="BatchNorm"):
        rows = check_equivalence(model, batch, loss_fn, [4])
    assert rows[1].rel_diff > 1e-2  # statistics of 4 samples are not those of 16
    assert "BatchNorm" in equivalence_risks(model)[0]


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(easyvqa_slice, tmp_path):
    base = {**TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
            "CKPTS_PATH": str(tmp_path / "ck"), "RESULT_PATH": str(tmp_path / "res"), "MAX_EPOCH": 2,
            "DROPOUT_R": 0.1, "EVAL_EVERY_EPOCH": False}
    cfg = load_config(ROOT / "configs/easyvqa.yml", {**base, "VERSION": "whole"})
    train(cfg)
    train(cfg.replace(VERSION="part", MAX_EPOCH=1))  # "killed" after its first epoch
    train(cfg.replace(VERSION="part", RESUME=True, CKPT_EPOCH=1))
    whole = load_checkpoint(tmp_path / "ck/ckpt_whole/epoch2.pkl")
    resumed = load_checkpoint(tmp_path / "ck/ckpt_part/epoch2.pkl")
    assert whole["step"] == resumed["step"]
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_training_with_bf16_autocast_and_auto_micro_batches(easyvqa_slice, tmp_path):
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        **TINY, "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "CKPTS_PATH": str(tmp_path / "ck"), "RESULT_PATH": str(tmp_path / "res"), "MAX_EPOCH": 1,
        "AMP": "bf16", "GRAD_ACCU_STEPS": "auto", "VERSION": "bf16"})
    summary = train(cfg)
    assert summary["effective_batch"].startswith("BATCH_SIZE 64 = 64 x 1 x 1")  # no OOM on CPU: one piece
    state = load_checkpoint(tmp_path / "ck/ckpt_bf16/epoch1.pkl")
    assert all(v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point())
    line = json.loads((tmp_path / "res/bf16/metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(line["loss"]) and 0 < line["accuracy"] <= 100


def test_a_corrupt_checkpoint_is_named_not_a_traceback(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04 not a checkpoint")
    r = run_cli("val", "--CKPT_PATH", "bad.pkl", cwd=tmp_path)
    assert r.returncode == 2 and "cannot load checkpoint bad.pkl" in r.stderr and "Traceback" not in r.stderr


def test_worker_processes_load_the_same_batches(easyvqa_slice):
    from accuvqa.data.loader import batch_loader

    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "PRELOAD": False, "VERBOSE": False})
    records = load_records(cfg, "val", need_answers=True)
    dataset = make_dataset(cfg, records, build_vocab(cfg, records))
    batches = epoch_batches(len(dataset), cfg, 0, Runtime(torch.device("cpu")))[:3]
    in_process = list(batch_loader(dataset, batches, cfg))
    with_workers = list(batch_loader(dataset, batches, cfg.replace(NUM_WORKERS=2)))
    assert len(in_process) == len(with_workers) == 3
    for a, b in zip(in_process, with_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plot_writes_a_png_of_the_metrics(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "res" / "p1"
    run_dir.mkdir(parents=True)
    lines = [{"epoch": e, "step": 10 * e, "split": "val", "accuracy": 50.0 + 10 * e, "loss": 1.0 / e,
              "per_answer_type": {"yes/no": 60.0 + 5 * e, "other": 40.0 + 15 * e}} for e in (1, 2, 3)]
    lines.append({"epoch": 3, "step": None, "split": "test", "accuracy": 79.0, "loss": 0.4,
                  "per_answer_type": {"yes/no": 75.0, "other": 85.0}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "p1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    image = Image.open(run_dir / "metrics.png")
    assert image.format == "PNG" and image.size == (1100, 400)
    assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 10  # curves drawn, not a blank canvas
    r = run_cli("plot", "--RESULT_PATH", "res", "--VERSION", "none", cwd=tmp_path)
    assert r.returncode == 2 and "no metrics file res/none/metrics.jsonl: train a run first" in r.stderr
