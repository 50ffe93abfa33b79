"""Check a VQA v2 tree before a run: files present, questions joined to annotations and features.

`accuvqa prepare` with DATASET vqa calls `validate_vqa_tree`: it reads what a run reads (the
splits of TRAIN_SPLIT, plus val and test when their question files are there), and fails with
one DataError naming the first problem, or returns counts for a summary table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from accuvqa.config import Config
from accuvqa.data.features import feature_file, index_features, read_features
from accuvqa.data.records import FOLDERS, LAYOUT_HINT, VG_FOLDERS, load_split, parse_splits, question_file
from accuvqa.errors import DataError

SAMPLE_FILES = 3  # feature files opened per split to check their shape


def splits_to_check(cfg: Config) -> list[str]:
    """TRAIN_SPLIT's parts, then val and test when their question files exist."""
    splits = parse_splits(cfg.TRAIN_SPLIT)
    for split in ("val", "test"):
        if split not in splits and question_file(cfg.DATASET_PATH, split).is_file():
            splits.append(split)
    return splits


def validate_vqa_tree(cfg: Config) -> dict[str, Any]:
    """Counts per split (questions, annotations, images, feature files, regions), and notes.

    Raises DataError for a missing question/annotation file, a question without annotation, an
    image without a feature file (the first one's path and how many), or a malformed feature file.
    """
    summary: dict[str, Any] = {"splits": {}, "notes": []}
    indexes: dict[str, dict[int, Path]] = {}
    for split in splits_to_check(cfg):
        need_answers = split != "test"
        # load_split names a missing question or annotation file, with the expected layout
        records = load_split(cfg.DATASET_PATH, split, need_answers=need_answers)
        folders = (FOLDERS[split],) if split in FOLDERS else VG_FOLDERS
        index: dict[int, Path] = {}
        for folder in folders:
            if folder not in indexes:
                indexes[folder] = index_features(cfg.FEATURE_PATH, [folder])
            index.update(indexes[folder])
        images = list(dict.fromkeys(r.image_id for r in records))  # question order
        missing = [iid for iid in images if iid not in index]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(images)} {split} images have no feature file, the first "
                f"{feature_file(cfg.FEATURE_PATH, folders[0], missing[0])}"
                + (f" (or in {folders[1]})" if len(folders) > 1 else "") + f"; {LAYOUT_HINT}")
        regions = []
        for iid in images[:SAMPLE_FILES]:
            n = read_features(index[iid], cfg.IMG_FEAT_SIZE, sys.maxsize).shape[0]  # not cut
            regions.append(n)
            if n > cfg.IMG_FEAT_PAD_SIZE:
                summary["notes"].append(
                    f"{index[iid]} has {n} regions: those beyond IMG_FEAT_PAD_SIZE {cfg.IMG_FEAT_PAD_SIZE} "
                    f"are cut, as mcan-vqa does")
        summary["splits"][split] = {
            "questions": len(records),
            "annotations": sum(r.answers is not None for r in records) if need_answers else None,
            "images": len(images),
            "feature_files": sum(len(indexes[f]) for f in folders),
            "feature_folders": [str(Path(cfg.FEATURE_PATH) / f) for f in folders],
            "sampled_regions": regions,
        }
    return summary
