"""Tests for the models (accuvqa.models): a contract every registered model keeps, then MCAN's own."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accuvqa.accumulate import split_batch
from accuvqa.check import check_equivalence, dropout_off
from accuvqa.config import Config, load_config
from accuvqa.models import MCAN, build_model, list_models, make_mask, model_inputs, model_spec
from accuvqa.models.layers import MHAtt

REFERENCE = Path(__file__).parent / "data" / "mcan_reference.pt"
TOKEN_SIZE, ANSWER_SIZE = 30, 11
# Exactness (accumulation, padding, SDPA) is judged in float64, where every registered model's difference is
# summation order: accumulation at most 6.8e-14 relative (mfh; 1.1e-14 mfb, <= 4e-16 the others), padding and SDPA
# at most 5.6e-16 absolute (5 seeds per model; AMD EPYC, torch 2.13). In float32 the same accumulation differs by
# up to 9.3e-5 (mfh: MFB's signed square root amplifies rounding, and differently on each CPU), so a float32
# bound there would measure the CPU, not the engine. Each test shows in a control that a real error exceeds EXACT
# by orders of magnitude.
EXACT = 1e-10


def double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its floating tensors in float64 (token ids stay int64)."""
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


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


# --- the contract every registered model keeps -------------------------------------------------
# Tiny sizes of each registered model's own keys (its `keys` dataclass); a new model adds its entry.
TINY_KEYS: dict[str, dict[str, object]] = {
    "mcan": dict(LAYER=2, HIDDEN_SIZE=16, MULTI_HEAD=4, FF_SIZE=32, DROPOUT_R=0.1, FLAT_MLP_SIZE=16,
                 FLAT_GLIMPSES=2, FLAT_OUT_SIZE=24),
    "ban": dict(GLIMPSE=2, HIDDEN_SIZE=12, K_TIMES=3, DROPOUT_R=0.2, CLASSIFER_DROPOUT_R=0.5, FLAT_OUT_SIZE=20),
    "mmnasnet": dict(ARCH={"enc": ["SA", "FFN"], "dec": ["GA", "RSA", "FFN", "SA"]}, HIDDEN_SIZE=16, REL_HBASE=4,
                     REL_SIZE=6, MULTI_HEAD=2, DROPOUT_R=0.1, FLAT_MLP_SIZE=8, FLAT_GLIMPSES=2, FLAT_OUT_SIZE=20),
    "mfb": dict(HIDDEN_SIZE=16, MFB_K=3, MFB_O=8, LSTM_OUT_SIZE=12, DROPOUT_R=0.1, I_GLIMPSES=2, Q_GLIMPSES=2),
    "mfh": dict(HIDDEN_SIZE=16, MFB_K=3, MFB_O=8, LSTM_OUT_SIZE=12, DROPOUT_R=0.1, I_GLIMPSES=2, Q_GLIMPSES=2),
    "butd": dict(HIDDEN_SIZE=16, DROPOUT_R=0.2, CLASSIFER_DROPOUT_R=0.5, FLAT_OUT_SIZE=24),
}
TINY_COMMON = dict(IMG_FEAT_SIZE=10, WORD_EMBED_SIZE=8, MAX_TOKEN=6, IMG_FEAT_PAD_SIZE=7, BATCH_SIZE=8)
REGIONS, TOKENS = 5, 4  # unpadded lengths of the contract batches


def tiny_model_cfg(name: str) -> Config:
    """A validated tiny config selecting registered model `name`."""
    if name not in TINY_KEYS:
        pytest.fail(f"registered model {name!r} has no entry in TINY_KEYS (tests/test_models.py): "
                    f"add tiny sizes for its keys so the model contract tests can build it")
    return load_config(overrides={"MODEL_USE": name, **TINY_COMMON, **TINY_KEYS[name]})


def _img_feat(cfg: Config, n: int, gen: torch.Generator) -> torch.Tensor:
    img = torch.randn(n, REGIONS, cfg.IMG_FEAT_SIZE, generator=gen)
    img[1::3, REGIONS - 2:] = 0  # some samples have padded regions already
    return img


def _ques_ix(cfg: Config, n: int, gen: torch.Generator) -> torch.Tensor:
    ques = torch.randint(1, TOKEN_SIZE, (n, TOKENS), generator=gen)
    ques[1::3, TOKENS - 1:] = 0  # and PAD tokens
    ques[2::3, TOKENS - 2:] = 0
    return ques


def _bbox(cfg: Config, n: int, gen: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, REGIONS, 2, generator=gen) * 50  # x1, y1 in pixels
    return torch.cat([corner, corner + 1 + torch.rand(n, REGIONS, 2, generator=gen) * 30], dim=2)  # x2, y2


# batch key -> (maker(cfg, n, generator), padder(tensor, extra)): padding adds `extra` empty
# positions along dim 1 (all-zero image regions, PAD = 0 tokens). A model whose `inputs` name
# another key adds its entry here.
INPUTS = {
    "img_feat": (_img_feat, lambda t, extra: torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)),
    "ques_ix": (_ques_ix, lambda t, extra: torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)),
    "bbox": (_bbox, lambda t, extra: torch.cat([t, t.new_zeros(t.shape[0], extra, 4)], dim=1)),
}


def contract_batch(name: str, cfg: Config, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch holding the inputs model `name` declares, plus soft answer scores."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for key in model_spec(name).inputs:
        if key not in INPUTS:
            pytest.fail(f"model {name!r} takes input {key!r}, which INPUTS (tests/test_models.py) cannot make")
        batch[key] = INPUTS[key][0](cfg, n, gen)
    scores = torch.rand(n, ANSWER_SIZE, generator=gen)
    batch["answer_scores"] = scores * (torch.rand(n, ANSWER_SIZE, generator=gen) < 0.3)  # soft, mostly 0
    return batch


def test_every_registered_model_has_tiny_keys() -> None:
    assert list_models(), "no model is registered"
    missing = [name for name in list_models() if name not in TINY_KEYS]
    assert not missing, f"add TINY_KEYS entries for {missing}"
    for name in list_models():
        own = {f.name for f in dataclasses.fields(model_spec(name).keys)}
        assert set(TINY_KEYS[name]) <= own, f"TINY_KEYS[{name!r}] names keys the model does not declare"


@pytest.mark.parametrize("name", list_models())
def test_contract_output_shape(name: str) -> None:
    cfg = tiny_model_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE)
    batch = contract_batch(name, cfg, n=5)
    out = model(*model_inputs(cfg, batch))
    assert out.shape == (5, ANSWER_SIZE)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_contract_padding_invariance(name: str) -> None:
    """Appending all-zero regions and PAD tokens leaves every output unchanged (eval mode, float64)."""
    cfg = tiny_model_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).eval().double()
    batch = double(contract_batch(name, cfg))
    padded = {k: INPUTS[k][1](v, 3) if k in INPUTS else v for k, v in batch.items()}
    assert all(padded[k].shape[1] == batch[k].shape[1] + 3 for k in model_spec(name).inputs)
    # control: the same 3 positions holding a real region (ones) and a real word (token 1) instead of padding
    unmasked = {k: torch.cat([v, torch.ones_like(padded[k][:, -3:])], dim=1) if k in ("img_feat", "ques_ix") else
                padded[k] for k, v in batch.items()}
    with torch.no_grad():
        ref = model(*model_inputs(cfg, batch))
        out = model(*model_inputs(cfg, padded))
        moved = model(*model_inputs(cfg, unmasked))
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)
    assert float((moved - ref).abs().max()) > 1e4 * EXACT  # the bound sees 3 positions that are not padding


def loss_sum(cfg: Config):
    """BCE-with-logits summed over the batch, and the batch's sample count: the contract's loss_fn."""
    def loss_fn(model: torch.nn.Module, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(*model_inputs(cfg, piece))
        target = piece["answer_scores"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum"), target.shape[0]
    return loss_fn


@pytest.mark.parametrize("name", list_models())
def test_contract_accumulation_is_exact(name: str) -> None:
    """2, 3 (uneven: 8 = 3 + 2 + 3) and 4 micro-batches give the one-batch gradient, dropout off, in float64."""
    cfg = tiny_model_cfg(name)
    torch.manual_seed(0)
    model = dropout_off(build_model(cfg, TOKEN_SIZE, ANSWER_SIZE)).double()
    batch = double(contract_batch(name, cfg, n=8))
    rows = check_equivalence(model, batch, loss_sum(cfg), [2, 3, 4], reduction="sum", repeats=1)
    by_k = {row.micro_batches: row for row in rows}
    assert sorted(by_k) == [1, 2, 3, 4]
    assert by_k[3].micro_batch_size == "2-3"  # the uneven split is exercised
    for row in rows:
        assert row.rel_diff <= EXACT, f"{name}: {row.micro_batches} micro-batches, relative difference " \
                                      f"{row.rel_diff:.2e}"
    # control: the folklore loop (each micro-batch's mean loss / k) on the uneven 3 + 2 + 3 split, against the mean
    # over all 8 samples, misses by far more than the bound
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(loss_sum(cfg)(model, batch)[0] / 8, params, allow_unused=True)
    folklore = [torch.zeros_like(p) for p in params]
    for piece in split_batch(batch, 3):
        piece_loss, n = loss_sum(cfg)(model, piece)
        grads = torch.autograd.grad(piece_loss / n / 3, params, allow_unused=True)
        folklore = [f + g if g is not None else f for f, g in zip(folklore, grads)]
    scale = max(float(w.abs().max()) for w in want if w is not None)
    miss = max(float((f - w).abs().max()) for f, w in zip(folklore, want) if w is not None) / scale
    assert miss > 1e4 * EXACT, f"{name}: the folklore loop misses by only {miss:.2e}"


@pytest.mark.parametrize("name", list_models())
def test_contract_dictionary_parameters(name: str) -> None:
    """The spec's token_param / answer_param name parameters sized by the two dictionaries."""
    cfg = tiny_model_cfg(name)
    spec = model_spec(name)
    state = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).state_dict()
    assert spec.token_param in state, f"{name}: token_param {spec.token_param!r} not in the state_dict"
    assert spec.answer_param in state, f"{name}: answer_param {spec.answer_param!r} not in the state_dict"
    assert state[spec.token_param].shape[0] == TOKEN_SIZE
    assert state[spec.answer_param].shape[0] == ANSWER_SIZE


# --- MCAN -------------------------------------------------------------------------------------
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
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).eval().double()
    img, ques = make_inputs(cfg)
    img = img.double()
    with torch.no_grad():
        ref = model(img, ques)
        img_pad = torch.cat([img, torch.zeros(3, 4, cfg.IMG_FEAT_SIZE, dtype=torch.float64)], dim=1)
        ques_pad = torch.cat([ques, torch.zeros(3, 3, dtype=torch.long)], dim=1)
        out = model(img_pad, ques_pad)
        unmasked = model(torch.cat([img, torch.ones(3, 4, cfg.IMG_FEAT_SIZE, dtype=torch.float64)], dim=1), ques_pad)
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)
    assert float((unmasked - ref).abs().max()) > 1e4 * EXACT  # control: 4 real regions instead of padding


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
    att = MHAtt(cfg).eval().double()
    q = torch.randn(2, 3, cfg.HIDDEN_SIZE, dtype=torch.float64)
    kv = torch.randn(2, 5, cfg.HIDDEN_SIZE, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True]]).view(2, 1, 1, 5)
    with torch.no_grad():
        fast = att(kv, kv, q, mask)
        unmasked = att(kv, kv, q, torch.zeros_like(mask))
        att.use_sdpa = False
        slow = att(kv, kv, q, mask)
    torch.testing.assert_close(fast, slow, atol=EXACT, rtol=0)
    assert float((unmasked - slow).abs().max()) > 1e4 * EXACT  # control: the mask ignored


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
    # the stored probabilities are float32, from mcan-vqa's own code: the floor is float32 rounding, measured
    # 1.2e-7 (both paths, both cases; AMD EPYC, torch 2.13): 1e-5 is a margin of 80
    torch.testing.assert_close(probs, data["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(probs_explicit, data["probs"], atol=1e-5, rtol=0)


# --- MCAN's counting options (FLAT_IMG_POOL, PROJ_HIDDEN_SIZE) --------------------------------
def test_sigmoid_pool_sums_each_regions_own_weight_and_keeps_the_count() -> None:
    """FLAT_IMG_POOL sigmoid: each region weighted by its own sigmoid, summed (by hand below, float64); a region
    repeated k times counts k times, where softmax pooling cannot tell one copy from three."""
    from accuvqa.models.layers import AttFlat

    torch.manual_seed(0)
    cfg = tiny_cfg(FLAT_GLIMPSES=2)
    flat = AttFlat(cfg, pool="sigmoid").double().eval()
    x = torch.randn(2, 5, cfg.HIDDEN_SIZE, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]]).view(2, 1, 1, 5)
    with torch.no_grad():
        out = flat(x, mask)
        logits = flat.mlp(x)  # (B, L, G)
        expected = []
        for b, n in ((0, 5), (1, 3)):  # the unpadded regions only
            pooled = [sum(torch.sigmoid(logits[b, i, g]) * x[b, i] for i in range(n)) for g in range(2)]
            expected.append(flat.linear_merge(torch.cat(pooled)))
    torch.testing.assert_close(out, torch.stack(expected), atol=EXACT, rtol=0)

    one = x[:1, :1]  # one region, then the same region three times
    three = one.expand(1, 3, cfg.HIDDEN_SIZE)
    bias = flat.linear_merge.bias
    with torch.no_grad():
        pooled_one, pooled_three = flat(one, None) - bias, flat(three, None) - bias
        softmax = AttFlat(cfg).double().eval()
        softmax.load_state_dict(flat.state_dict())
        soft_one, soft_three = softmax(one, None), softmax(three, None)
    torch.testing.assert_close(pooled_three, 3 * pooled_one, atol=EXACT, rtol=0)
    torch.testing.assert_close(soft_three, soft_one, atol=EXACT, rtol=0)  # control: softmax loses the count
    with pytest.raises(ValueError, match="pool must be one of softmax, sigmoid, got 'sum'"):
        AttFlat(cfg, pool="sum")


def test_proj_hidden_size_adds_one_relu_layer_before_the_answer_layer() -> None:
    cfg = tiny_cfg(PROJ_HIDDEN_SIZE=12, FLAT_IMG_POOL="sigmoid")
    torch.manual_seed(0)
    model = build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).eval().double()
    state = model.state_dict()
    assert state["proj_hidden.0.weight"].shape == (12, cfg.FLAT_OUT_SIZE)
    assert state[model_spec("mcan").answer_param].shape == (ANSWER_SIZE, 12)  # the answer layer keeps its name
    assert model.attflat_img.pool == "sigmoid" and model.attflat_lang.pool == "softmax"
    img, ques = make_inputs(cfg)
    img = img.double()
    with torch.no_grad():
        out = model(img, ques)
        lang_mask, img_mask = make_mask(ques.unsqueeze(2)), make_mask(img)
        lang, _ = model.lstm(model.embedding(ques))
        lang, regions = model.backbone(lang, model.img_feat_linear(img), lang_mask, img_mask)
        fused = model.proj_norm(model.attflat_lang(lang, lang_mask) + model.attflat_img(regions, img_mask))
        hidden = torch.relu(fused @ state["proj_hidden.0.weight"].T + state["proj_hidden.0.bias"])
        expected = hidden @ state["proj.weight"].T + state["proj.bias"]
    torch.testing.assert_close(out, expected, atol=EXACT, rtol=0)
    # left at 0 (mcan-vqa's linear classifier): mcan-vqa's state dict, key for key
    assert list(build_model(tiny_cfg(LAYER=1, PROJ_HIDDEN_SIZE=0), TOKEN_SIZE, ANSWER_SIZE).state_dict()) \
        == expected_keys_layer1()


@pytest.mark.parametrize("key, value, says", [
    ("FLAT_IMG_POOL", "sum", "FLAT_IMG_POOL must be one of softmax, sigmoid, got 'sum'"),
    ("PROJ_HIDDEN_SIZE", -1, "PROJ_HIDDEN_SIZE must be 0 (no hidden layer) or positive, got -1"),
])
def test_counting_options_refuse_bad_values(key: str, value: object, says: str) -> None:
    from accuvqa.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(overrides={key: value})
