"""`accuvqa extract`: torchvision's ResNets (outputs equal to torchvision's own, in float64), their weights loaded
strictly, grid features in the layout accuvqa reads, a resumable folder of one extractor, bad images named."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from accuvqa.backbone import BACKBONES, build_backbone
from accuvqa.config import load_config
from accuvqa.data.features import read_boxes, read_features
from accuvqa.errors import ConfigError, DataError
from accuvqa.extract import (
    IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_WEIGHTS, Extractor, ImageSource, extract, file_sha256, load_image,
    load_weights, main, sources_from_paths, weights_url)
from conftest import ROOT, run_cli

REFERENCE = ROOT / "tests/data/torchvision_resnet"
_spec = importlib.util.spec_from_file_location("make_torchvision_reference",
                                               ROOT / "tests/data/make_torchvision_reference.py")
tv_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tv_ref)  # the generator's weight rule and hashes (it imports nothing of torchvision)

SMALL = {"DEVICE": "cpu", "NUM_THREADS": 2, "VERBOSE": False, "EXTRACT_RESIZE": "square:64"}
FLOAT32_NOISE = 2e-5  # of the largest value: float32 maps of one image computed alone or in a batch (measured 2.3e-6)


def encoded(width: int, height: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A random image of this size and mode, encoded."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A torchvision-keyed resnet50 state dict (float32, drawn from a seed), as torch.save writes it."""
    shapes = tv_ref.shapes_of(build_backbone("resnet50").state_dict())
    state = {k: v.float() if v.is_floating_point() else v for k, v in tv_ref.seeded_state_dict(shapes, 1).items()}
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def extractor(weights_file) -> Extractor:
    return Extractor.from_config(load_config(overrides={**SMALL, "BACKBONE_WEIGHTS": str(weights_file)}))


def with_resize(extractor: Extractor, resize: str, layer: str = "c5") -> Extractor:
    """The same weights with another resize policy or layer."""
    from accuvqa.extract import parse_resize

    return Extractor(extractor.model, extractor.backbone, layer, parse_resize(resize), extractor.device,
                     extractor.spec["weights"], extractor.spec["weights_sha256"])


# ----------------------------------------------------------------------------- torchvision's architecture

@pytest.mark.parametrize("backbone", tv_ref.REFERENCE_BACKBONES)
def test_backbone_gives_torchvisions_own_maps_in_float64(backbone):
    """torchvision's resnet.py, run with the same seeded weights (tests/data/make_torchvision_reference.py), gave
    these c4 and c5 maps; ours, loaded strictly by name, give the same within 1e-10 of the largest value."""
    record = json.loads((REFERENCE / "reference.json").read_text())
    model = build_backbone(backbone)
    state = tv_ref.seeded_state_dict(tv_ref.shapes_of(model.state_dict()), record["seed"])
    assert tv_ref.state_sha256(state) == record["state_sha256"][backbone]  # the very weights torchvision ran
    model = load_weights(model, state, backbone, "seeded", dtype=torch.float64)
    with np.load(REFERENCE / "reference.npz") as ref:
        x = torch.from_numpy(ref["input"])
        for layer in ("c4", "c5"):
            expected = ref[f"{backbone}_{layer}"]
            with torch.inference_mode():
                got = model(x, layer).numpy()
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_has_torchvisions_keys_shapes_and_dtypes(backbone):
    record = json.loads((REFERENCE / "reference.json").read_text())["structure"][backbone]
    state = build_backbone(backbone).state_dict()  # on the meta device: no memory
    assert (len(state), tv_ref.structure_sha256(state)) == (record["keys"], record["sha256"])


def test_weights_table_lists_torchvisions_urls_and_defaults():
    listed = json.loads((REFERENCE / "reference.json").read_text())["weights"]
    for backbone, (enum, urls, default) in TORCHVISION_WEIGHTS.items():
        assert {**urls, "DEFAULT": default} == listed[enum], backbone
        assert weights_url(backbone, f"{enum}.DEFAULT") == urls[default] == weights_url(backbone, "DEFAULT")
    assert set(TORCHVISION_WEIGHTS) == set(BACKBONES)
    assert weights_url("resnet50", "IMAGENET1K_V1").endswith("resnet50-0676ba61.pth")
    with pytest.raises(ConfigError, match="are resnet101's weights, but BACKBONE is resnet50: set BACKBONE resnet101"):
        weights_url("resnet50", "ResNet101_Weights.IMAGENET1K_V2")
    with pytest.raises(ConfigError, match="no such file, and not a torchvision weights name.*--weights FILE"):
        weights_url("resnet50", "weights/missing.pth")


# ----------------------------------------------------------------------------- weights and keys

def test_a_torchvision_state_dict_file_loads_strictly_and_is_fingerprinted(extractor, weights_file):
    assert extractor.spec == {"backbone": "resnet50", "layer": "c5", "resize": "square:64",
                              "weights": str(weights_file.resolve()), "feat_size": 2048,
                              "weights_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest()}
    assert file_sha256(weights_file) == extractor.spec["weights_sha256"] and extractor.feat_size == 2048
    state = torch.load(weights_file, weights_only=True)  # fc included, all of it held
    held = extractor.model.state_dict()
    assert held.keys() == state.keys() and all(torch.equal(held[k], state[k]) for k in state)
    assert not extractor.model.training


def test_weights_that_do_not_fit_name_the_keys_and_backbone(tmp_path, weights_file):
    bad = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(3)}, bad)
    cfg = load_config(overrides={**SMALL, "BACKBONE_WEIGHTS": str(bad)})
    with pytest.raises(DataError, match=r"do not load strictly into BACKBONE resnet50: missing keys bn1\.weight, "
                                        r"bn1\.bias.*\(\+\d+ more\); unexpected keys head\.weight"):
        Extractor.from_config(cfg)
    state = torch.load(weights_file, weights_only=True)  # resnet50's weights into a ResNeXt: same keys, other shapes
    with pytest.raises(DataError, match=r"BACKBONE resnext50_32x4d: other shapes: layer1\.0\.conv1\.weight"):
        load_weights(build_backbone("resnext50_32x4d"), state, "resnext50_32x4d", "resnet50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read weights .*junk.pth.*torch.save\\(model.state_dict\\(\\)\\)"):
        Extractor.from_config(cfg.replace(BACKBONE_WEIGHTS=str(tmp_path / "junk.pth")))


def test_config_keys_are_checked_with_one_clear_error(weights_file):
    cfg = load_config(overrides={**SMALL, "BACKBONE_WEIGHTS": str(weights_file)})
    cases = [({"BACKBONE_WEIGHTS": ""}, "needs the backbone's weights: pass --weights FILE"),
             ({"BACKBONE": "resnet05"}, "BACKBONE 'resnet05' is not a known backbone; did you mean resnet50?"),
             ({"BACKBONE_LAYER": "c3"}, "BACKBONE_LAYER 'c3': expected c5"),
             ({"EXTRACT_RESIZE": "square"}, "EXTRACT_RESIZE 'square': expected square:N"),
             ({"EXTRACT_RESIZE": "wide:64"}, "EXTRACT_RESIZE 'wide:64'"),
             ({"EXTRACT_BATCH_SIZE": 0}, "EXTRACT_BATCH_SIZE must be at least 1")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
            Extractor.from_config(cfg.replace(**change))


def test_a_weights_name_offline_is_one_error_asking_for_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a closed port: no download reaches anything
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    cfg = load_config(overrides={**SMALL, "BACKBONE_WEIGHTS": "ResNet50_Weights.IMAGENET1K_V2"})
    with pytest.raises(ConfigError, match=r"ResNet50_Weights.IMAGENET1K_V2: cannot download https://download\.pytorch"
                                          r"\.org/models/resnet50-11ad3fa6\.pth .*pass it: --weights FILE"):
        Extractor.from_config(cfg)


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize("resize, layer, size, grid", [
    ("square:64", "c5", (96, 48), (2, 2)), ("square:64", "c4", (96, 48), (4, 4)),
    ("short:64", "c5", (96, 48), (2, 4)), ("short:64", "c4", (48, 96), (8, 4)),
    ("short:50", "c5", (75, 50), (2, 3))])  # 75 x 50 resized: the last column of cells is narrower
def test_grid_features_layout_in_original_pixels(extractor, resize, layer, size, grid):
    ex = with_resize(extractor, resize, layer)
    image = load_image(encoded(*size))
    [out] = ex.features([image])
    rows, cols = grid
    dim = {"c4": 1024, "c5": 2048}[layer]
    assert out["x"].shape == (dim, rows * cols) and out["x"].dtype == np.float32
    assert out["bbox"].shape == (rows * cols, 4) and out["bbox"].dtype == np.float32
    assert (int(out["image_w"]), int(out["image_h"]), int(out["num_bbox"])) == (*size, rows * cols)
    boxes = out["bbox"].reshape(rows, cols, 4)  # row-major cells tile the original image
    w, h = size
    assert np.allclose(boxes[:, 0, 0], 0) and np.allclose(boxes[:, -1, 2], w)
    assert np.allclose(boxes[0, :, 1], 0) and np.allclose(boxes[-1, :, 3], h)
    assert np.allclose(boxes[:, 1:, 0], boxes[:, :-1, 2]) and np.allclose(boxes[1:, :, 1], boxes[:-1, :, 3])
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    # independently: torchvision's preprocessing (PIL bilinear resize, ToTensor, Normalize) and the map, row-major
    width, height = ex.resize.output_size(*size)
    pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255
    x = torch.from_numpy(((pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1))[None]
    with torch.inference_mode():
        expected = extractor.model(x.contiguous(), layer)[0].numpy()  # (D, rows, cols)
    assert expected.shape == (dim, rows, cols)
    # float32 with other kernels possible (input layout, batch): 0 measured here, 2.3e-6 of the largest value
    # between a batch and one image (oneDNN); FLOAT32_NOISE is 10x that
    assert np.abs(out["x"].reshape(dim, rows, cols) - expected).max() <= FLOAT32_NOISE * np.abs(expected).max()


def test_images_of_every_kind_are_read_as_rgb_upright(extractor):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = load_image(encoded(40, 20, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (20, 40)
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=3)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(sixteen, "PNG")
    kinds = {"palette+transparency": buffer.getvalue(), "RGBA": encoded(8, 8, mode="RGBA"),
             "L": encoded(8, 8, mode="L"), "CMYK": encoded(8, 8, "JPEG", mode="CMYK"),
             "16-bit": sixteen.getvalue(), "GIF": encoded(8, 8, "GIF"), "WEBP": encoded(8, 8, "WEBP"),
             "TIFF": encoded(8, 8, "TIFF"), "BMP": encoded(8, 8, "BMP")}
    for kind, data in kinds.items():
        image = load_image(data)
        assert (image.mode, image.size) == ("RGB", (8, 8)), kind
    assert np.asarray(load_image(sixteen.getvalue())).min() == 255  # 16-bit white stays white
    [out] = extractor.features([rotated])
    assert (int(out["image_w"]), int(out["image_h"])) == (20, 40) and out["bbox"][:, 2].max() == 20


# ----------------------------------------------------------------------------- the folder

def photos(root: Path) -> Path:
    """A folder of four images (one in a subfolder, suffixes in any case) and a file that is not an image."""
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encoded(64, 48, seed=1))
    (root / "b.JPG").write_bytes(encoded(50, 70, "JPEG", seed=2))
    (root / "sub" / "c.jpeg").write_bytes(encoded(64, 64, "JPEG", seed=3))
    (root / "sub" / "d.webp").write_bytes(encoded(30, 40, "WEBP", seed=4))
    (root / "notes.md").write_text("not an image")
    return root


def test_sources_from_folders_files_and_lists(tmp_path):
    folder = photos(tmp_path / "photos")
    assert [s.name for s in sources_from_paths([folder])] == ["a.png", "b.JPG", "sub/c.jpeg", "sub/d.webp"]
    listed = tmp_path / "photos" / "list.txt"
    listed.write_text(f"# some\nsub/c.jpeg\n\n{folder / 'a.png'}\n")
    assert [s.name for s in sources_from_paths([listed, folder / "b.JPG"])] == ["sub/c.jpeg", "a.png", "b.JPG"]
    assert sources_from_paths([listed])[0].read() == (folder / "sub" / "c.jpeg").read_bytes()
    with pytest.raises(DataError, match="image .*nope.jpg does not exist"):
        sources_from_paths([tmp_path / "nope.jpg"])
    with pytest.raises(DataError, match="two images are named 'a.png'"):
        sources_from_paths([folder / "a.png", listed, folder])


def test_extract_writes_every_image_then_resumes(tmp_path, extractor):
    sources = sources_from_paths([photos(tmp_path / "photos")])
    out = tmp_path / "feats"
    first = extract(sources, out, extractor, batch_size=3, verbose=False)
    assert (first.done, first.skipped, first.bad) == (4, 0, [])
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png.npz", "b.JPG.npz", "extractor.json", "sub/c.jpeg.npz", "sub/d.webp.npz"]
    assert json.loads((out / "extractor.json").read_text()) == extractor.spec
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    again = extract(sources, out, extractor, batch_size=3, verbose=False)
    assert (again.done, again.skipped) == (0, 4) and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    (out / "sub" / "c.jpeg.npz").unlink()
    redo = extract(sources, out, extractor, batch_size=3, verbose=False)
    assert (redo.done, redo.skipped) == (1, 3)
    # what extract wrote is what the rest of accuvqa reads: (N, D) features and the same boxes
    with np.load(out / "b.JPG.npz") as npz:
        x, bbox, w, h, n = npz["x"], npz["bbox"], int(npz["image_w"]), int(npz["image_h"]), int(npz["num_bbox"])
    assert (w, h, n) == (50, 70, 4) and x.shape == (2048, 4)
    assert np.array_equal(read_features(out / "b.JPG.npz", 2048, 100), x.T)
    assert np.array_equal(read_boxes(out / "b.JPG.npz", 100), bbox)
    [direct] = extractor.features([load_image(sources[1].read())])
    assert np.abs(direct["x"] - x).max() <= FLOAT32_NOISE * np.abs(x).max()  # alone, or batched with 2 others


def test_writes_are_atomic_a_full_disk_leaves_no_file(tmp_path, extractor, monkeypatch):
    sources = [ImageSource("a.png", lambda: encoded(64, 64))]
    monkeypatch.setenv("ACCUVQA_DISK_FULL_AFTER", "4096")  # each file holds 4 KB at most: the .npz does not fit
    with pytest.raises(DataError, match="cannot write features .*a.png.npz"):
        extract(sources, tmp_path / "feats", extractor, batch_size=1, verbose=False)
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["extractor.json"]  # no torn .npz, no .tmp
    monkeypatch.delenv("ACCUVQA_DISK_FULL_AFTER")
    assert extract(sources, tmp_path / "feats", extractor, batch_size=1, verbose=False).done == 1


def test_bad_images_are_named_and_the_others_written(tmp_path, extractor):
    jpeg = encoded(64, 64, "JPEG", seed=5)
    sources = [ImageSource("good.png", lambda: encoded(64, 64)), ImageSource("junk.jpg", lambda: b"not an image"),
               ImageSource("cut.jpg", lambda: jpeg[: len(jpeg) // 2]), ImageSource("good2.jpg", lambda: jpeg),
               ImageSource("gone.png", lambda: (tmp_path / "gone.png").read_bytes())]
    summary = extract(sources, tmp_path / "feats", extractor, batch_size=2, verbose=False)
    assert summary.done == 2 and [name for name, _ in summary.bad] == ["junk.jpg", "cut.jpg", "gone.png"]
    reasons = dict(summary.bad)
    assert "not an image" in reasons["junk.jpg"] and "truncated" in reasons["cut.jpg"]
    assert "FileNotFoundError" in reasons["gone.png"]
    assert sorted(p.name for p in (tmp_path / "feats").glob("*.npz")) == ["good.png.npz", "good2.jpg.npz"]


def test_a_folder_never_mixes_two_extractors(tmp_path, extractor):
    sources = [ImageSource("a.png", lambda: encoded(64, 64))]
    extract(sources, tmp_path / "feats", extractor, batch_size=1, verbose=False)
    other = with_resize(extractor, "square:96")
    with pytest.raises(DataError, match=r"holds features of another extractor \(resize 'square:64' there, "
                                        r"'square:96' now.*another --out folder"):
        extract(sources + [ImageSource("b.png", lambda: encoded(64, 64))], tmp_path / "feats", other, 1, False)
    assert not (tmp_path / "feats" / "b.png.npz").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.png.npz").write_bytes(b"")
    with pytest.raises(DataError, match="no extractor.json: features of an unknown extractor"):
        extract(sources, tmp_path / "foreign", extractor, batch_size=1, verbose=False)


def test_main_all_bad_or_none_found_is_an_error(tmp_path, weights_file, capsys):
    cfg = load_config(overrides={**SMALL, "BACKBONE_WEIGHTS": str(weights_file)})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"nope")
    args = SimpleNamespace(images=[str(tmp_path / "junk")], out=str(tmp_path / "feats"), weights=None)
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        main(cfg, args)
    assert "bad: x.png" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in .*empty"):
        main(cfg, SimpleNamespace(images=[str(tmp_path / "empty")], out=str(tmp_path / "f2"), weights=None))


@pytest.mark.slow
def test_cli_extracts_a_folder_and_reports(tmp_path, weights_file):
    folder = photos(tmp_path / "photos")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    small = ["--DEVICE", "cpu", "--NUM_THREADS", "2", "--EXTRACT_RESIZE", "short:64", "--VERBOSE", "False"]
    done = run_cli("extract", str(folder), "--out", "feats", "--weights", str(weights_file), *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "extracted          4" in done.stdout and "bad                1" in done.stdout
    assert "bad: broken.png" in done.stdout and "images/s" in done.stdout
    assert len(list((tmp_path / "feats").rglob("*.npz"))) == 4
    no_weights = run_cli("extract", str(folder), "--out", "feats", *small, cwd=tmp_path)
    assert no_weights.returncode == 2 and "--weights FILE" in no_weights.stderr
    assert len(no_weights.stderr.strip().splitlines()) == 1 and "Traceback" not in no_weights.stderr
