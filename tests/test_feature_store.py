"""The packed feature store: bit-for-bit the .npz features, used when current, named when stale."""

import json
import os

import numpy as np
import pytest
import torch

import accuvqa.data.feature_store as store_module
from accuvqa.config import load_config
from accuvqa.data.features import index_features, read_features
from accuvqa.data.loader import make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.feature_store import PackedFeatures, open_stores, pack_folder, store_dir
from accuvqa.data.vocab import build_vocab
from accuvqa.errors import DataError
from conftest import run_cli, write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size


@pytest.fixture
def layout(tmp_path):
    return write_vqa_layout(tmp_path, images_per_split=10)


def _npz(layout, folder):
    return index_features(layout["FEATURE_PATH"], [folder])


def test_the_store_holds_every_region_and_box_of_the_npz_files_bit_for_bit(layout):
    path = pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    assert path == store_dir(layout["FEATURE_PATH"], "train2014")
    assert sorted(p.name for p in path.iterdir()) == ["features.npy", "index.npz", "meta.json"]
    store = PackedFeatures(path, FEAT)
    with np.load(path / "index.npz") as index:
        boxes = index["boxes"]
    for image_id, npz_path in _npz(layout, "train2014").items():
        with np.load(npz_path) as npz:
            x, bbox = npz["x"], npz["bbox"]
        got = store.read(image_id, 10_000)
        assert got.dtype == np.float32 and np.array_equal(got, x.T)  # every region, bit for bit
        assert np.array_equal(store.read(image_id, 4), x.T[:4])  # cut as read_features cuts
        i = store.row[image_id]
        assert np.array_equal(boxes[store.offsets[i]: store.offsets[i + 1]], bbox)


def test_batches_from_the_store_equal_batches_from_the_files(layout):
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    from_files = make_dataset(cfg, records, vocab)
    assert not from_files.packed_store
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    from_store = make_dataset(cfg, records, vocab)
    assert from_store.packed_store
    assert np.array_equal(from_store.regions, from_files.regions)
    order = np.random.default_rng(0).permutation(len(records))
    for batch in np.array_split(order, 5):
        a, b = from_files[batch], from_store[batch]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # PRELOAD with a store: the page cache holds it, no copy in RAM, same batches
    preloaded = make_dataset(cfg.replace(PRELOAD=True), records, vocab)
    assert preloaded.packed is None and torch.equal(preloaded[order[:8]]["img_feat"], from_files[order[:8]]["img_feat"])


def test_a_store_is_used_only_when_every_folder_has_a_current_one(layout):
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    assert open_stores(layout["FEATURE_PATH"], ["train2014", "val2014"], FEAT) is None
    pack_folder(layout["FEATURE_PATH"], "val2014", FEAT)
    stores = open_stores(layout["FEATURE_PATH"], ["train2014", "val2014"], FEAT)
    assert set(stores) == set(_npz(layout, "train2014")) | set(_npz(layout, "val2014"))


def test_a_stale_store_is_named_and_prepare_packs_it_again(layout, tmp_path):
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    changed = next(iter(_npz(layout, "train2014").values()))
    with np.load(changed) as npz:
        x = npz["x"] + 1
    np.savez(changed, x=x)
    with pytest.raises(DataError, match=r"packed feature store .*train2014.packed is stale: its folder changed "
                                        r"since it was packed .*run accuvqa prepare again"):
        open_stores(layout["FEATURE_PATH"], ["train2014"], FEAT)
    r = run_cli("prepare", "--config", "small", "--DATASET", "vqa", "--DATASET_PATH", layout["DATASET_PATH"],
                "--FEATURE_PATH", layout["FEATURE_PATH"], "--IMG_FEAT_SIZE", str(FEAT), "--VERBOSE", "False",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "packed feature stores" in r.stdout and "train2014.packed" in r.stdout and "test2015.packed" in r.stdout
    store = open_stores(layout["FEATURE_PATH"], ["train2014"], FEAT)
    image_id = int(changed.name.split("_")[-1].split(".")[0])
    assert np.array_equal(store[image_id].read(image_id, 100), x.T)


def test_a_truncated_store_is_named(layout):
    path = pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    features = path / "features.npy"
    os.truncate(features, features.stat().st_size - 4 * FEAT)
    with pytest.raises(DataError, match=r"train2014.packed.*(truncated|cannot be read)"):
        PackedFeatures(path, FEAT)


def test_an_interrupted_packing_resumes_where_it_stopped(layout, monkeypatch):
    monkeypatch.setattr(store_module, "_SAVE_EVERY", 3)
    reads = []
    real_read = store_module.read_features

    def failing_read(path, feat_size, pad_size):
        reads.append(path)
        if len(reads) == 8:  # the packing dies at its 8th image (after the marks at 3 and 6)
            raise KeyboardInterrupt
        return real_read(path, feat_size, pad_size)

    monkeypatch.setattr(store_module, "read_features", failing_read)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    final = store_dir(layout["FEATURE_PATH"], "train2014")
    assert not final.exists()  # nothing half-written is ever taken for a store
    partial = final.with_name(final.name + ".partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 6
    reads.clear()
    monkeypatch.setattr(store_module, "read_features", lambda *a: reads.append(a[0]) or real_read(*a))
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    assert len(reads) == 10 - 6  # only the images not packed yet
    assert not partial.exists()
    store = PackedFeatures(final, FEAT)
    for image_id, path in _npz(layout, "train2014").items():
        assert np.array_equal(store.read(image_id, 100), read_features(path, FEAT, 100))
