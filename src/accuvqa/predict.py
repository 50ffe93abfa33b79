"""`accuvqa predict`: one image and one question -> the top answers of a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from accuvqa.checkpoint import load_trained
from accuvqa.config import Config
from accuvqa.data.features import read_boxes, read_features
from accuvqa.data.records import FOLDERS
from accuvqa.data.vocab import encode_question
from accuvqa.errors import DataError
from accuvqa.models import model_inputs, model_spec
from accuvqa.runtime import setup_runtime


def image_region_features(cfg: Config, image: str | Path) -> np.ndarray:
    """(N, IMG_FEAT_SIZE) features of one image: a features .npz, or (easyvqa) a PNG/JPEG file."""
    image_path = Path(image)
    if not image_path.is_file():
        raise DataError(f"image {image} does not exist")
    if image_path.suffix == ".npz":
        return read_features(image_path, cfg.IMG_FEAT_SIZE, cfg.IMG_FEAT_PAD_SIZE)
    if cfg.DATASET == "easyvqa":
        from accuvqa.data.easyvqa import image_file_features

        return image_file_features(image_path)
    raise DataError(f"{image}: with DATASET vqa, give the image's region features (.npz), "
                    f"e.g. {FOLDERS['val']}/COCO_val2014_<id>.jpg.npz")


def image_region_boxes(cfg: Config, image: str | Path, n_regions: int) -> np.ndarray:
    """(N, 4) boxes x1, y1, x2, y2 of the `n_regions` regions `image_region_features` gave for `image`."""
    image_path = Path(image)
    if image_path.suffix == ".npz":
        boxes = read_boxes(image_path, cfg.IMG_FEAT_PAD_SIZE)
    else:
        from accuvqa.data.easyvqa import image_features, read_rgb

        boxes = image_features(read_rgb(image_path))[1]
    if len(boxes) != n_regions:
        raise DataError(f"{image}: {len(boxes)} boxes 'bbox' for {n_regions} regions; boxes and features must come "
                        f"from the same detection")
    return boxes


def predict(cfg: Config, image: str, question: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Top-k answers with sigmoid scores for one image (PNG/JPEG for easyvqa, or a features .npz)."""
    feats = image_region_features(cfg, image)
    rt = setup_runtime(cfg)
    model, vocab, _, _ = load_trained(cfg, rt.device)
    batch = {"img_feat": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None].to(rt.device),
             "ques_ix": torch.from_numpy(encode_question(question, vocab.token_to_ix, cfg.MAX_TOKEN))[None]
             .to(rt.device)}
    if "bbox" in model_spec(cfg.MODEL_USE).inputs:  # a model that reads region boxes
        boxes = image_region_boxes(cfg, image, len(feats))
        batch["bbox"] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))[None].to(rt.device)
    model.eval()
    with torch.no_grad():
        logits = model(*model_inputs(cfg, batch))
    scores = torch.sigmoid(logits[0]).cpu()
    top = torch.topk(scores, min(top_k, scores.numel()))
    ix_to_ans = vocab.ix_to_ans
    return [(ix_to_ans[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Print `score  answer` lines, best first."""
    for answer, score in predict(cfg, args.image, args.question, args.top):
        print(f"{score:.4f}  {answer}")
    return 0
