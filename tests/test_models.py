"""Tests for the MCAN model (accuvqa.models)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accuvqa.models import MCAN, build_model, make_mask
from accuvqa.models.layers import MHAtt

REFERENCE = Path(__file__).parent / "data" / "mcan_reference.pt"
TOKEN_SIZE, ANSWER_SIZE = 30, 11


def tiny_cfg(**over: object) -> SimpleNamespace:
    """A tiny MCAN config."""
    base = dict(LAYER=1, HIDDEN_SIZE=16, MULTI_HEAD=4, DROPOUT_R=0.1, FLAT_MLP_SIZE=16, FLAT_GLIMPSES=1,
                FLAT_OUT_SIZE=24, IMG_FEAT_SIZE=10, WORD_EMBED_SIZE=8, FF_SIZE=32, USE_GLOVE=False)
    base.update(over)
    return SimpleNamespace(**base)


def make_inputs(cfg: SimpleNamespace, batch: int = 3, n: int = 5, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs with some padded regions and tokens."""
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, n, cfg.IMG_FEAT_SIZE, generator=gen)
    ques = torch.randint(1, TOKEN_SIZE, (batch, t), generator=gen)
    img[1, n - 2:] = 0
    ques[1, t - 1:] = 0
    ques[2, t - 2:] = 0
    return img, ques


def expected_keys_layer1() -> list[str]:
    """State-dict keys of mcan-vqa's Net for LAYER=1 (order of module registration)."""
    def lin(p: str) -> list[str]:
        return [f"{p}.weight", f"{p}.bias"]

    def norm(p: str) -> list[str]:
        return [f"{p}.a_2", f"{p}.b_2"]

    def mhatt(p: str) -> list[str]:
        return [k for n in ("linear_v", "linear_k", "linear_q", "linear_merge") for k in lin(f"{p}.{n}")]

    def mlp(p: str) -> list[str]:
        return lin(f"{p}.fc.linear") + lin(f"{p}.linear")

    enc, dec = "backbone.enc_list.0", "backbone.dec_list.0"
    return (
        ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"]
        + lin("img_feat_linear")
        + mhatt(f"{enc}.mhatt") + mlp(f"{enc}.ffn.mlp") + norm(f"{enc}.norm1") + norm(f"{enc}.norm2")
        + mhatt(f"{dec}.mhatt1") + mhatt(f"{dec}.mhatt2") + mlp(f"{dec}.ffn.mlp")
        + norm(f"{dec}.norm1") + norm(f"{dec}.norm2") + norm(f"{dec}.norm3")
        + mlp("attflat_img.mlp") + lin("attflat_img.linear_merge")
        + mlp("attflat_lang.mlp") + lin("attflat_lang.linear_merge")
        + norm("proj_norm") + lin("proj")
    )


@pytest.mark.parametrize("layer", [1, 2])
def test_output_shape(layer: int) -> None:
    cfg = tiny_cfg(LAYER=layer)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE)
    assert isinstance(model, MCAN)
    img, ques = make_inputs(cfg)
    out = model(img, ques)
    assert out.shape == (3, ANSWER_SIZE)
    assert torch.isfinite(out).all()
    out.sum().backward()  # trains (dropout active)
    assert model.proj.weight.grad is not None
    assert len(model.backbone.enc_list) == layer and len(model.backbone.dec_list) == layer


def test_state_dict_keys_match_original() -> None:
    model = build_model(tiny_cfg(LAYER=1), TOKEN_SIZE, ANSWER_SIZE)
    assert list(model.state_dict().keys()) == expected_keys_layer1()


def test_make_mask() -> None:
    feat = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-2.0, 2.0]], [[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    mask = make_mask(feat)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, 3)
    assert mask.view(2, 3).tolist() == [[False, True, False], [True, False, True]]
    ques = torch.tensor([[5, 3, 0, 0], [0, 1, 2, 0]])
    assert make_mask(ques.unsqueeze(2)).view(2, 4).tolist() == [[False, False, True, True], [True, False, False, True]]


def test_padding_invariance() -> None:
    cfg = tiny_cfg(LAYER=2, FLAT_GLIMPSES=2)
    torch.manual_seed(0)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).eval()
    img, ques = make_inputs(cfg)
    with torch.no_grad():
        ref = model(img, ques)
        img_pad = torch.cat([img, torch.zeros(3, 4, cfg.IMG_FEAT_SIZE)], dim=1)
        ques_pad = torch.cat([ques, torch.zeros(3, 3, dtype=torch.long)], dim=1)
        out = model(img_pad, ques_pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_pretrained_embedding_copied() -> None:
    cfg = tiny_cfg(USE_GLOVE=True)
    emb = np.random.default_rng(0).standard_normal((TOKEN_SIZE, cfg.WORD_EMBED_SIZE)).astype(np.float32)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE, pretrained_emb=emb)
    assert torch.equal(model.embedding.weight.detach(), torch.from_numpy(emb))
    with pytest.raises(ValueError):
        build_model(cfg, TOKEN_SIZE, ANSWER_SIZE, pretrained_emb=emb[:, :3])


def test_sdpa_matches_explicit_attention() -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    att = MHAtt(cfg).eval()
    q, kv = torch.randn(2, 3, cfg.HIDDEN_SIZE), torch.randn(2, 5, cfg.HIDDEN_SIZE)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True]]).view(2, 1, 1, 5)
    with torch.no_grad():
        fast = att(kv, kv, q, mask)
        att.use_sdpa = False
        slow = att(kv, kv, q, mask)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["layer2", "glimpses2"])
def test_matches_original_mcan_vqa(case: str) -> None:
    """Outputs equal those of the original mcan-vqa Net (see tests/data/make_mcan_reference.py)."""
    ref = torch.load(REFERENCE, weights_only=True)
    data = ref["cases"][case]
    model = build_model(SimpleNamespace(**data["cfg"]), ref["token_size"], ref["answer_size"])
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(data["img_feat"], data["ques_ix"]))
        for m in model.modules():  # the explicit attention path must agree too
            if isinstance(m, MHAtt):
                m.use_sdpa = False
        probs_explicit = torch.sigmoid(model(data["img_feat"], data["ques_ix"]))
    torch.testing.assert_close(probs, data["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(probs_explicit, data["probs"], atol=1e-5, rtol=0)
