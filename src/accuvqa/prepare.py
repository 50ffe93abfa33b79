"""`accuvqa prepare`: write the bundled easy-VQA in the VQA v2 layout, or check a VQA v2 tree; then
encode its questions and answers as arrays (and, for VQA v2, pack its features)."""

from __future__ import annotations

import argparse
from typing import Sequence

from accuvqa.config import Config
from accuvqa.runlog import progress


def _progress(cfg: Config, items: Sequence, desc: str) -> Sequence:
    """A bar on a terminal; elsewhere one line per tenth of the work."""
    return progress(items, desc=desc, every=max(1, len(items) // 10), disable=not cfg.VERBOSE)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """DATASET easyvqa: write it; DATASET vqa: validate the tree and pack its features. Print a summary."""
    from accuvqa.cli import print_table

    if cfg.DATASET != "easyvqa":
        from accuvqa.data.validate import validate_vqa_tree

        summary = validate_vqa_tree(cfg)
        print_table(f"VQA v2 tree at {cfg.DATASET_PATH} and {cfg.FEATURE_PATH}: complete", {
            split: (f"{v['questions']} questions, "
                    + (f"{v['annotations']} annotated, " if v["annotations"] is not None else "")
                    + f"{v['images']} images, {v['feature_files']} feature files, "
                    f"regions {'/'.join(map(str, v['sampled_regions']))} in the first files")
            for split, v in summary["splits"].items()})
        for note in summary["notes"]:
            print(f"note: {note}")
        _pack(cfg, sorted({f for v in summary["splits"].values() for f in v["feature_folders"]}))
        _encode_questions(cfg)
        return 0
    from accuvqa.data.easyvqa import prepare_easyvqa

    summary = prepare_easyvqa(cfg, progress=lambda items, desc: _progress(cfg, items, desc))
    print_table(f"easy-VQA written to {cfg.DATASET_PATH} and {cfg.FEATURE_PATH}", {
        split: f"{v['questions']} questions, {v['images']} images" for split, v in summary.items()})
    _encode_questions(cfg)
    return 0


def _encode_questions(cfg: Config) -> None:
    """Write the questions, answer targets and dictionaries as arrays (kept when current)."""
    from accuvqa.data.qa_store import prepare_qa_store
    from accuvqa.errors import DataError

    try:
        store, counts = prepare_qa_store(cfg)
    except DataError as e:  # the tree is fine; a run reading it would stop on the same error
        print(f"note: question arrays not written ({e}); runs read the JSON")
        return
    size = sum(p.stat().st_size for p in store.iterdir())
    print(f"question arrays (read by train, val and test): {store} ({size / 2**20:.1f} MiB; "
          + ", ".join(f"{split} {n} questions" for split, n in counts.items()) + ")")


def _pack(cfg: Config, folders: list[str]) -> None:
    """Pack each feature folder into its memory-mapped store (kept when current, resumed when interrupted)."""
    from pathlib import Path

    from accuvqa.cli import print_table
    from accuvqa.data.store import pack_folder

    rows = {}
    for folder in folders:
        name = Path(folder).name
        store = pack_folder(cfg.FEATURE_PATH, name, cfg.IMG_FEAT_SIZE,
                            progress=lambda items, desc: _progress(cfg, items, desc))
        size = sum(p.stat().st_size for p in store.iterdir())
        rows[name] = f"{store} ({size / 2**20:.1f} MiB)"
    print_table("packed feature stores (read by train, val, test and predict)", rows)
