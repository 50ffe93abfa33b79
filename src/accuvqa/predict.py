"""`accuvqa predict`: one image and one question -> the top answers of a trained model, and with
`--attention OUT.png` a picture of where it looked (see `accuvqa.attention`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from accuvqa.attention import (Answer, check_picture_path, cut_maps, draw_attention, exposes_attention, read_image,
                               require_attention)
from accuvqa.checkpoint import load_trained_state
from accuvqa.config import Config
from accuvqa.data.feature_store import PackedFeatures, dataset_image
from accuvqa.data.features import _READ_ERRORS, read_boxes, read_features
from accuvqa.data.records import FOLDERS
from accuvqa.data.vocab import encode_tokens, tokenize
from accuvqa.errors import ConfigError, DataError
from accuvqa.models import model_inputs, model_spec
from accuvqa.runtime import setup_runtime


def _in_store(cfg: Config, image: str | Path) -> tuple[PackedFeatures, int] | None:
    """A dataset image's packed store and id, when `image` names one of its feature files (present or not)."""
    return dataset_image(cfg.FEATURE_PATH, image, cfg.IMG_FEAT_SIZE, cfg.STORE_PATH)


def image_region_features(cfg: Config, image: str | Path) -> np.ndarray:
    """(N, IMG_FEAT_SIZE) features of one image: a dataset image's from its packed store, another features
    .npz's, or (easyvqa) those of a PNG/JPEG file."""
    image_path = Path(image)
    found = _in_store(cfg, image_path)
    if found is not None:
        return np.array(found[0].read(found[1], cfg.IMG_FEAT_PAD_SIZE))  # a writable copy of the store's rows
    if not image_path.is_file():
        raise DataError(f"image {image} does not exist")
    if image_path.suffix == ".npz":
        return read_features(image_path, cfg.IMG_FEAT_SIZE, cfg.IMG_FEAT_PAD_SIZE)
    if cfg.DATASET == "easyvqa":
        from accuvqa.data.easyvqa import image_file_features

        return image_file_features(image_path)
    raise DataError(f"{image}: this model reads region features: give the image's features file (.npz), "
                    f"e.g. {FOLDERS['val']}/COCO_val2014_<id>.jpg.npz for VQA v2")


def image_regions(cfg: Config, image: str | Path) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """Region boxes (N, 4) x1, y1, x2, y2 in image pixels and the image's (width, height), either None
    when unknown: a features .npz's `bbox`, `image_w`, `image_h`, or easy-VQA's own regions of an image file."""
    image_path = Path(image)
    found = _in_store(cfg, image_path)
    if found is not None:
        store, image_id = found
        has_boxes = store.count(image_id) == 0 or store.read_boxes(image_id, 1, missing_ok=True).any()
        return (store.read_boxes(image_id, cfg.IMG_FEAT_PAD_SIZE) if has_boxes else None), store.image_size(image_id)
    if image_path.suffix == ".npz":
        try:
            with np.load(image_path) as npz:
                boxes = npz["bbox"] if "bbox" in npz.files else None
                size = (int(npz["image_w"]), int(npz["image_h"])) if {"image_w", "image_h"} <= set(npz.files) else None
        except _READ_ERRORS as e:
            raise DataError(f"cannot read the boxes of {image}: {e}") from e
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32)[:cfg.IMG_FEAT_PAD_SIZE]
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise DataError(f"{image}: 'bbox' has shape {boxes.shape}, expected (N, 4) x1, y1, x2, y2")
        return boxes, size
    if cfg.DATASET == "easyvqa":
        from accuvqa.data.easyvqa import image_features, read_rgb

        rgb = read_rgb(image_path)
        return image_features(rgb)[1], (rgb.shape[1], rgb.shape[0])
    return None, None


class Predictor:
    """A trained model loaded once (model, vocabularies, device) for many questions."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = setup_runtime(cfg).device
        self.model, self.vocab, self.checkpoint, self.epoch, state = load_trained_state(cfg, self.device)
        self.model.eval()
        # how the training features were computed from images (`accuvqa extract`); None: unknown
        self.extractor_spec: dict | None = state.get("extractor")
        self._extractor = None  # loaded on the first photo

    @property
    def reads_photos(self) -> bool:
        """Whether a photo alone can be answered: the checkpoint records its extractor, or easy-VQA's own features."""
        return self.extractor_spec is not None or self.cfg.DATASET == "easyvqa"

    def extractor(self):
        """The extractor the checkpoint records, loaded once: DataError when its weights are not the recorded ones."""
        if self._extractor is None:
            from accuvqa.extract import Extractor

            spec, cfg = self.extractor_spec, self.cfg
            weights = cfg.BACKBONE_WEIGHTS or spec["weights"]
            if not Path(weights).is_file() and Path(spec["weights"]).is_absolute():
                raise DataError(f"the checkpoint {self.checkpoint} was trained on features of {spec['backbone']} "
                                f"{spec['layer']} with the weights {weights}, which are not there: give them with "
                                f"--BACKBONE_WEIGHTS FILE (sha256 {spec['weights_sha256']})")
            extractor = Extractor.from_config(cfg.replace(BACKBONE=spec["backbone"], BACKBONE_LAYER=spec["layer"],
                                                          EXTRACT_RESIZE=spec["resize"], BACKBONE_WEIGHTS=weights),
                                              device=str(self.device))
            if extractor.spec["weights_sha256"] != spec["weights_sha256"]:
                raise DataError(f"the weights {weights} (sha256 {extractor.spec['weights_sha256'][:16]}...) are not "
                                f"the ones the training features were extracted with (sha256 "
                                f"{spec['weights_sha256'][:16]}..., recorded in {self.checkpoint}): give those with "
                                f"--BACKBONE_WEIGHTS FILE")
            self._extractor = extractor
        return self._extractor

    def photo_regions(self, photo: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Features (N, D), boxes (N, 4) in the photo's pixels and its (width, height), by the recorded extractor."""
        from accuvqa.extract import load_image

        if self.extractor_spec is None:
            raise DataError(f"the model of {self.checkpoint} was trained on features of unknown origin (not written "
                            f"by accuvqa extract, e.g. VQA v2's downloaded region features), so a photo cannot be "
                            f"turned into its features here: give the image's features file (.npz) with --image")
        try:
            image = load_image(Path(photo).read_bytes())
        except OSError as e:
            raise DataError(f"cannot read the photo {photo}: {e.strerror or e}") from e
        except Exception as e:  # PIL's errors for a file that is not an image
            raise DataError(f"{photo} is not an image that can be read ({type(e).__name__})") from e
        [out] = self.extractor().features([image])
        pad = self.cfg.IMG_FEAT_PAD_SIZE
        feats = np.ascontiguousarray(out["x"].T[:pad], dtype=np.float32)
        if feats.shape[1] != self.cfg.IMG_FEAT_SIZE:
            raise DataError(f"the recorded extractor gives {feats.shape[1]}-d features, not IMG_FEAT_SIZE "
                            f"{self.cfg.IMG_FEAT_SIZE}: use the config the model was trained with")
        return feats, np.asarray(out["bbox"][:pad], dtype=np.float32), (int(out["image_w"]), int(out["image_h"]))

    def regions(self, image: str | Path) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
        """Features (N, D), boxes (N, 4) or None, and (width, height) or None of an image: a features .npz (or a
        dataset image's), a photo through the checkpoint's extractor, or (easyvqa) a picture's own features."""
        path = Path(image)
        if path.suffix.lower() != ".npz" and self.extractor_spec is not None and _in_store(self.cfg, path) is None:
            return self.photo_regions(path)
        boxes, size = image_regions(self.cfg, path)
        return image_region_features(self.cfg, path), boxes, size

    @property
    def exposes_attention(self) -> bool:
        """Whether the model can keep attention maps (MCAN can)."""
        return exposes_attention(self.model)

    def features(self, image: str | Path) -> np.ndarray:
        """(N, IMG_FEAT_SIZE) float32 region features of a features .npz or (easyvqa) an image file."""
        return image_region_features(self.cfg, image)

    def boxes(self, image: str | Path) -> np.ndarray | None:
        """(N, 4) region boxes x1, y1, x2, y2 in image pixels, None when the features carry none."""
        return image_regions(self.cfg, image)[0]

    def image_size(self, image: str | Path) -> tuple[int, int] | None:
        """(width, height) of the image the boxes refer to, None when unknown."""
        return image_regions(self.cfg, image)[1]

    def answer(self, feats: np.ndarray, question: str, top_k: int = 5, boxes: np.ndarray | None = None,
               attention: bool = True) -> Answer:
        """Top-k answers to `question` about the image of `feats`, with the attention maps of the same
        forward pass when `attention` and the model exposes them."""
        cfg = self.cfg
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != cfg.IMG_FEAT_SIZE:
            raise DataError(f"features of shape {feats.shape}, expected (N, {cfg.IMG_FEAT_SIZE}) (IMG_FEAT_SIZE)")
        words = tokenize(question)[:cfg.MAX_TOKEN]
        if not words:
            raise DataError(f"the question {question!r} has no words")
        token_to_ix = self.vocab.token_to_ix
        batch = {"img_feat": torch.from_numpy(feats)[None].to(self.device),
                 "ques_ix": torch.from_numpy(encode_tokens(words, token_to_ix, cfg.MAX_TOKEN))[None].to(self.device)}
        if reads_boxes(cfg):  # a model that reads region boxes (MMNasNet's relation embedding)
            if boxes is None or len(boxes) != len(feats):
                raise DataError(f"model {cfg.MODEL_USE} reads each region's box: give the {len(feats)} boxes "
                                f"('bbox') of these features, got {'none' if boxes is None else len(boxes)}")
            batch["bbox"] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))[None].to(self.device)
        keep = attention and self.exposes_attention
        if keep:
            self.model.keep_attention(True)
        try:
            with torch.no_grad():
                logits = self.model(*model_inputs(cfg, batch))
                maps = self.model.attention_maps() if keep else {}
        finally:
            if keep:
                self.model.keep_attention(False)
        scores = torch.sigmoid(logits[0].float()).cpu()
        top = torch.topk(scores, min(top_k, scores.numel()))
        ix_to_ans = self.vocab.ix_to_ans
        result = Answer(question, [(ix_to_ans[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())],
                        [w if w in token_to_ix else "UNK" for w in words], boxes=boxes)
        if keep:
            result.maps = cut_maps(maps, len(words), len(feats))
            result.region_weights = result.maps["image_flat"].mean(axis=1)
        return result

    def draw(self, answer: Answer, out: str | Path | None = None, *, image_file: str | Path | None = None,
             boxes: np.ndarray | None = None, image_size: tuple[int, int] | None = None, layers: bool = False):
        """The attention picture of `answer` (PIL image), also written to `out` as a PNG when given."""
        require_attention(self.model, self.cfg.MODEL_USE)
        return draw_attention(answer, out, image_file=image_file, boxes=boxes, image_size=image_size, layers=layers)


def reads_boxes(cfg: Config) -> bool:
    """Whether the configured model's forward takes region boxes (`bbox`)."""
    return "bbox" in model_spec(cfg.MODEL_USE).inputs


def image_region_boxes(cfg: Config, image: str | Path, n_regions: int) -> np.ndarray:
    """(N, 4) boxes x1, y1, x2, y2 of the `n_regions` regions `image_region_features` gave for `image`."""
    image_path = Path(image)
    found = _in_store(cfg, image_path)
    if found is not None:
        boxes = found[0].read_boxes(found[1], cfg.IMG_FEAT_PAD_SIZE)
    elif image_path.suffix == ".npz":
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
    boxes = image_region_boxes(cfg, image, len(feats)) if reads_boxes(cfg) else None
    return Predictor(cfg).answer(feats, question, top_k, boxes=boxes, attention=False).answers


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Print `score  answer` lines, best first; with --attention, draw the attention picture."""
    out, image_file = getattr(args, "attention", None), getattr(args, "image_file", None)
    if args.image is None and image_file is None:
        raise ConfigError("give the image: --image FILE (its features .npz, or a picture) or --image-file PHOTO")
    if out is None and getattr(args, "attention_layers", False):
        raise ConfigError("--attention-layers goes with --attention OUT.png")
    if out is not None:
        check_picture_path(out)
    reads = args.image if args.image is not None else image_file  # what the features come from
    if args.image is not None and Path(args.image).suffix == ".npz":
        image_region_features(cfg, args.image)  # a bad features file is named before the model is loaded
    if image_file is not None:
        read_image(image_file)  # a bad --image-file is named before the model is loaded
    elif out is not None and Path(args.image).suffix != ".npz":
        image_file = args.image  # a picture: drawn on itself
    predictor = Predictor(cfg)
    if out is not None:
        require_attention(predictor.model, cfg.MODEL_USE)
    feats, boxes, size = predictor.regions(reads)
    if reads_boxes(cfg) and boxes is None:
        boxes = image_region_boxes(cfg, reads, len(feats))
    answer = predictor.answer(feats, args.question, args.top, boxes=boxes if (out is not None or reads_boxes(cfg))
                              else None, attention=out is not None)
    for name, score in answer.answers:
        print(f"{score:.4f}  {name}")
    if out is not None:
        predictor.draw(answer, out, image_file=image_file, boxes=boxes, image_size=size, layers=args.attention_layers)
        print(f"attention picture: {out}")
    return 0
