"""Generate tests/data/openvqa_reference/<case>.pt by running openvqa's OWN model code.

Not run by the tests. How it was run (from the worktree root):

    # snapshot of github.com/MILVLG/openvqa, commit f8f9966 (master), only the package
    mkdir -p /tmp/openvqa_orig
    git --git-dir=<openvqa clone>/.git archive HEAD openvqa | tar -x -C /tmp/openvqa_orig
    .venv/bin/python tests/data/make_openvqa_reference.py /tmp/openvqa_orig [case ...]

(torch 2.13 CPU.) For each case, openvqa's `openvqa.models.<module>.net.Net` is built on CPU
from a SimpleNamespace holding openvqa's config attributes (tiny sizes, DATASET 'vqa'), every
parameter is randomised (so biases and weight-norm scales matter), and its eval-mode output for a
fixed random batch is stored with its state_dict and the inputs. openvqa pads every image to
FRCN_FEAT_SIZE[0] regions and every question to MAX_TOKEN tokens; the inputs here are padded
that way, with a different number of real regions and tokens per sample.

Each file holds plain tensors / dicts / ints (`torch.load(..., weights_only=True)`):
`model` (accuvqa's MODEL_USE), `keys` (accuvqa config overrides that build the same network),
`token_size`, `answer_size`, `state_dict`, `inputs` (accuvqa batch keys: `img_feat`, `ques_ix`,
`bbox`) and `logits`. tests/test_openvqa_models.py loads each state_dict strictly into accuvqa's
model and compares the outputs.

Adding a model: add an entry to CASES (its openvqa module, its openvqa config attributes, and the
accuvqa keys), run this script for it, and list the case in tests/test_openvqa_models.py.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

TOKEN_SIZE, ANSWER_SIZE = 20, 9
BATCH, N_REGIONS, N_TOKENS, IMG_FEAT_SIZE, WORD_EMBED_SIZE = 4, 7, 6, 12, 8
REAL_REGIONS = [6, 5, 3, 4]  # per sample; the rest is zero padding (none fills N_REGIONS / N_TOKENS)
REAL_TOKENS = [5, 4, 2, 3]

BAN_SIZES = dict(GLIMPSE=3, HIDDEN_SIZE=12, K_TIMES=3, DROPOUT_R=0.2, CLASSIFER_DROPOUT_R=0.5, FLAT_OUT_SIZE=20)
NAS_SIZES = dict(ARCH={"enc": ["SA", "FFN", "SA"], "dec": ["GA", "RSA", "FFN", "SA", "RSA"]}, HIDDEN_SIZE=16,
                 REL_HBASE=4, REL_SIZE=6, MULTI_HEAD=2, DROPOUT_R=0.1, FLAT_MLP_SIZE=8, FLAT_GLIMPSES=2,
                 FLAT_OUT_SIZE=20)
MFB_SIZES = dict(HIDDEN_SIZE=16, MFB_K=3, MFB_O=8, LSTM_OUT_SIZE=12, DROPOUT_R=0.1, I_GLIMPSES=2, Q_GLIMPSES=2)

# case -> openvqa model package, openvqa config attributes, accuvqa MODEL_USE and model keys
CASES: dict[str, dict[str, Any]] = {
    "mfb": dict(module="mfb", openvqa=dict(MFB_SIZES, HIGH_ORDER=False), model="mfb", keys=dict(MFB_SIZES)),
    "mfh": dict(module="mfb", openvqa=dict(MFB_SIZES, HIGH_ORDER=True), model="mfh", keys=dict(MFB_SIZES)),
    "butd": dict(module="butd",
                 openvqa=dict(HIDDEN_SIZE=16, DROPOUT_R=0.2, CLASSIFER_DROPOUT_R=0.5, FLAT_OUT_SIZE=24,
                              IMG_FEAT_SIZE=IMG_FEAT_SIZE),
                 model="butd", keys=dict(HIDDEN_SIZE=16, DROPOUT_R=0.2, CLASSIFER_DROPOUT_R=0.5, FLAT_OUT_SIZE=24)),
    "ban": dict(module="ban",
                openvqa=dict(BAN_SIZES, BA_HIDDEN_SIZE=BAN_SIZES["K_TIMES"] * BAN_SIZES["HIDDEN_SIZE"],
                             IMG_FEAT_SIZE=IMG_FEAT_SIZE),
                model="ban", keys=dict(BAN_SIZES)),
    "mmnasnet": dict(module="mmnasnet", openvqa=dict(NAS_SIZES, USE_BBOX_FEAT=False, USE_AUX_FEAT=False),
                     model="mmnasnet", keys=dict(NAS_SIZES)),
}


def openvqa_cfg(attrs: dict[str, Any]) -> SimpleNamespace:
    """openvqa's config object: the base attributes the models read, plus the case's own."""
    return SimpleNamespace(
        DATASET="vqa", USE_GLOVE=False, WORD_EMBED_SIZE=WORD_EMBED_SIZE, MAX_TOKEN=N_TOKENS,
        FEAT_SIZE={"vqa": {"FRCN_FEAT_SIZE": (N_REGIONS, IMG_FEAT_SIZE), "BBOX_FEAT_SIZE": (N_REGIONS, 5)}},
        **attrs)


def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Regions, boxes (x1, y1, x2, y2 in pixels) and questions, padded as openvqa's loader pads them."""
    img = torch.randn(BATCH, N_REGIONS, IMG_FEAT_SIZE, generator=gen)
    corner = torch.rand(BATCH, N_REGIONS, 2, generator=gen) * 300
    bbox = torch.cat([corner, corner + 1 + torch.rand(BATCH, N_REGIONS, 2, generator=gen) * 200], dim=2)
    ques = torch.randint(1, TOKEN_SIZE, (BATCH, N_TOKENS), generator=gen)
    for b in range(BATCH):
        img[b, REAL_REGIONS[b]:] = 0
        bbox[b, REAL_REGIONS[b]:] = 0
        ques[b, REAL_TOKENS[b]:] = 0
    return {"img_feat": img, "bbox": bbox, "ques_ix": ques}


def make_case(index: int, name: str, case: dict[str, Any]) -> dict[str, Any]:
    """Run openvqa's Net for one case and collect what the test needs."""
    net_module = importlib.import_module(f"openvqa.models.{case['module']}.net")
    torch.manual_seed(4321 + index)
    net = net_module.Net(openvqa_cfg(case["openvqa"]), None, TOKEN_SIZE, ANSWER_SIZE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.eval()
    inputs = make_inputs(torch.Generator().manual_seed(77 + index))
    grid_feat = torch.zeros(BATCH, 1, 1)  # not read for DATASET vqa
    with torch.no_grad():
        logits = net(inputs["img_feat"], grid_feat, inputs["bbox"], inputs["ques_ix"])
    return {
        "model": case["model"],
        "keys": {**case["keys"], "IMG_FEAT_SIZE": IMG_FEAT_SIZE, "WORD_EMBED_SIZE": WORD_EMBED_SIZE,
                 "IMG_FEAT_PAD_SIZE": N_REGIONS, "MAX_TOKEN": N_TOKENS},
        "token_size": TOKEN_SIZE,
        "answer_size": ANSWER_SIZE,
        "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
        "inputs": inputs,
        "logits": logits.clone(),
    }


def main(openvqa_root: str, names: list[str]) -> None:
    sys.path.insert(0, openvqa_root)  # openvqa's folders have no __init__.py: namespace packages
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.nn.utils.weight_norm is deprecated
    dest = Path(__file__).with_name("openvqa_reference")
    dest.mkdir(exist_ok=True)
    for index, (name, case) in enumerate(CASES.items()):
        if names and name not in names:
            continue
        path = dest / f"{name}.pt"
        torch.save(make_case(index, name, case), path)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/openvqa_orig", sys.argv[2:])
