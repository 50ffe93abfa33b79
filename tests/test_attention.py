"""Attention maps and pictures: MCAN's kept maps, `Predictor`, `accuvqa predict --attention`."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from accuvqa import attention as attention_module
from accuvqa import predict as predict_module
from accuvqa.attention import DPI, LAYER_ROW_HEIGHT, SUMMARY_SIZE, draw_attention, picture_and_boxes, region_heat
from accuvqa.check import dropout_off
from accuvqa.config import load_config
from accuvqa.data.easyvqa import image_features, read_rgb
from accuvqa.data.features import feature_file
from accuvqa.errors import ConfigError, DataError
from accuvqa.models import build_model
from accuvqa.predict import Answer, Predictor, predict
from conftest import ROOT, run_cli

TOKEN_SIZE, ANSWER_SIZE = 30, 11
QUESTIONS = ["What color is the shape?", "Is there a blue circle in the image?"]
# The kept maps are compared in float64 (tiny_mcan, padded_inputs), where the explicit attention and SDPA differ
# by summation order only: measured 4e-16 (outputs) and 2e-16 (gradients, maps) at most (AMD EPYC, torch 2.13).
EXACT = 1e-12


def tiny_mcan() -> nn.Module:
    """A tiny MCAN with two layers and two glimpses, eval mode, float64."""
    cfg = load_config(overrides={"LAYER": 2, "HIDDEN_SIZE": 16, "MULTI_HEAD": 4, "FF_SIZE": 32, "FLAT_MLP_SIZE": 16,
                                 "FLAT_GLIMPSES": 2, "FLAT_OUT_SIZE": 24, "IMG_FEAT_SIZE": 10, "WORD_EMBED_SIZE": 8})
    torch.manual_seed(0)
    return build_model(cfg, TOKEN_SIZE, ANSWER_SIZE).eval().double()


def padded_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples in float64, the second with 2 padded regions and 2 PAD tokens."""
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64)
    ques = torch.randint(2, TOKEN_SIZE, (2, 5), generator=gen)
    img[1, 4:] = 0
    ques[1, 3:] = 0
    return img, ques


def reference_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Masked softmax in float64, written out: exp(s - max) over the unmasked positions, divided by its sum."""
    scores = scores.double().masked_fill(mask, -math.inf)
    e = torch.exp(scores - scores.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def test_kept_maps_leave_mcan_output_unchanged(monkeypatch):
    model = tiny_mcan()
    img, ques = padded_inputs()
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        plain = model(img, ques)
        assert len(sdpa_calls) == 3 * 2  # by default (training too) every attention is SDPA's, nothing kept
        assert model.backbone.enc_list[0].mhatt.kept_map is None
        model.keep_attention(True)
        kept = model(img, ques)
        assert len(sdpa_calls) == 3 * 2
        model.keep_attention(False)
        again = model(img, ques)
    torch.testing.assert_close(kept, plain, rtol=0, atol=EXACT)
    assert torch.equal(again, plain)
    with pytest.raises(RuntimeError, match="call keep_attention"):
        model.attention_maps()  # cleared when switched off

    model = dropout_off(tiny_mcan().train())  # in training mode too (dropout off: same masks)
    plain_grad = torch.autograd.grad(model(img, ques).sum(), model.backbone.dec_list[0].mhatt2.linear_q.weight)[0]
    model.keep_attention(True)
    kept_grad = torch.autograd.grad(model(img, ques).sum(), model.backbone.dec_list[0].mhatt2.linear_q.weight)[0]
    torch.testing.assert_close(kept_grad, plain_grad, rtol=0, atol=EXACT)


def test_kept_maps_equal_a_recomputation_from_each_module_inputs():
    model = tiny_mcan()
    img, ques = padded_inputs()
    seen = {}

    def remember(name):
        return lambda module, args: seen.__setitem__(name, args)

    guided = model.backbone.dec_list[1].mhatt2
    model.backbone.enc_list[0].mhatt.register_forward_pre_hook(remember("question_self/1"))
    guided.register_forward_pre_hook(remember("image_question/2"))
    model.attflat_img.register_forward_pre_hook(remember("image_flat"))
    model.keep_attention(True)
    with torch.no_grad():
        model(img, ques)
    maps = model.attention_maps()
    assert set(maps) == {"question_self/1", "question_self/2", "image_self/1", "image_self/2", "image_question/1",
                         "image_question/2", "image_flat", "question_flat"}

    for name in ("question_self/1", "image_question/2"):
        module = model.backbone.enc_list[0].mhatt if name.startswith("question") else guided
        _, k, q, mask = seen[name]
        heads, d = module.n_heads, module.head_size
        qh = module.linear_q(q).view(2, -1, heads, d).transpose(1, 2).double()
        kh = module.linear_k(k).view(2, -1, heads, d).transpose(1, 2).double()
        expected = reference_softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), mask, dim=-1)
        torch.testing.assert_close(maps[name], expected, rtol=0, atol=EXACT)
    assert maps["image_question/2"].shape == (2, 4, 6, 5)
    assert maps["image_question/2"][1, :, :, 3:].abs().max() == 0  # PAD words get no attention

    x, x_mask = seen["image_flat"]
    logits = model.attflat_img.mlp(x)  # (B, N, G)
    expected = reference_softmax(logits, x_mask[:, 0, 0, :, None], dim=1)
    torch.testing.assert_close(maps["image_flat"], expected, rtol=0, atol=EXACT)
    assert maps["image_flat"].shape == (2, 6, 2)
    torch.testing.assert_close(maps["image_flat"].sum(dim=1), torch.ones(2, 2, dtype=torch.float64), rtol=0,
                               atol=EXACT)  # per glimpse
    assert maps["image_flat"][1, 4:].abs().max() == 0  # padded regions


def test_region_heat_sums_the_weights_of_covering_boxes():
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 4], [5.5, 0.2, 9, 1]])
    heat = region_heat(boxes, np.array([0.5, 0.3, 0.2]), width=8, height=5)
    expected = np.zeros((5, 8))
    expected[0:4, 0:4] += 0.5
    expected[2:4, 2:6] += 0.3
    expected[0:1, 5:8] += 0.2  # cut at the image's right edge; partly covered pixels count
    np.testing.assert_allclose(heat, expected)


def test_boxes_are_scaled_onto_the_image_file_or_drawn_on_a_blank_canvas(tmp_path):
    answer = Answer("q", [("a", 1.0)], ["q"], region_weights=np.array([0.6, 0.4]),
                    boxes=np.array([[0, 0, 32, 32], [32, 16, 64, 48]], dtype=np.float32))
    Image.new("RGB", (128, 96), "red").save(tmp_path / "photo.png")
    rgb, boxes = picture_and_boxes(answer, tmp_path / "photo.png", None, (64, 48))
    assert rgb.shape == (96, 128, 3)
    np.testing.assert_allclose(boxes, [[0, 0, 64, 64], [64, 32, 128, 96]])
    rgb, boxes = picture_and_boxes(answer, None, None, (70, 50))
    assert rgb.shape == (50, 70, 3) and (rgb == 255).all()
    np.testing.assert_allclose(boxes, answer.boxes)
    with pytest.raises(DataError, match="3 region boxes for 2 regions"):
        picture_and_boxes(answer, None, np.zeros((3, 4)), (64, 48))


def test_the_picture_shows_the_weights_brightest_where_the_weight_is_largest(tmp_path, monkeypatch):
    """Three side-by-side regions of a uniform grey image: in the drawn picture each region's pixels are as bright
    as its weight ranks it (largest weight, brightest region), moving the weights moves the brightness with them,
    and equal weights draw equal regions. A picture that ignored the weights would fail each of these."""
    Image.new("RGB", (120, 60), (128, 128, 128)).save(tmp_path / "grey.png")
    boxes = np.array([[0, 0, 40, 60], [40, 0, 80, 60], [80, 0, 120, 60]], dtype=np.float32)
    panels = []  # the region panel's axes, to map image pixels onto the picture's pixels
    real_draw_regions = attention_module._draw_regions

    def spy(ax, *args, **kwargs):
        panels.append(ax)
        return real_draw_regions(ax, *args, **kwargs)

    monkeypatch.setattr(attention_module, "_draw_regions", spy)

    def brightness(weights: list[float]) -> list[float]:
        """Mean pixel value inside each region of the picture drawn with these weights."""
        answer = Answer("q?", [("a", 0.9)], ["q"], region_weights=np.array(weights), boxes=boxes,
                        maps={"question_flat": np.ones((1, 1))})
        picture = np.asarray(draw_attention(answer, image_file=tmp_path / "grey.png", image_size=(120, 60))
                             .convert("RGB"), dtype=np.float64)
        to_picture = panels[-1].transData.transform  # image pixels -> picture pixels (y up)
        means = []
        for x1, y1, x2, y2 in boxes:
            # the box's lower-right part: clear of its outline and of the label drawn in its top-left corner
            (c1, r2), (c2, r1) = to_picture([(x1 + 0.55 * (x2 - x1), y1 + 0.55 * (y2 - y1)),
                                             (x2 - 0.1 * (x2 - x1), y2 - 0.1 * (y2 - y1))])
            rows = slice(picture.shape[0] - round(r2), picture.shape[0] - round(r1))
            inside = picture[rows, round(c1):round(c2)]
            assert inside.size > 3 * 100 and inside.std(axis=(0, 1)).max() == 0  # one colour: no border, no label
            means.append(float(inside.mean()))
        return means

    for weights in ([0.2, 0.5, 0.3], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]):
        seen = brightness(weights)
        assert np.argsort(seen).tolist() == np.argsort(weights).tolist(), (weights, seen)
        assert min(np.diff(sorted(seen))) > 5, (weights, seen)  # visibly apart, not by rounding
    assert len(set(brightness([1 / 3, 1 / 3, 1 / 3]))) == 1


# --- on a trained model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor(tiny_trained) -> Predictor:
    return Predictor(tiny_trained)


@pytest.fixture(scope="module")
def test_png():
    import easy_vqa

    return sorted(easy_vqa.get_test_image_paths().items())[0]  # (image id, path)


@pytest.mark.parametrize("question", QUESTIONS)
def test_predictor_answers_equal_predict(tiny_trained, predictor, test_png, question):
    answer = predictor.answer(predictor.features(test_png[1]), question, top_k=13)
    expected = predict(tiny_trained, test_png[1], question, top_k=13)  # the SDPA path, no maps kept
    assert [a for a, _ in answer.answers] == [a for a, _ in expected]
    # float32, explicit attention against SDPA: scores differ by 6e-8 at most (measured, AMD EPYC, torch 2.13),
    # a float32 ulp at 1; 1e-6 is a margin of 17
    assert [s for _, s in answer.answers] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert answer.maps and answer.region_weights is not None


def test_region_weights_are_the_attflat_weights_of_the_same_pass(predictor, test_png):
    model = predictor.model
    seen = {}
    hook = model.attflat_img.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    try:
        answer = predictor.answer(predictor.features(test_png[1]), "What colour is the zzyzx shape?")
    finally:
        hook.remove()
    with torch.no_grad():
        expected = torch.softmax(model.attflat_img.mlp(seen["x"]).double(), dim=1)[0].mean(dim=1).numpy()
    n_regions = len(predictor.features(test_png[1]))
    assert answer.region_weights.shape == (n_regions,)
    # the trained model is float32: weights differ from the float64 softmax by 3.9e-8 relative, the maps' sums
    # from 1 by 1.2e-7 (measured, AMD EPYC, torch 2.13): rtol 1e-5 is a margin of 80 or more, 1e-6 (a sum of
    # 5 region weights) 8 over float32's rounding of such a sum
    np.testing.assert_allclose(answer.region_weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(answer.maps["image_flat"].sum(axis=0), 1.0, rtol=1e-6)
    assert answer.tokens == ["what", "UNK", "is", "the", "UNK", "shape"]  # words outside the dictionary
    layers = predictor.cfg.LAYER
    heads, t = predictor.cfg.MULTI_HEAD, len(answer.tokens)
    assert answer.maps["question_self/1"].shape == (heads, t, t)
    assert answer.maps[f"image_question/{layers}"].shape == (heads, n_regions, t)
    assert answer.maps[f"image_self/{layers}"].shape == (heads, n_regions, n_regions)
    for name in ("question_self/1", f"image_question/{layers}", f"image_self/{layers}"):
        np.testing.assert_allclose(answer.maps[name].sum(axis=-1), 1.0, rtol=1e-5)  # padding cut off


def test_boxes_of_prepared_features_are_those_of_the_image(predictor, tiny_trained, test_png):
    image_id, png = test_png
    npz = feature_file(tiny_trained.FEATURE_PATH, "test2015", image_id)
    rgb = read_rgb(png)
    np.testing.assert_allclose(predictor.boxes(npz), image_features(rgb)[1])
    np.testing.assert_allclose(predictor.boxes(png), image_features(rgb)[1])
    assert predictor.image_size(npz) == predictor.image_size(png) == (rgb.shape[1], rgb.shape[0])


def _non_blank(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_attention_png_is_written_and_read_back(predictor, test_png, tmp_path):
    answer = predictor.answer(predictor.features(test_png[1]), QUESTIONS[0], boxes=predictor.boxes(test_png[1]))
    image = predictor.draw(answer, tmp_path / "att.png", image_file=test_png[1])
    with Image.open(tmp_path / "att.png") as back:
        assert back.format == "PNG" and back.size == (SUMMARY_SIZE[0] * DPI, SUMMARY_SIZE[1] * DPI)
        assert np.array_equal(np.asarray(back), np.asarray(image)) and _non_blank(back)
    blank = predictor.draw(answer, image_size=(64, 64))  # no image file: blank canvas, nothing written
    assert not np.array_equal(np.asarray(blank), np.asarray(image))
    reversed_weights = dataclasses.replace(answer, region_weights=answer.region_weights[::-1].copy())
    assert not np.array_equal(np.asarray(predictor.draw(reversed_weights, image_file=test_png[1])), np.asarray(image))

    layered = predictor.draw(answer, tmp_path / "layers.png", image_file=test_png[1], layers=True)
    rows = 3 * predictor.cfg.LAYER  # SA, SGA guided, SGA self per layer
    assert layered.size == (SUMMARY_SIZE[0] * DPI, round((SUMMARY_SIZE[1] + LAYER_ROW_HEIGHT * rows) * DPI))
    assert _non_blank(layered)
    plain = predictor.answer(predictor.features(test_png[1]), QUESTIONS[0], attention=False)
    assert plain.maps == {} and plain.region_weights is None
    with pytest.raises(ConfigError, match="this answer holds no attention maps"):
        predictor.draw(plain)


def _args(image: str, **over) -> argparse.Namespace:
    base = dict(image=image, question=QUESTIONS[0], top=5, attention=None, attention_layers=False, image_file=None)
    return argparse.Namespace(**{**base, **over})


def test_predict_command_errors_are_named(tiny_trained, test_png, tmp_path, monkeypatch, capsys):
    image = test_png[1]
    with pytest.raises(DataError, match="--image-file: image nope.jpg does not exist"):
        predict_module.main(tiny_trained, _args(image, attention=str(tmp_path / "a.png"), image_file="nope.jpg"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="--image-file: cannot read image .*junk.jpg"):
        predict_module.main(tiny_trained, _args(image, attention=str(tmp_path / "a.png"),
                                                image_file=str(tmp_path / "junk.jpg")))
    with pytest.raises(ConfigError, match="--attention-layers goes with --attention OUT.png"):
        predict_module.main(tiny_trained, _args(image, attention_layers=True))
    with pytest.raises(ConfigError, match="the picture is a PNG file"):
        predict_module.main(tiny_trained, _args(image, attention=str(tmp_path / "a.jpg")))
    with pytest.raises(DataError, match="folder .*nofolder does not exist"):
        predict_module.main(tiny_trained, _args(image, attention=str(tmp_path / "nofolder/a.png")))
    assert not list(tmp_path.glob("*.png"))

    class NoAttention(nn.Module):  # a model whose forward gives logits but keeps no maps
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(*inputs)

    load_trained_state = predict_module.load_trained_state

    def load_without_attention(cfg, device):
        model, *rest = load_trained_state(cfg, device)
        return (NoAttention(model), *rest)

    monkeypatch.setattr(predict_module, "load_trained_state", load_without_attention)
    capsys.readouterr()
    assert predict_module.main(tiny_trained, _args(image)) == 0  # answers alone still work
    assert len(capsys.readouterr().out.splitlines()) == 5
    with pytest.raises(ConfigError, match="model mcan does not expose attention maps"):
        predict_module.main(tiny_trained, _args(image, attention=str(tmp_path / "a.png")))
    assert not (tmp_path / "a.png").exists()


@pytest.mark.slow
def test_predict_cli_draws_attention_with_layers(tiny_trained, test_png, tmp_path):
    from conftest import TINY, cli_overrides

    common = ["--config", str(ROOT / "configs/easyvqa.yml"), *cli_overrides({
        **TINY, "DATASET_PATH": tiny_trained.DATASET_PATH, "FEATURE_PATH": tiny_trained.FEATURE_PATH,
        "CKPTS_PATH": tiny_trained.CKPTS_PATH, "VERSION": tiny_trained.VERSION, "CKPT_EPOCH": 1})]
    r = run_cli("predict", *common, "--image", test_png[1], "--question", QUESTIONS[0], "--attention", "out.png",
                "--attention-layers", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 6 and r.stdout.splitlines()[-1] == "attention picture: out.png"
    with Image.open(tmp_path / "out.png") as image:
        assert image.size[1] > SUMMARY_SIZE[1] * DPI and _non_blank(image)
    r = run_cli("predict", *common, "--image", test_png[1], "--question", "?", "--attention", "x.png",
                "--image-file", "nope.jpg", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "accuvqa: error: --image-file: image nope.jpg does not exist"
