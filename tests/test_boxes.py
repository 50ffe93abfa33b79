"""Region boxes in the batch: only for a model whose inputs name `bbox`, equal to the files' `bbox`."""

from pathlib import Path

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


def _assert_batches_hold_the_files_boxes(dataset, records, files, rows=None):
    """Batches over `rows` (default: every question) hold each image's `bbox` as its .npz file has it."""
    order = np.random.default_rng(0).permutation(np.arange(len(records)) if rows is None else np.asarray(rows))
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


def test_batches_carry_the_boxes_of_the_npz_files_memory_mapped_and_preloaded(layout):
    files = index_features(layout["FEATURE_PATH"], ["train2014"])
    mapped, records = _dataset(layout)  # packs the folder first
    assert all(isinstance(s.features, np.memmap) for s in mapped.stores)
    _assert_batches_hold_the_files_boxes(mapped, records, files)
    preloaded, _ = _dataset(layout, PRELOAD=True)
    assert all(type(s.features) is np.ndarray for s in preloaded.stores)
    _assert_batches_hold_the_files_boxes(preloaded, records, files)


def test_a_model_that_reads_no_boxes_gets_batches_without_them(layout):
    dataset, _ = _dataset(layout, model="mcan")
    assert set(dataset[np.arange(5)]) == {"img_feat", "ques_ix", "answer_scores", "index"}


def _strip_boxes(path):
    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files if k != "bbox"}
    np.savez(path, **kept)


def test_features_without_boxes_are_named_when_a_batch_needs_them(layout):
    files = index_features(layout["FEATURE_PATH"], ["train2014"])
    image_id = min(files)
    with np.load(files[image_id]) as npz:
        kept = {k: npz[k] for k in npz.files}
    _strip_boxes(files[image_id])
    dataset, records = _dataset(layout)  # the store holds zeros for the image's boxes
    index = [i for i, r in enumerate(records) if r.image_id == image_id][:1]
    others = [i for i, r in enumerate(records) if r.image_id != image_id]
    with pytest.raises(DataError, match=f"train2014.packed holds no boxes for image {image_id}: its .npz has no "
                                        f"'bbox'"):
        dataset[index]
    _assert_batches_hold_the_files_boxes(dataset, records, files, rows=others)
    _dataset(layout, model="mcan")[0][index]  # a model without boxes does not mind
    # the boxes written back: the folder changed, so the next dataset packs it again and reads them
    np.savez(files[image_id], **kept)
    again, _ = _dataset(layout)
    _assert_batches_hold_the_files_boxes(again, records, files)


def test_predict_reads_the_boxes_of_a_features_file_and_of_an_easyvqa_image(layout):
    cfg = load_config(overrides={"MODEL_USE": "mmnasnet", "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": PAD})
    for path in index_features(layout["FEATURE_PATH"], ["val2014"]).values():
        with np.load(path) as npz:
            expected = npz["bbox"][:PAD]
        feats = image_region_features(cfg, path)
        assert np.array_equal(image_region_boxes(cfg, path, len(feats)), expected)
    # a dataset image of FEATURE_PATH: read from its folder's packed store, also once its .npz is moved away
    in_tree = cfg.replace(FEATURE_PATH=layout["FEATURE_PATH"])
    files = index_features(layout["FEATURE_PATH"], ["val2014"])
    expected = {}
    for image_id, path in files.items():
        with np.load(path) as npz:
            expected[image_id] = npz["x"].T[:PAD], npz["bbox"][:PAD]
    pack_folder(layout["FEATURE_PATH"], "val2014", FEAT)
    folder = Path(layout["FEATURE_PATH"], "val2014")
    folder.rename(folder.with_name("val2014.aside"))
    for image_id, path in files.items():
        assert not path.exists()
        feats = image_region_features(in_tree, path)
        assert np.array_equal(feats, expected[image_id][0])
        assert np.array_equal(image_region_boxes(in_tree, path, len(feats)), expected[image_id][1])
    import easy_vqa

    from accuvqa.data.easyvqa import image_features, read_rgb

    png = easy_vqa.get_test_image_paths()[0]
    easy = load_config(overrides={"MODEL_USE": "mmnasnet", "DATASET": "easyvqa", "IMG_FEAT_SIZE": 32})
    boxes = image_region_boxes(easy, png, len(image_region_features(easy, png)))
    assert np.array_equal(boxes, image_features(read_rgb(png))[1])
    assert boxes[1].tolist() == [0, 0, 32, 32]  # the first 32 x 32 grid cell, in pixels
