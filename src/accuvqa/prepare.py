"""`accuvqa prepare`: write the bundled easy-VQA in the VQA v2 layout, check a VQA v2 tree, or check your own
images and questions and extract their features (DATASET folder); then build
the stores every other command reads: the question arrays and the packed features (commands also
build them themselves on first use; prepare does it ahead of time, with a summary)."""

from __future__ import annotations

import argparse
from pathlib import Path

from accuvqa.config import Config
from accuvqa.data.build import build_progress
from accuvqa.data.records import FOLDERS
from accuvqa.runlog import print_table


def main(cfg: Config, args: argparse.Namespace) -> int:
    """DATASET easyvqa: write it; DATASET vqa: validate the tree. Then build the stores every command reads
    (the question arrays, the packed features) and print a summary."""
    if cfg.DATASET == "folder":
        from accuvqa.data.folder import prepare_folder

        summary = prepare_folder(cfg)
        print_table(f"your images and questions at {cfg.DATASET_PATH}, features in {cfg.FEATURE_PATH}", {
            split: (f"{v['images']} images, {v['extracted now']} extracted now"
                    + (f", {len(v['unreadable'])} unreadable: {', '.join(v['unreadable'])}" if v["unreadable"] else ""))
            for split, v in summary.items()})
        folders = list(summary)
    elif cfg.DATASET in ("clevr", "clevr_shapes"):
        from accuvqa.data.clevr import ClevrLayout, prepare_clevr, write_shapes

        if cfg.DATASET == "clevr_shapes" and not ClevrLayout(cfg).has_split("train"):
            write_shapes(cfg, progress=build_progress(cfg.VERBOSE))
        summary = prepare_clevr(cfg)
        print_table(f"CLEVR at {cfg.DATASET_PATH}, features in {cfg.FEATURE_PATH}", {
            split: (f"{v['questions']} questions ({v['answered']} answered), {v['images']} images, "
                    f"{v['feature_files']} feature files, {v['extracted now']} extracted now")
            for split, v in summary.items()})
        folders = list(summary)
    elif cfg.DATASET == "gqa":
        from accuvqa.data.gqa import FRCN, prepare_gqa

        summary = prepare_gqa(cfg)
        print_table(f"GQA at {cfg.DATASET_PATH}, features in {cfg.FEATURE_PATH}: complete", {
            split: (f"{v['file']}: {v['questions']} questions, {v['images']} images with {FRCN} features, "
                    f"{v['grid']} with grid features" + (", choices" if v["choices"] else ""))
            for split, v in summary["splits"].items()})
        d = summary["dicts"]
        print(f"openvqa's dictionaries ({d['tokens']} tokens, {d['answers']} answers, longest question "
              f"{d['max_token']} tokens; from {d['from']}): TOKEN_DICT_PATH {d['token_dict']} "
              f"ANSWER_DICT_PATH {d['answer_dict']}")
        folders = [FRCN]
    elif cfg.DATASET != "easyvqa":
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
        folders = sorted({Path(f).name for v in summary["splits"].values() for f in v["feature_folders"]})
    else:
        from accuvqa.data.easyvqa import prepare_easyvqa

        summary = prepare_easyvqa(cfg, progress=build_progress(cfg.VERBOSE))
        print_table(f"easy-VQA written to {cfg.DATASET_PATH} and {cfg.FEATURE_PATH}", {
            split: f"{v['questions']} questions, {v['images']} images" for split, v in summary.items()})
        folders = [FOLDERS[split] for split in summary]
    _build_stores(cfg, folders)
    return 0


def _build_stores(cfg: Config, folders: list[str]) -> None:
    """The question store and each folder's packed features (kept when current, resumed when interrupted)."""
    from accuvqa.data.feature_store import pack_folder
    from accuvqa.data.question_store import question_store

    def size(folder: Path) -> str:
        return f"{sum(p.stat().st_size for p in folder.iterdir()) / 2**20:.1f} MiB"

    from accuvqa.data.layout import dataset_layout

    show = build_progress(cfg.VERBOSE)
    layout = dataset_layout(cfg)
    store = question_store(cfg, progress=show)
    rows = {"questions": f"{store.path} ({size(store.path)}; " + ", ".join(
        f"{split} {n}" for split, n in store.meta["questions"].items()) + ")"}
    for folder in folders:
        path = pack_folder(cfg.FEATURE_PATH, folder, cfg.IMG_FEAT_SIZE, progress=show, store_path=cfg.STORE_PATH,
                           layout=layout)
        rows[folder] = f"{path} ({size(path)})"
    print_table("prepared stores (the only data train, val, test, check, predict and serve read)", rows)
