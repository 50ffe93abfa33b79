"""Loader throughput on a VQA v2-shaped tree: (a) per-image `.npz` reads, (b) the packed feature store.

    .venv/bin/python benchmarks/make_vqa_tree.py --images 2000 --out /tmp/vqa_tree    # once
    .venv/bin/python benchmarks/loader_throughput.py --tree /tmp/vqa_tree [--split train] [--batches 100]
        [--repeats 3] [--batch-size 64] [--seed 0] [--repack] [--cold]

Since the data layer has one path (issue 23), a dataset always reads its features from the packed
stores; the per-image `.npz` reader is gone from the loader. Reader (a) keeps it here, for comparison
only: the same dataset as (b) (same questions, tokens, answer targets, collation), except that each
image's features are read from its own `.npz` file with `features.read_features` (and boxes with
`features.read_boxes`), as the loader did before the store.

(b) is built the way training builds it: the question store (`load_questions`; built first when
missing or stale), the tree's pinned dictionaries (`run_vocab`: TOKEN_DICT_PATH / ANSWER_DICT_PATH),
`make_dataset`, which reads the packed store of each feature folder the split uses. Each folder is
packed first with `pack_folder` (a current store is kept unless --repack; the packing time is printed
when it packs). The first 3 batches of (a) and (b) are compared, bit for bit, before anything is timed.

Both are timed the way the loop with NUM_WORKERS 0 calls them: `dataset[indices]`, which reads and
collates one batch (features zero-padded to the batch's longest image, tokens, soft answer scores).
The batches are `--batches` batches of `--batch-size` questions drawn in random order (one
permutation fixed by --seed), the same batches for both.

Warm: one untimed pass of each reader over the batches first, so the page cache holds what both
read; then --repeats timed passes, alternating (a) and (b) so that a change of load on a shared
machine hits both. samples/s = questions per second; the ratio is (b)/(a) of the medians.

--cold adds one pass of each after evicting the feature files and the stores from the page cache
with posix_fadvise(DONTNEED) (no root needed; the datasets are built afresh and then evicted). It
evicts this machine's page cache only: a virtual disk may still be cached by the host, so this is
"cold-ish". Within the pass an image asked for a second time is warm, as in a first epoch.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from accuvqa.config import load_config
from accuvqa.data.dataset import VQADataset
from accuvqa.data.feature_store import PackedFeatures, pack_folder, store_dir
from accuvqa.data.features import feature_file, read_boxes, read_features
from accuvqa.data.loader import load_questions, make_dataset, run_vocab

CHECKED_BATCHES = 3


class NpzReads(VQADataset):
    """Reader (a): the packed-store dataset `packed` with each image's features read from its own `.npz`."""

    def __init__(self, packed: VQADataset, feature_path: Path) -> None:  # takes packed's state, no __init__ of its own
        self.__dict__.update(packed.__dict__)
        questions = packed.questions
        folder_of = dict(zip(questions.image_id.tolist(), (questions.folders[f] for f in questions.folder.tolist())))
        self.paths = [feature_file(feature_path, folder_of[i], i) for i in self.image_ids]
        self.stores = []  # nothing is read from the store

    def _read(self, row: int) -> np.ndarray:
        return read_features(self.paths[row], self.feat_size, self.pad_size)

    def _read_boxes(self, row: int) -> np.ndarray:
        return read_boxes(self.paths[row], self.pad_size)


def files_of(feature_path: Path, folders: Sequence[str]) -> list[Path]:
    """Every feature file and store file of the folders (what a cold pass evicts)."""
    out: list[Path] = []
    for folder in folders:
        for root in (feature_path / folder, store_dir(feature_path, folder)):
            if root.is_dir():
                out += [Path(e.path) for e in os.scandir(root) if e.is_file()]
    return out


def evict(paths: Sequence[Path]) -> None:
    """Drop the files' clean pages from this machine's page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_pass(dataset, batches: Sequence[np.ndarray]) -> float:
    """Samples (questions) per second of one pass of `dataset[indices]` over the batches."""
    start = time.perf_counter()
    n = 0
    for indices in batches:
        n += len(dataset[indices]["index"])
    return n / (time.perf_counter() - start)


def build(name: str, cfg, questions, vocab, feature_path: Path) -> tuple[VQADataset, float]:
    """Dataset (a) or (b) and the seconds it took to set up (stores current: no packing counted)."""
    start = time.perf_counter()
    dataset = make_dataset(cfg, questions, vocab)
    if name.startswith("(a)"):
        dataset = NpzReads(dataset, feature_path)
    return dataset, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="the --out of benchmarks/make_vqa_tree.py")
    parser.add_argument("--split", default="train", help="train, val, or e.g. train+val")
    parser.add_argument("--batches", type=int, default=100, help="batches per pass (at most one epoch's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed warm passes of each reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repack", action="store_true", help="pack afresh even when a current store exists")
    parser.add_argument("--cold", action="store_true", help="also one pass of each after evicting the page cache")
    args = parser.parse_args()

    tree = args.tree.resolve()
    feature_path = tree / "coco_extract"
    cfg = load_config(None, {"DATASET": "vqa", "DATASET_PATH": str(tree / "vqa"), "FEATURE_PATH": str(feature_path),
                             "TRAIN_SPLIT": args.split, "TOKEN_DICT_PATH": str(tree / "token_dict.json"),
                             "ANSWER_DICT_PATH": str(tree / "answer_dict.json"), "VERBOSE": False})
    questions = load_questions(cfg, args.split, need_answers=True)
    vocab = run_vocab(cfg)
    folders = sorted({questions.folders[f] for f in np.unique(questions.folder).tolist()})

    n_batches = min(args.batches, len(questions) // args.batch_size)
    order = np.random.default_rng(args.seed).permutation(len(questions))
    batches = [order[i * args.batch_size: (i + 1) * args.batch_size] for i in range(n_batches)]
    n_images = len(np.unique(questions.image_id[np.concatenate(batches)])) if batches else 0

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"tree {tree}: split {args.split} ({'+'.join(folders)}), {len(questions)} questions; {n_batches} batches of "
          f"{args.batch_size} in random order (seed {args.seed}) = {n_batches * args.batch_size} questions on "
          f"{n_images} images per pass")

    pack_s, packed_now = 0.0, False
    for folder in folders:
        if args.repack:
            shutil.rmtree(store_dir(feature_path, folder), ignore_errors=True)
        existed = store_dir(feature_path, folder).is_dir()
        start = time.perf_counter()
        store = pack_folder(feature_path, folder, cfg.IMG_FEAT_SIZE)  # kept when current
        pack_s += time.perf_counter() - start
        packed_now |= not existed
        size = sum(p.stat().st_size for p in store.iterdir())
        how = "current, kept; checked in" if existed else "packed in"
        print(f"store {store}: {size / 2**20:.1f} MiB, {how} {time.perf_counter() - start:.1f} s")

    names = ("(a) per-image .npz", "(b) packed store")
    readers: dict[str, VQADataset] = {}
    rows: dict[str, dict] = {}
    for name in names:
        readers[name], setup = build(name, cfg, questions, vocab, feature_path)
        rows[name] = {"setup": setup, "pack": pack_s if packed_now and name.startswith("(b)") else None}
    a, b = readers.values()
    if a.stores or not b.stores or not all(isinstance(s, PackedFeatures) for s in b.stores):
        print("error: reader (a) must read the .npz files, reader (b) the packed store", file=sys.stderr)
        return 1
    for indices in batches[:CHECKED_BATCHES]:
        x, y = a[indices], b[indices]
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            print("error: a batch read from the packed store differs from the .npz one", file=sys.stderr)
            return 1
    print(f"the first {CHECKED_BATCHES} batches of (b) equal those of (a), bit for bit")
    del a, b

    for dataset in readers.values():  # warm-up: the page cache now holds what each reads
        timed_pass(dataset, batches)
    for name in readers:
        rows[name]["warm"] = []
    for _ in range(args.repeats):
        for name, dataset in readers.items():
            rows[name]["warm"].append(timed_pass(dataset, batches))

    if args.cold:
        readers.clear()
        dataset = None
        gc.collect()  # unmap the stores: mapped pages are not evicted
        files = files_of(feature_path, folders)
        for name in rows:
            dataset, _ = build(name, cfg, questions, vocab, feature_path)
            evict(files)
            rows[name]["cold"] = timed_pass(dataset, batches)
            del dataset
            gc.collect()

    print()
    warm_title = f"warm samples/s (median; min-max of {args.repeats})"
    header = f"{'reader':<20} {'setup s':>8} {'pack s':>7} {warm_title:>40}"
    header += f" {'cold-ish samples/s':>19}" if args.cold else ""
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        warm = row["warm"]
        pack = f"{row['pack']:.1f}" if row["pack"] is not None else "-"
        line = (f"{name:<20} {row['setup']:>8.2f} {pack:>7} "
                f"{f'{statistics.median(warm):.0f} ({min(warm):.0f}-{max(warm):.0f})':>40}")
        line += f" {row['cold']:>19.0f}" if args.cold else ""
        print(line)
    a_warm, b_warm = (statistics.median(rows[n]["warm"]) for n in names)
    ratio = f"ratio (b)/(a): warm {b_warm / a_warm:.1f}"
    if args.cold:
        ratio += f", cold-ish {rows[names[1]]['cold'] / rows[names[0]]['cold']:.1f}"
    print(ratio)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
