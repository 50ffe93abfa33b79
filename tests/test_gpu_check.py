"""benchmarks/gpu_check.py, the prepared GPU check, in its --short mode: it runs on the CPU and writes its
table, so the script a GPU session runs cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check

# a stand-in for a checkout of MILVLG/mcan-vqa (never copied into the project): a `Net` with its
# constructor and forward signatures, enough to run the script's mcan-vqa row end to end
STAND_IN_NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, cfg, pretrained_emb, token_size, answer_size):
        super().__init__()
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        self.img_feat_linear = nn.Linear(cfg.IMG_FEAT_SIZE, cfg.WORD_EMBED_SIZE)
        self.proj = nn.Linear(cfg.WORD_EMBED_SIZE, answer_size)

    def forward(self, img_feat, ques_ix):
        x = self.embedding(ques_ix).mean(1) + self.img_feat_linear(img_feat).mean(1)
        return torch.sigmoid(self.proj(x))
'''


def table_rows(text: str) -> dict[str, list[str]]:
    """{row name: [figure, detail, command]} of the table gpu_check.py writes."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| row |"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_the_short_gpu_check_writes_every_row_of_the_table(tmp_path):
    checkout = tmp_path / "mcan-vqa"
    (checkout / "core/model").mkdir(parents=True)
    (checkout / "core/model/net.py").write_text(STAND_IN_NET)
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--short", "--out", str(out),
                           "--mcan-vqa", str(checkout), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, check=False, timeout=600,  # a hang guard, not a speed bound
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text in done.stdout  # printed as written
    rows = table_rows(text)
    assert list(rows) == list(gpu_check.ROWS)
    cuda = torch.cuda.is_available()
    assert ("Device: **CPU (short mode)**" in text) != cuda
    assert f"torch {torch.__version__}" in text

    figure = {name: cells[0] for name, cells in rows.items()}
    detail = {name: cells[1] for name, cells in rows.items()}
    command = {name: cells[2] for name, cells in rows.items()}
    if not cuda:
        assert figure["CUDA tests"] == "skipped: no CUDA" and detail["CUDA tests"] == "2 skipped"
        assert figure["check, AMP fp16"] == "n/a (fp16 needs CUDA)"
    assert command["CUDA tests"] == "`python -m pytest -q -p no:cacheprovider tests/test_cuda.py`"
    assert int(figure["data"]) == 16  # --short: 4 images of 4 questions

    for amp, unit in (("bf16", 2**-8), ("fp16", 2**-11)):
        if amp == "fp16" and not cuda:
            continue
        name = f"check, AMP {amp}"
        worst = float(figure[name])
        # the figure (the worst row of check's table) is the bound its verdict line states, within tolerance
        assert detail[name] == (f"verdict: equivalent under AMP {amp}: every relative difference <= {worst:.2e} "
                                f"(tolerance {4 * unit:.1e}: four units of {amp}'s rounding)")
        assert worst <= 4 * unit
        assert command[name].startswith("`accuvqa check --config small $TREE") and f"--AMP {amp}" in command[name]

    assert figure["resume after SIGTERM"] == "bit-identical"
    same = re.match(r"(\d+) of (\d+) state_dict tensors torch.equal", detail["resume after SIGTERM"])
    assert same and same.group(1) == same.group(2) and int(same.group(2)) > 10
    assert "ACCUVQA_FAIL_AT=0:6:term accuvqa train" in command["resume after SIGTERM"]
    assert "--VERSION resume-stopped --RESUME True`" in command["resume after SIGTERM"]

    for name in ("train fp32", "train AMP bf16", "mcan-vqa step"):
        assert float(figure[name]) > 0, (name, figure[name])
        assert "tiny model ($TINY)" in detail[name]
    assert "--AMP bf16" in command["train AMP bf16"] and "--AMP" not in command["train fp32"]
    assert command["mcan-vqa step"].startswith("`python benchmarks/throughput_vs_mcan_vqa.py --child")


def test_without_a_checkout_the_mcan_vqa_row_says_it_was_not_run(tmp_path, monkeypatch):
    def fake_run(tree, batch_size, threads, extra, work, tag, timeout=None):
        return {"wall_s": 2.0, "updates": 4, "samples_s": 8.0, "in_loop_samples_s": 40.0}

    def no_checkout(*args, **kwargs):
        raise AssertionError("mcan-vqa's step ran without a checkout")

    monkeypatch.setattr(gpu_check.throughput, "run_accuvqa", fake_run)
    monkeypatch.setattr(gpu_check.throughput, "run_original_process", no_checkout)
    check = gpu_check.GpuCheck(tmp_path, "cpu", gpu_check.SHORT, float("inf"), None)
    rows = {r.name: r for r in gpu_check.throughput_rows(check)}
    assert rows["mcan-vqa step"].figure == "not run: no mcan-vqa checkout (--mcan-vqa)"
    assert rows["mcan-vqa step"].holds
    assert rows["train fp32"].figure == "8.0" and "x mcan-vqa" not in rows["train fp32"].detail
