"""Loader throughput on a VQA v2-shaped tree: (a) the per-image `.npz` reader, (b) the packed store.

    .venv/bin/python benchmarks/make_vqa_tree.py --images 2000 --out /tmp/vqa_tree    # once
    .venv/bin/python benchmarks/loader_throughput.py --tree /tmp/vqa_tree [--split train] [--batches 100]
        [--repeats 3] [--batch-size 64] [--seed 0] [--repack] [--cold]

Both readers are built the way training builds them (`load_records`, `build_vocab` with the tree's
pinned dictionaries, `make_dataset`) and timed the way the loop with NUM_WORKERS 0 calls them:
`dataset[indices]`, which reads and collates one batch (features zero-padded to the batch's
longest image, tokens, soft answer scores). The batches are `--batches` batches of `--batch-size`
questions drawn in random order (one permutation fixed by --seed), the same batches for both.

- (a) always: the per-image `.npz` files. A packed store already in the tree is moved aside
  (`<folder>.packed` -> `<folder>.packed.aside`) while dataset (a) is built, so that `make_dataset`
  falls back to the files, and put back at once (also after an error; a run killed in between leaves
  the `.aside` folder, which the next run puts back).
- (b) when `accuvqa.data.store` can be imported: `pack_folder` for each feature folder the split
  uses (a current store is kept unless --repack; the packing time is printed when it packs), then
  `make_dataset` again, which must pick the store up (checked; the first 3 batches of (b) are also
  compared with those of (a), bit for bit).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from accuvqa.config import load_config
from accuvqa.data.loader import make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab

ASIDE = ".aside"
CHECKED_BATCHES = 3


@contextmanager
def stores_moved_aside(feature_path: Path, folders: Sequence[str]) -> Iterator[None]:
    """Hide `<folder>.packed` for the duration, so that make_dataset reads the `.npz` files."""
    moved = []
    try:
        for folder in folders:
            store = feature_path / f"{folder}.packed"
            if store.exists():
                os.replace(store, store.with_name(store.name + ASIDE))
                moved.append(store)
        yield
    finally:
        for store in moved:
            os.replace(store.with_name(store.name + ASIDE), store)


def restore_left_aside(feature_path: Path, folders: Sequence[str]) -> None:
    """Put back a store that a killed run of this script left moved aside."""
    for folder in folders:
        store = feature_path / f"{folder}.packed"
        aside = store.with_name(store.name + ASIDE)
        if aside.exists() and not store.exists():
            os.replace(aside, store)
            print(f"note: put back {store}, left aside by an interrupted run")


def uses_store(dataset) -> bool:
    """Whether the dataset reads a packed store (its `packed_store` flag, else the kind of its first source)."""
    flag = getattr(dataset, "packed_store", None)
    if flag is not None:
        return bool(flag)
    try:
        from accuvqa.data.feature_store import PackedFeatures
    except ImportError:
        return False
    sources = getattr(dataset, "paths", [])
    return bool(sources) and isinstance(sources[0], PackedFeatures)


def files_of(feature_path: Path, folders: Sequence[str]) -> list[Path]:
    """Every feature file and store file of the folders (what a cold pass evicts)."""
    out: list[Path] = []
    for folder in folders:
        for root in (feature_path / folder, feature_path / f"{folder}.packed"):
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


def build(cfg, records, vocab) -> tuple[object, float]:
    start = time.perf_counter()
    dataset = make_dataset(cfg, records, vocab)
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
                             "TOKEN_DICT_PATH": str(tree / "token_dict.json"),
                             "ANSWER_DICT_PATH": str(tree / "answer_dict.json"), "VERBOSE": False})
    records = load_records(cfg, args.split, need_answers=True)
    vocab = build_vocab(cfg, records)
    folders = sorted({r.folder for r in records})
    restore_left_aside(feature_path, folders)

    n_batches = min(args.batches, len(records) // args.batch_size)
    order = np.random.default_rng(args.seed).permutation(len(records))
    batches = [order[i * args.batch_size: (i + 1) * args.batch_size] for i in range(n_batches)]
    n_images = len({records[i].image_id for b in batches for i in b})

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"tree {tree}: split {args.split} ({'+'.join(folders)}), {len(records)} questions; {n_batches} batches of "
          f"{args.batch_size} in random order (seed {args.seed}) = {n_batches * args.batch_size} questions on "
          f"{n_images} images per pass")

    rows: dict[str, dict] = {}
    with stores_moved_aside(feature_path, folders):
        dataset_a, setup_a = build(cfg, records, vocab)
    if uses_store(dataset_a):
        print("error: dataset (a) reads a packed store although none was visible", file=sys.stderr)
        return 1
    readers = {"(a) per-image .npz": dataset_a}
    rows["(a) per-image .npz"] = {"setup": setup_a, "pack": None}

    try:
        from accuvqa.data.feature_store import pack_folder, store_dir
    except ImportError as e:
        pack_folder = None
        print(f"note: (b) skipped: accuvqa.data.store cannot be imported ({e})")
    if pack_folder is not None:
        pack_s = 0.0
        packed_now = False
        for folder in folders:
            if args.repack:
                shutil.rmtree(store_dir(feature_path, folder), ignore_errors=True)
            existed = store_dir(feature_path, folder).is_dir()
            start = time.perf_counter()
            store = pack_folder(feature_path, folder, cfg.IMG_FEAT_SIZE)
            pack_s += time.perf_counter() - start
            packed_now |= not existed
            size = sum(p.stat().st_size for p in store.iterdir())
            how = "current, kept; checked in" if existed else "packed in"
            print(f"store {store}: {size / 2**20:.1f} MiB, {how} {time.perf_counter() - start:.1f} s")
        dataset_b, setup_b = build(cfg, records, vocab)
        if not uses_store(dataset_b):
            print("note: (b) skipped: make_dataset did not pick up the packed store (is the store wired in yet?)")
        else:
            for indices in batches[:CHECKED_BATCHES]:
                a, b = dataset_a[indices], dataset_b[indices]
                if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                    print("error: a batch read from the packed store differs from the .npz one", file=sys.stderr)
                    return 1
            print(f"the first {CHECKED_BATCHES} batches of (b) equal those of (a), bit for bit")
            readers["(b) packed store"] = dataset_b
            rows["(b) packed store"] = {"setup": setup_b, "pack": pack_s if packed_now else None}

    for dataset in readers.values():  # warm-up: the page cache now holds what each reads
        timed_pass(dataset, batches)
    for name in readers:
        rows[name]["warm"] = []
    for _ in range(args.repeats):
        for name, dataset in readers.items():
            rows[name]["warm"].append(timed_pass(dataset, batches))

    if args.cold:
        readers.clear()
        dataset_a = dataset_b = dataset = None
        gc.collect()  # unmap the stores: mapped pages are not evicted
        files = files_of(feature_path, folders)
        for name in rows:
            if name.startswith("(a)"):
                with stores_moved_aside(feature_path, folders):
                    dataset, _ = build(cfg, records, vocab)
            else:
                dataset, _ = build(cfg, records, vocab)
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
    names = list(rows)
    if len(names) == 2:
        a, b = (statistics.median(rows[n]["warm"]) for n in names)
        ratio = f"ratio (b)/(a): warm {b / a:.1f}"
        if args.cold:
            ratio += f", cold-ish {rows[names[1]]['cold'] / rows[names[0]]['cold']:.1f}"
        print(ratio)
    else:
        print("ratio (b)/(a): to be measured (no packed store)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
