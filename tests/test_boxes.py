"""Region boxes in the batch: only for a model whose inputs name `bbox`, equal to the files' `bbox`."""

import numpy as np
import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.features import index_features
from accuvqa.data.loader import make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.feature_store import pack_folder
from accuvqa.data.vocab import build_vocab
from accuvqa.errors import DataError
from accuvqa.predict import image_region_boxes, image_region_features
from conftest import write_vqa_layout

FEAT, PAD = 12, 6  # write_vqa_layout's feature size; fewer than its largest images' 9 regions: boxes are cut


@pytest.fixture
def layout(tmp_path):
    return write_vqa_layout(tmp_path, images_per_split=10)  # enough answers seen 9 times for a dictionary


def _dataset(layout, model="mmnasnet", **over):
    cfg = load_config(overrides={"MODEL_USE": model, "DATASET_PATH": layout["DATASET_PATH"],
                                 "FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": FEAT,
                                 "IMG_FEAT_PAD_SIZE": PAD, "VERBOSE": False, **over})
    records = load_records(cfg, "train", need_answers=True)
    return make_dataset(cfg, records, build_vocab(cfg, records)), records


def _assert_batches_hold_the_files_boxes(dataset, records, files):
    order = np.random.default_rng(0).permutation(len(records))
    for indices in np.array_split(order, 4):
        batch = dataset[indices]
        assert batch["bbox"].dtype == torch.float32
        assert batch["bbox"].shape == (*batch["img_feat"].shape[:2], 4)
        for b, i in enumerate(indices):
            with np.load(files[records[i].image_id]) as npz:
                expected = npz["bbox"][:PAD].astype(np.float32)
            n = len(expected)
            assert np.array_equal(batch["bbox"][b, :n].numpy(), expected)
            assert not batch["bbox"][b, n:].any() and not batch["img_feat"][b, n:].any()  # padded alike


def test_batches_carry_the_boxes_of_the_npz_files_the_packed_store_and_preload(layout):
    files = index_features(layout["FEATURE_PATH"], ["train2014"])
    from_files, records = _dataset(layout)
    assert not from_files.packed_store
    _assert_batches_hold_the_files_boxes(from_files, records, files)
    preloaded, _ = _dataset(layout, PRELOAD=True)
    assert preloaded.packed_boxes is not None
    _assert_batches_hold_the_files_boxes(preloaded, records, files)
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    from_store, _ = _dataset(layout)
    assert from_store.packed_store
    _assert_batches_hold_the_files_boxes(from_store, records, files)


def test_a_model_that_reads_no_boxes_gets_batches_without_them(layout):
    dataset, _ = _dataset(layout, model="mcan")
    assert set(dataset[np.arange(5)]) == {"img_feat", "ques_ix", "answer_scores", "index"}


def _strip_boxes(path):
    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files if k != "bbox"}
    np.savez(path, **kept)


def test_features_without_boxes_are_named_from_files_and_from_a_store(layout):
    files = index_features(layout["FEATURE_PATH"], ["train2014"])
    image_id = min(files)
    _strip_boxes(files[image_id])
    dataset, records = _dataset(layout)
    index = [i for i, r in enumerate(records) if r.image_id == image_id][:1]
    with pytest.raises(DataError, match=f"{files[image_id]} holds no region boxes 'bbox'"):
        dataset[index]
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    from_store, _ = _dataset(layout)
    with pytest.raises(DataError, match=f"holds no boxes for image {image_id}"):
        from_store[index]
    _dataset(layout, model="mcan")[0][index]  # a model without boxes does not mind


def test_predict_reads_the_boxes_of_a_features_file_and_of_an_easyvqa_image(layout):
    cfg = load_config(overrides={"MODEL_USE": "mmnasnet", "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": PAD})
    for path in index_features(layout["FEATURE_PATH"], ["val2014"]).values():
        with np.load(path) as npz:
            expected = npz["bbox"][:PAD]
        feats = image_region_features(cfg, path)
        assert np.array_equal(image_region_boxes(cfg, path, len(feats)), expected)
    import easy_vqa

    from accuvqa.data.easyvqa import image_features, read_rgb

    png = easy_vqa.get_test_image_paths()[0]
    easy = load_config(overrides={"MODEL_USE": "mmnasnet", "DATASET": "easyvqa", "IMG_FEAT_SIZE": 32})
    boxes = image_region_boxes(easy, png, len(image_region_features(easy, png)))
    assert np.array_equal(boxes, image_features(read_rgb(png))[1])
    assert boxes[1].tolist() == [0, 0, 32, 32]  # the first 32 x 32 grid cell, in pixels
