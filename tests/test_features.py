"""Region features in either orientation: mcan-vqa's (D, N) `x` and bottom-up-attention.pytorch's (N, D)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.features import read_features
from accuvqa.data.loader import load_questions, make_dataset
from accuvqa.errors import DataError
from accuvqa.models import build_model, model_inputs
from accuvqa.predict import image_region_boxes, image_region_features
from conftest import write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size; its images have 3 to 9 regions, never 12


def _as_bottom_up_attention_pytorch(feature_path: Path) -> None:
    """Rewrite every .npz as bottom-up-attention.pytorch saves it: x (N, D), pixel boxes, and an `info` dict."""
    for path in feature_path.rglob("*.jpg.npz"):
        with np.load(path) as npz:
            x, bbox, w, h = npz["x"], npz["bbox"], npz["image_w"], npz["image_h"]
        info = {"objects": np.arange(x.shape[1]), "cls_prob": np.ones((x.shape[1], 3))}
        np.savez_compressed(path, x=np.ascontiguousarray(x.T), bbox=bbox, num_bbox=x.shape[1], image_w=w, image_h=h,
                            info=np.array(info, dtype=object))


@pytest.fixture
def twins(tmp_path):
    mcan = write_vqa_layout(tmp_path / "mcan", images_per_split=10, seed=2)
    shutil.copytree(tmp_path / "mcan", tmp_path / "bua")
    _as_bottom_up_attention_pytorch(tmp_path / "bua" / "feats")
    small = {"HIDDEN_SIZE": 32, "MULTI_HEAD": 4, "FLAT_MLP_SIZE": 32, "FLAT_OUT_SIZE": 64, "REL_HBASE": 8, "REL_SIZE": 8,
             "WORD_EMBED_SIZE": 16, "NUM_THREADS": 2, "VERBOSE": False}  # a tiny MMNasNet: it reads the boxes
    cfgs = [load_config(overrides={**small, "MODEL_USE": "mmnasnet", "DATASET_PATH": str(root / "vqa"),
                                   "FEATURE_PATH": str(root / "feats"), "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6})
            for root in (tmp_path / "mcan", tmp_path / "bua")]
    return cfgs, mcan


def test_a_regions_first_file_reads_as_its_features_first_twin(twins):
    (cfg_mcan, cfg_bua), _ = twins
    one = next(Path(cfg_mcan.FEATURE_PATH, "val2014").glob("*.jpg.npz"))
    twin = Path(cfg_bua.FEATURE_PATH, "val2014", one.name)
    with np.load(one) as npz:
        x = npz["x"]  # (D, N)
    with np.load(twin, allow_pickle=True) as npz:
        assert npz["x"].shape == x.T.shape and "info" in npz.files
    assert np.array_equal(read_features(twin, FEAT, 100), x.T)  # (N, D), computed apart: the file's own x
    assert np.array_equal(read_features(one, FEAT, 100), read_features(twin, FEAT, 100))
    feats = image_region_features(cfg_bua, twin)  # predict on a user's file
    assert np.array_equal(feats, x.T[:6])
    assert np.array_equal(image_region_boxes(cfg_bua, twin, len(feats)), image_region_boxes(cfg_mcan, one, len(feats)))


def test_twins_give_identical_batches_and_model_outputs(twins):
    outputs = []
    for cfg in twins[0]:
        questions = load_questions(cfg, "train", need_answers=True)
        dataset = make_dataset(cfg, questions, questions.vocab)
        batch = dataset[np.arange(len(dataset))]
        torch.manual_seed(0)
        model = build_model(cfg, len(questions.vocab.token_to_ix), len(questions.vocab.ans_to_ix)).eval()
        with torch.no_grad():
            outputs.append((batch, model(*model_inputs(cfg, batch))))
    (a, out_a), (b, out_b) = outputs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["bbox"].abs().sum() > 0  # the boxes (pixels) came through, not zeros
    assert torch.equal(out_a, out_b)


def test_as_many_regions_as_features_is_one_clear_error(tmp_path):
    path = tmp_path / "square.npz"
    np.savez(path, x=np.zeros((FEAT, FEAT), np.float32))
    with pytest.raises(DataError) as err:
        read_features(path, FEAT, 100)
    assert str(err.value) == (f"{path}: 'x' has shape ({FEAT}, {FEAT}): with as many regions as features "
                              f"(IMG_FEAT_SIZE {FEAT}) it cannot be told whether it is (D, N) or (N, D); extract this "
                              f"image with another number of regions")


def test_features_of_another_size_name_the_size_to_set(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros((36, 1024), np.float32))  # 36 regions of 1,024-d features, regions first
    with pytest.raises(DataError, match=r"neither side is IMG_FEAT_SIZE 2048; if these are 1024-d features of 36 "
                                        r"regions, set IMG_FEAT_SIZE 1024$"):
        read_features(path, 2048, 100)
    assert read_features(path, 1024, 100).shape == (36, 1024)
