"""The packed feature store: bit-for-bit the .npz features, packed when missing, packed again when its folder
changed, named when damaged; under STORE_PATH when the data folders are read-only."""

import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import accuvqa.data.build as build_module
import accuvqa.data.feature_store as store_module
from accuvqa.config import load_config
from accuvqa.data.feature_store import PackedFeatures, open_features, pack_folder, store_dir
from accuvqa.data.features import feature_file, index_features, read_features
from accuvqa.data.loader import make_dataset
from accuvqa.data.question_store import question_store
from accuvqa.data.question_store import store_dir as question_store_dir
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.errors import DataError
from conftest import ROOT, TINY, batch_from_files, cli_overrides, run_cli, same_batch, write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size


@pytest.fixture
def layout(tmp_path):
    return write_vqa_layout(tmp_path, images_per_split=10)


def _npz(layout, folder):
    return index_features(layout["FEATURE_PATH"], [folder])


def _packings(caplog) -> list[str]:
    """The 'building the packed feature store' lines logged so far."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("building the packed feature store")]


def test_the_store_holds_every_region_box_and_size_of_the_npz_files_bit_for_bit(layout):
    path = pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    assert path == store_dir(layout["FEATURE_PATH"], "train2014") == Path(layout["FEATURE_PATH"], "train2014.packed")
    assert sorted(p.name for p in path.iterdir()) == ["features.npy", "index.npz", "meta.json"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["plan"] == {"format": store_module.FORMAT, "feat_size": FEAT} and meta["images"] == 10
    store = PackedFeatures(path, FEAT)
    assert isinstance(store.features, np.memmap)  # memory-mapped, not read
    with np.load(path / "index.npz") as index:
        boxes, sizes = index["boxes"], index["sizes"]
    files = _npz(layout, "train2014")
    assert sorted(files) == store.image_ids.tolist() and meta["regions"] == int(store.offsets[-1])
    for image_id, npz_path in files.items():
        with np.load(npz_path) as npz:
            x, bbox, size = npz["x"], npz["bbox"], (int(npz["image_w"]), int(npz["image_h"]))
        got = store.read(image_id, 10_000)
        assert got.dtype == np.float32 and np.array_equal(got, x.T)  # every region, bit for bit
        assert np.array_equal(store.read(image_id, 4), x.T[:4])  # cut as read_features cuts
        assert store.count(image_id) == x.shape[1]
        i = store.row[image_id]
        assert np.array_equal(boxes[store.offsets[i]: store.offsets[i + 1]], bbox)
        assert np.array_equal(store.read_boxes(image_id, 4), bbox[:4])
        assert tuple(sizes[i]) == size == store.image_size(image_id)


def test_batches_from_the_store_equal_batches_from_the_files_memory_mapped_or_preloaded(layout):
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    assert not store_dir(cfg.FEATURE_PATH, "train2014").exists()
    mapped = make_dataset(cfg, records, vocab)  # packs the folder first
    assert store_dir(cfg.FEATURE_PATH, "train2014").is_dir()
    assert all(isinstance(s.features, np.memmap) for s in mapped.stores)
    preloaded = make_dataset(cfg.replace(PRELOAD=True), records, vocab)  # features.npy read into memory
    assert all(type(s.features) is np.ndarray for s in preloaded.stores)
    files = {iid: np.load(p)["x"].shape[1] for iid, p in _npz(layout, "train2014").items()}
    assert mapped.regions.tolist() == [files[i] for i in mapped.image_ids] == preloaded.regions.tolist()
    order = np.random.default_rng(0).permutation(len(records))
    for batch in np.array_split(order, 5):
        expected = batch_from_files(records, batch, vocab, cfg.MAX_TOKEN, cfg.IMG_FEAT_PAD_SIZE, cfg.FEATURE_PATH)
        assert same_batch(mapped[batch], expected)
        assert same_batch(preloaded[batch], expected)


def test_open_features_packs_the_folders_without_a_store_and_keeps_the_current_ones(layout, caplog):
    caplog.set_level(logging.INFO, logger="accuvqa")
    train = pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    packed_at = (train / "features.npy").stat().st_mtime_ns
    assert len(_packings(caplog)) == 1 and not store_dir(layout["FEATURE_PATH"], "val2014").exists()
    stores = open_features(layout["FEATURE_PATH"], ["train2014", "val2014"], FEAT)
    assert len(_packings(caplog)) == 2 and "val2014.packed (it is not built yet" in _packings(caplog)[1]
    assert (train / "features.npy").stat().st_mtime_ns == packed_at  # current: kept as it was
    files = {**_npz(layout, "train2014"), **_npz(layout, "val2014")}
    assert set(stores) == set(files)
    for image_id, path in files.items():
        assert stores[image_id].path.name == path.parent.name + ".packed"
        assert np.array_equal(stores[image_id].read(image_id, 100), read_features(path, FEAT, 100))
    open_features(layout["FEATURE_PATH"], ["train2014", "val2014"], FEAT)
    assert len(_packings(caplog)) == 2


def test_a_changed_folder_is_named_and_the_next_command_packs_it_again(layout, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="accuvqa")
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    changed = next(iter(_npz(layout, "train2014").values()))
    image_id = int(changed.name.split("_")[-1].split(".")[0])
    with np.load(changed) as npz:
        kept = {k: npz[k] for k in npz.files}
    x = kept["x"] + 1
    np.savez(changed, **{**kept, "x": x})
    stores = open_features(layout["FEATURE_PATH"], ["train2014"], FEAT)  # what a command does
    assert "train2014.packed (train2014 changed since it was built" in _packings(caplog)[-1]
    assert np.array_equal(stores[image_id].read(image_id, 100), x.T)
    # `accuvqa prepare` packs a changed folder too, and says where every store is
    x2 = x * 2
    np.savez(changed, **{**kept, "x": x2})
    r = run_cli("prepare", "--config", "small", "--DATASET", "vqa", "--DATASET_PATH", layout["DATASET_PATH"],
                "--FEATURE_PATH", layout["FEATURE_PATH"], "--IMG_FEAT_SIZE", str(FEAT), "--VERBOSE", "False",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("prepared stores"):].splitlines()
    rows = {line.split()[0]: line.split()[1] for line in table[1:]}
    assert rows["questions"] == str(question_store_dir(load_config(overrides={
        "DATASET_PATH": layout["DATASET_PATH"]})))
    for folder in ("train2014", "val2014", "test2015"):
        assert rows[folder] == str(store_dir(layout["FEATURE_PATH"], folder))
    store = open_features(layout["FEATURE_PATH"], ["train2014"], FEAT)
    assert np.array_equal(store[image_id].read(image_id, 100), x2.T)


def test_with_its_folder_moved_away_a_store_stays_current(layout, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="accuvqa")
    pack_folder(layout["FEATURE_PATH"], "val2014", FEAT)
    expected = {iid: read_features(p, FEAT, 100) for iid, p in _npz(layout, "val2014").items()}
    shutil.move(Path(layout["FEATURE_PATH"], "val2014"), tmp_path / "val2014")
    stores = open_features(layout["FEATURE_PATH"], ["val2014"], FEAT)
    assert len(_packings(caplog)) == 1 and set(stores) == set(expected)
    for image_id, x in expected.items():
        assert np.array_equal(stores[image_id].read(image_id, 100), x)
    shutil.move(Path(layout["FEATURE_PATH"], "test2015"), tmp_path / "test2015")
    with pytest.raises(DataError, match=r"missing feature folder .*test2015"):  # never packed, nothing to pack
        open_features(layout["FEATURE_PATH"], ["test2015"], FEAT)


def test_a_truncated_store_is_named_and_packed_again_once_deleted(layout):
    path = pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    features = path / "features.npy"
    os.truncate(features, features.stat().st_size - 4 * FEAT)
    with pytest.raises(DataError, match=r"train2014.packed.*(truncated|cannot be read).*delete it: the next "
                                        r"command packs it again"):
        PackedFeatures(path, FEAT)
    with pytest.raises(DataError, match=r"train2014.packed.*(truncated|cannot be read)"):
        open_features(layout["FEATURE_PATH"], ["train2014"], FEAT)  # what a command meets
    with pytest.raises(DataError, match=r"holds features of size 12 \(format 2\), not IMG_FEAT_SIZE 16"):
        PackedFeatures(pack_folder(layout["FEATURE_PATH"], "val2014", FEAT), 16)
    shutil.rmtree(path)  # as the message says
    stores = open_features(layout["FEATURE_PATH"], ["train2014"], FEAT)
    for image_id, npz in _npz(layout, "train2014").items():
        assert np.array_equal(stores[image_id].read(image_id, 100), read_features(npz, FEAT, 100))


def _interrupt_packing_at_the_8th_image(layout, monkeypatch) -> tuple[list, object]:
    """Pack train2014 with progress marks every 3 images, interrupted (as by Ctrl-C) at its 8th image (after the
    marks at 3 and 6): (the files read, the real reader)."""
    monkeypatch.setattr(store_module, "_SAVE_EVERY", 3)
    reads = []
    real_read = store_module.read_regions

    def failing_read(path, feat_size):
        reads.append(path)
        if len(reads) == 8:
            raise KeyboardInterrupt
        return real_read(path, feat_size)

    monkeypatch.setattr(store_module, "read_regions", failing_read)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    return reads, real_read


def test_an_interrupted_packing_resumes_where_it_stopped(layout, monkeypatch):
    reads, real_read = _interrupt_packing_at_the_8th_image(layout, monkeypatch)
    final = store_dir(layout["FEATURE_PATH"], "train2014")
    assert not final.exists()  # nothing half-written is ever taken for a store
    partial = final.with_name(final.name + ".partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 6
    assert set(json.loads((partial / "plan.json").read_text())) == {"plan", "sources"}
    reads.clear()
    monkeypatch.setattr(store_module, "read_regions", lambda *a: reads.append(a[0]) or real_read(*a))
    pack_folder(layout["FEATURE_PATH"], "train2014", FEAT)
    assert len(reads) == 10 - 6  # only the images not packed yet
    assert not partial.exists()
    store = PackedFeatures(final, FEAT)
    with np.load(final / "index.npz") as index:
        boxes, sizes = index["boxes"], index["sizes"]
    for image_id, path in _npz(layout, "train2014").items():
        assert np.array_equal(store.read(image_id, 100), read_features(path, FEAT, 100))
        i = store.row[image_id]
        with np.load(path) as npz:  # the boxes and sizes of the images packed before the interruption too
            assert np.array_equal(boxes[store.offsets[i]: store.offsets[i + 1]], npz["bbox"])
            assert tuple(sizes[i]) == (int(npz["image_w"]), int(npz["image_h"]))


def test_an_interrupted_packing_whose_folder_changed_since_starts_afresh(layout, monkeypatch):
    reads, real_read = _interrupt_packing_at_the_8th_image(layout, monkeypatch)
    first = min(_npz(layout, "train2014"))  # among the images packed before the interruption
    path = feature_file(layout["FEATURE_PATH"], "train2014", first)
    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files}
    np.savez(path, **{**kept, "x": -kept["x"]})
    reads.clear()
    monkeypatch.setattr(store_module, "read_regions", lambda *a: reads.append(a[0]) or real_read(*a))
    store = PackedFeatures(pack_folder(layout["FEATURE_PATH"], "train2014", FEAT), FEAT)
    assert len(reads) == 10  # every image packed again
    assert np.array_equal(store.read(first, 100), -kept["x"].T)


# ----------------------------------------------------------------------------- read-only data folders

def _drop_file_permission_override() -> None:
    """preexec_fn: as root, give up the capabilities that ignore file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so that a folder made read-only with chmod is read-only to the command too."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_permission_override() -> bool:
    try:
        done = subprocess.run(["true"], preexec_fn=_drop_file_permission_override, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _read_only(*folders: str) -> list[Path]:
    """chmod a-w every folder under `folders` (themselves included); the folders, to give back write later."""
    made = []
    for folder in folders:
        for path in [Path(folder), *(p for p in Path(folder).rglob("*") if p.is_dir())]:
            path.chmod(0o555)
            made.append(path)
    return made


def _listing(*folders: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in Path(folder).rglob("*")}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="drops Linux capabilities when run as root")
def test_store_path_holds_both_stores_when_the_data_folders_are_read_only(layout, tmp_path):
    """A real read-only data tree (chmod a-w; as root the command runs without the capabilities that
    ignore file permissions): without STORE_PATH the error names STORE_PATH; with it, `prepare` puts
    both stores under it and `train` runs from them, and nothing in the data folders changes."""
    if os.geteuid() == 0 and not _can_drop_permission_override():
        pytest.skip("running as root without CAP_SETPCAP: chmod cannot make a folder read-only to the command")
    data = (layout["DATASET_PATH"], layout["FEATURE_PATH"])
    made = _read_only(*data)
    try:
        before = _listing(*data)
        keys = {**TINY, "DATASET": "vqa", "DATASET_PATH": layout["DATASET_PATH"],
                "FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6,
                "BATCH_SIZE": 10, "MAX_EPOCH": 1, "CKPTS_PATH": tmp_path / "ck", "RESULT_PATH": tmp_path / "res"}
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

        def cli(*args, **more):
            return subprocess.run([sys.executable, "-m", "accuvqa", *args, *cli_overrides({**keys, **more})],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                                  preexec_fn=_drop_file_permission_override)

        refused = cli("prepare")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert (f"cannot write the question store {layout['DATASET_PATH']}/train.qa (Permission denied): set "
                f"STORE_PATH to a writable folder") in refused.stderr
        refused = cli("train", VERSION="refused")
        assert refused.returncode == 2 and "set STORE_PATH to a writable folder" in refused.stderr, refused.stderr

        stores = tmp_path / "stores"
        done = cli("prepare", STORE_PATH=stores)
        assert done.returncode == 0, done.stderr
        question = list(stores.glob("*/train.qa"))
        packed = sorted(p.name for p in stores.glob("*/*.packed"))
        assert len(question) == 1 and question[0].parent.name.startswith("vqa-")
        assert packed == ["test2015.packed", "train2014.packed", "val2014.packed"]
        assert {p.parent.name.split("-")[0] for p in stores.glob("*/*.packed")} == {"feats"}
        trained = cli("train", STORE_PATH=stores, VERSION="ro")
        assert trained.returncode == 0, trained.stderr
        assert "building" not in trained.stderr  # prepare built them all, under STORE_PATH
        assert (tmp_path / "ck" / "ckpt_ro" / "epoch1.pkl").is_file()
        assert _listing(*data) == before  # nothing written in the data folders
    finally:
        for path in made:
            path.chmod(0o755)
    # what was stored under STORE_PATH is the data's
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": FEAT, "STORE_PATH": str(stores), "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    assert question_store(cfg).path == question[0]
    assert question_store(cfg).questions("train", True).questions() == [r.question for r in records]
    features = open_features(cfg.FEATURE_PATH, ["train2014"], FEAT, store_path=cfg.STORE_PATH)
    for image_id, path in _npz(layout, "train2014").items():
        assert features[image_id].path.parent.parent == stores
        assert np.array_equal(features[image_id].read(image_id, 100), read_features(path, FEAT, 100))


def test_store_path_in_process_with_writes_to_the_data_folders_failing(layout, tmp_path, monkeypatch):
    """The same in process, with the read-only filesystem injected: every open for writing, mkdir and
    os.open under the data folders fails with EROFS (chmod cannot stop root; this test runs the same as
    any user)."""
    data = [Path(layout["DATASET_PATH"]).resolve(), Path(layout["FEATURE_PATH"]).resolve()]

    def read_only(path) -> bool:
        path = Path(os.fspath(path)).resolve()
        return any(path == d or d in path.parents for d in data)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_mkdir, real_os_open = open, os.mkdir, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and read_only(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if read_only(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and read_only(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": FEAT, "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    before = _listing(*map(str, data))
    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "open", guarded_os_open)
    with pytest.raises(DataError, match=r"cannot write the question store .*train.qa \(Read-only file system\): set "
                                        r"STORE_PATH to a writable folder \(the data folders may stay read-only\)"):
        question_store(cfg)
    with pytest.raises(DataError, match=r"cannot write the packed feature store .*train2014.packed \(Read-only file "
                                        r"system\): set STORE_PATH to a writable folder"):
        make_dataset(cfg, records, vocab)
    stores = tmp_path / "stores"
    moved = cfg.replace(STORE_PATH=str(stores))
    store = question_store(moved)
    dataset = make_dataset(moved, store.questions("train", need_answers=True), store.vocab)
    monkeypatch.undo()
    assert _listing(*map(str, data)) == before
    assert store.path.parent.parent == stores and store.path == question_store_dir(moved)
    assert store.vocab == vocab
    assert {s.path for s in dataset.stores} == {store_dir(cfg.FEATURE_PATH, "train2014", str(stores))}
    assert store_dir(cfg.FEATURE_PATH, "train2014", str(stores)).parent.parent == stores
    indices = np.arange(len(records))
    assert same_batch(dataset[indices], batch_from_files(records, indices, vocab, cfg.MAX_TOKEN, cfg.IMG_FEAT_PAD_SIZE,
                                                         cfg.FEATURE_PATH))
    # two data folders of one name never share a folder under STORE_PATH
    assert (build_module.store_home(str(stores), tmp_path / "a" / "feats")
            != build_module.store_home(str(stores), tmp_path / "b" / "feats"))


def test_predict_reads_a_dataset_image_from_its_store_and_any_other_features_file_from_the_file(layout, tmp_path):
    """`predict --image <folder>/COCO_<folder>_<id>.jpg.npz` answers from the packed store only when that is
    the dataset's own file as it was packed (or moved away since): a file of the same name elsewhere (the
    user's own extraction), or one changed since the packing, is read itself."""
    from accuvqa.predict import image_region_features

    cfg = load_config(overrides={"FEATURE_PATH": layout["FEATURE_PATH"], "IMG_FEAT_SIZE": FEAT,
                                 "IMG_FEAT_PAD_SIZE": 100})
    pack_folder(layout["FEATURE_PATH"], "val2014", FEAT)
    image_id = min(_npz(layout, "val2014"))
    in_tree = feature_file(layout["FEATURE_PATH"], "val2014", image_id)
    packed = read_features(in_tree, FEAT, 100)
    assert np.array_equal(image_region_features(cfg, in_tree), packed)
    own = tmp_path / "mine" / in_tree.name
    own.parent.mkdir()
    np.savez(own, x=np.full((FEAT, 2), 7.0, np.float32))
    assert np.array_equal(image_region_features(cfg, own), np.full((2, FEAT), 7.0, np.float32))
    with np.load(in_tree) as npz:
        kept = {k: npz[k] for k in npz.files}
    np.savez(in_tree, **{**kept, "x": -kept["x"]})  # re-extracted since the packing
    assert np.array_equal(image_region_features(cfg, in_tree), -packed)
    in_tree.unlink()  # moved away: the store answers
    assert np.array_equal(image_region_features(cfg, in_tree), packed)
