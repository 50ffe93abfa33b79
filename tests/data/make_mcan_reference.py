"""Generate tests/data/mcan_reference.pt by running the ORIGINAL mcan-vqa model code.

Not run by the tests. How it was run (from /work/main):

    # snapshot of github.com/MILVLG/mcan-vqa, commit 6b165e9 (master), only the model files
    mkdir -p /tmp/mcan_orig
    git --git-dir=<mcan-vqa clone>/.git archive HEAD core/model | tar -x -C /tmp/mcan_orig
    /tmp/venvtest/bin/python tests/data/make_mcan_reference.py /tmp/mcan_orig

(torch 2.13 CPU.) The original is imported from the given directory as ``core.model.net``;
it only needs torch. For each case the original ``Net`` is built with a tiny
SimpleNamespace config, all parameters are randomised (so LayerNorm a_2/b_2 and biases
matter), and its sigmoid outputs in eval mode are stored together with its state_dict
and the inputs (some padded regions and padded tokens). Everything saved is plain
tensors / dicts / ints, loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

CASES = {
    "layer2": dict(LAYER=2, HIDDEN_SIZE=20, MULTI_HEAD=4, FF_SIZE=48, FLAT_MLP_SIZE=16,
                   FLAT_GLIMPSES=1, FLAT_OUT_SIZE=24, WORD_EMBED_SIZE=16, IMG_FEAT_SIZE=24),
    "glimpses2": dict(LAYER=1, HIDDEN_SIZE=12, MULTI_HEAD=2, FF_SIZE=24, FLAT_MLP_SIZE=8,
                      FLAT_GLIMPSES=2, FLAT_OUT_SIZE=24, WORD_EMBED_SIZE=8, IMG_FEAT_SIZE=12),
}
TOKEN_SIZE, ANSWER_SIZE = 30, 11
BATCH, N_REGIONS, N_TOKENS = 4, 7, 6


def make_inputs(img_feat_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random regions/questions; trailing regions zeroed and trailing tokens set to PAD per sample."""
    img = torch.randn(BATCH, N_REGIONS, img_feat_size, generator=gen)
    ques = torch.randint(1, TOKEN_SIZE, (BATCH, N_TOKENS), generator=gen)
    n_regions = [7, 5, 3, 6]
    n_tokens = [6, 4, 2, 5]
    for b in range(BATCH):
        img[b, n_regions[b]:] = 0
        ques[b, n_tokens[b]:] = 0
    return img, ques


def main(orig_root: str) -> None:
    sys.path.insert(0, orig_root)
    from core.model.net import Net  # the original mcan-vqa model

    out: dict = {"token_size": TOKEN_SIZE, "answer_size": ANSWER_SIZE, "cases": {}}
    for i, (name, sizes) in enumerate(CASES.items()):
        torch.manual_seed(1234 + i)
        cfg = SimpleNamespace(**sizes, DROPOUT_R=0.1, USE_GLOVE=False,
                              HIDDEN_SIZE_HEAD=sizes["HIDDEN_SIZE"] // sizes["MULTI_HEAD"])
        net = Net(cfg, None, TOKEN_SIZE, ANSWER_SIZE)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        net.eval()
        img, ques = make_inputs(sizes["IMG_FEAT_SIZE"], torch.Generator().manual_seed(99 + i))
        with torch.no_grad():
            probs = net(img, ques)
        out["cases"][name] = {
            "cfg": {**sizes, "DROPOUT_R": 0.1, "USE_GLOVE": False},
            "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "img_feat": img,
            "ques_ix": ques,
            "probs": probs.clone(),
        }
    dest = Path(__file__).with_name("mcan_reference.pt")
    torch.save(out, dest)
    print(f"wrote {dest} ({dest.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mcan_orig")
