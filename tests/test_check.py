"""`accuvqa check`: the accumulated gradient against the one-batch gradient, on the configured model."""

import argparse

import pytest
import torch

import accuvqa.check
from accuvqa.check import check_equivalence, equivalence_risks
from accuvqa.config import load_config
from conftest import ROOT, run_cli


def test_check_command_prints_the_table_and_verdict(easyvqa_slice, tmp_path):
    r = run_cli("check", "--config", str(ROOT / "configs/easyvqa.yml"),
                "--DATASET_PATH", easyvqa_slice["DATASET_PATH"], "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"],
                "--GRAD_ACCU_STEPS", "3", "--DROPOUT_R", "0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 8]
    assert [row[1] for row in rows] == ["64", "32", "21-22", "16", "8"]
    # `check` compares float32 gradients (it has no float64 option; it falls back to float64 only above its own
    # 1e-4): the floor is float32 summation order, measured 1.9e-7 relative at this seed and 3.3e-7 at worst over
    # SEED 0-3 (AMD EPYC, torch 2.13) with `accuvqa check --config configs/easyvqa.yml --DATASET_PATH <slice>/questions
    # --FEATURE_PATH <slice>/features --GRAD_ACCU_STEPS 3 --DROPOUT_R 0.1 --SEED <s>`: 1e-5 is a margin of 30
    assert all(float(row[3]) < 1e-5 for row in rows)
    assert "verdict: equivalent" in r.stdout and "note: dropout" in r.stdout


def test_check_follows_amp_bf16_and_judges_by_bf16_rounding(easyvqa_slice, tmp_path):
    common = ["check", "--config", str(ROOT / "configs/easyvqa.yml"), "--DATASET_PATH", easyvqa_slice["DATASET_PATH"],
              "--FEATURE_PATH", easyvqa_slice["FEATURE_PATH"], "--GRAD_ACCU_STEPS", "3"]
    r = run_cli(*common, "--AMP", "bf16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bf16 autocast (AMP bf16, float32 weights and gradients):" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    worst = max(float(row[3]) for row in rows)
    # what a bf16 run computes: micro-batch products rounded to bf16 before the float32 sum, so the difference is
    # of the order of bf16's rounding (2^-8 = 3.9e-3; measured 3.47e-3 on the demo data), far above float32's
    # ~3e-7: the rows judge bf16, not float32
    assert 1e-5 < worst <= accuvqa.check.TOLERANCE_AMP["bf16"]
    assert f"verdict: equivalent under AMP bf16: every relative difference <= {worst:.2e}" in r.stdout


def test_check_flags_batchnorm_as_non_equivalent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    batch = {"x": torch.randn(16, 4), "y": torch.randn(16, 1)}

    def loss_fn(m, b):
        return ((m(b["x"]) - b["y"]) ** 2).sum(), len(b["x"])

    with pytest.warns(UserWarning, match="BatchNorm"):
        rows = check_equivalence(model, batch, loss_fn, [4])
    assert rows[1].rel_diff > 1e-2  # statistics of 4 samples are not those of 16
    assert "BatchNorm" in equivalence_risks(model)[0]


class _WithBatchNorm(torch.nn.Module):
    """The configured model followed by a BatchNorm over its logits: not equivalent by construction."""

    def __init__(self, inner: torch.nn.Module, answers: int) -> None:
        super().__init__()
        self.inner, self.norm = inner, torch.nn.BatchNorm1d(answers)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(*inputs))


def test_check_exits_1_with_the_verdict_when_accumulation_is_not_equivalent(easyvqa_slice, monkeypatch, capsys):
    real_build = accuvqa.check.build_model
    monkeypatch.setattr(accuvqa.check, "build_model",
                        lambda cfg, tokens, answers: _WithBatchNorm(real_build(cfg, tokens, answers), answers))
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "VERBOSE": False})
    with pytest.warns(UserWarning, match="BatchNorm"):
        code = accuvqa.check.main(cfg, argparse.Namespace(command="check"))
    out = capsys.readouterr().out
    assert code == 1
    assert "verdict: NOT equivalent" in out and "note: BatchNorm layers (norm)" in out


def _rss_mib() -> float:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:"))) / 1024


def test_peak_memory_on_cpu_is_the_processes_peak_rss_since_the_reset():
    from accuvqa.check import peak_rss_mib, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this system cannot reset the peak RSS")
    block = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched
    with_block = peak_rss_mib()
    assert with_block - _rss_mib() > -1 and with_block >= 96
    del block
    reset_peak_rss()  # the peak falls back to what the process holds now, without the block
    assert peak_rss_mib() < with_block - 80 and abs(peak_rss_mib() - _rss_mib()) < 8


@pytest.mark.slow
def test_check_rows_report_peak_memory_on_cpu(easyvqa_slice):
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "VERBOSE": False, "DEVICE": "cpu"})
    rows, _ = accuvqa.check.run_check(cfg)
    rss_mib = _rss_mib()
    # a peak of the whole process: at least the memory it holds now (model and batch included), not n/a
    assert all(r.peak_memory_mb is not None and r.peak_memory_mb >= 0.5 * rss_mib for r in rows)
    assert "n/a" not in accuvqa.check.format_table(rows)
