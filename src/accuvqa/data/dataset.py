"""Batches of (region features, question tokens, soft answer scores) from the prepared stores."""

from __future__ import annotations

import json
import logging
from typing import Mapping, Sequence

import numpy as np
import torch

from accuvqa.config import Config
from accuvqa.data.feature_store import PackedFeatures
from accuvqa.data.layout import Layout, VQALayout
from accuvqa.data.questions import QuestionArrays
from accuvqa.errors import DataError

log = logging.getLogger(__name__)


def _warn_cut(regions: np.ndarray, lengths: Sequence[int], cfg: Config, splits: str) -> None:
    """One warning for images with more regions than IMG_FEAT_PAD_SIZE, one for questions longer
    than MAX_TOKEN: both are cut, as mcan-vqa does, and a user should know."""
    over = regions > cfg.IMG_FEAT_PAD_SIZE
    if over.any():
        log.warning("%d of %d %s images have more than IMG_FEAT_PAD_SIZE %d regions (up to %d); %d regions are "
                    "dropped, as mcan-vqa does", int(over.sum()), len(regions), splits, cfg.IMG_FEAT_PAD_SIZE,
                    int(regions.max()), int((regions[over] - cfg.IMG_FEAT_PAD_SIZE).sum()))
    long = np.asarray(lengths)[np.asarray(lengths) > cfg.MAX_TOKEN]
    if len(long):
        log.warning("%d of %d %s questions are longer than MAX_TOKEN %d tokens (up to %d); they are cut",
                    len(long), len(lengths), splits, cfg.MAX_TOKEN, int(long.max()))


class VQADataset(torch.utils.data.Dataset):
    """Questions with encoded tokens and answer targets; item i of the loader is a whole batch.

    `__getitem__` takes a list of question indices and returns a dict with `img_feat`
    (B, N, D) zero-padded to the batch's longest image (at most IMG_FEAT_PAD_SIZE), `ques_ix`
    (B, T) cut to the batch's longest question, `answer_scores` (B, A) soft scores, and `index`;
    with `boxes`, also `bbox` (B, N, 4): each region's x1, y1, x2, y2, zero rows where img_feat is padded.
    """

    def __init__(self, cfg: Config, questions: QuestionArrays, features: Mapping[int, PackedFeatures],
                 boxes: bool = False, layout: Layout | None = None) -> None:
        # the questions as arrays (no object per question, so loader workers share them as they are)
        self.questions = questions
        self.boxes = boxes
        self.n_answers = len(questions.vocab.ans_to_ix)
        self.feat_size = cfg.IMG_FEAT_SIZE
        self.pad_size = cfg.IMG_FEAT_PAD_SIZE
        self.ques_ix = self.questions.ques_ix  # (N, MAX_TOKEN) int32
        self.image_ids = np.unique(self.questions.image_id).tolist()
        missing = [iid for iid in self.image_ids if iid not in features]
        if missing:
            lacking = np.isin(self.questions.image_id, missing)
            first = int(np.argmax(lacking))
            folder = self.questions.folders[self.questions.folder[first]]
            raise DataError(
                f"no features for image {self.questions.image_id[first]} (question "
                f"{self.questions.question_id[first]}): expected "
                f"{(layout or VQALayout(cfg)).feature_file(folder, int(self.questions.image_id[first]))} "
                f"in its folder when the packed feature store was built; "
                f"{len(missing)} image(s) of {int(lacking.sum())} question(s) lack one")
        self.question_row = np.searchsorted(self.image_ids, self.questions.image_id)  # (N,) image row of each question
        self.stores = [features[iid] for iid in self.image_ids]  # each image's folder's packed store
        self.regions = np.array([s.count(i) for s, i in zip(self.stores, self.image_ids)], dtype=np.int64)
        specs = {json.dumps(s.extractor, sort_keys=True): s for s in set(self.stores)}
        if len(specs) > 1:
            paths = ", ".join(str(s.path) for s in specs.values())
            raise DataError(f"the features of {paths} come from different extractors (their meta.json 'extractor'): "
                            f"extract every split with the same BACKBONE, BACKBONE_LAYER, EXTRACT_RESIZE and weights")
        # how the features were computed from the images (`accuvqa extract`), None when unknown
        self.extractor = next(iter(specs.values())).extractor if specs else None
        _warn_cut(self.regions, self.questions.n_tokens, cfg, self.questions.split_names())

    def __len__(self) -> int:
        return len(self.questions)

    def _read(self, row: int) -> np.ndarray:
        """(N, D) regions of the image at `row`, cut to IMG_FEAT_PAD_SIZE."""
        return self.stores[row].read(self.image_ids[row], self.pad_size)

    def _read_boxes(self, row: int) -> np.ndarray:
        """(N, 4) boxes of the image at `row`, one per region read by `_read`."""
        return self.stores[row].read_boxes(self.image_ids[row], self.pad_size)

    def image_boxes(self, rows: Sequence[int], n: int) -> np.ndarray:
        """(B, n, 4) boxes of the given image rows, zero-padded as `image_features` pads."""
        return _zero_padded([self._read_boxes(r) for r in rows], n, 4)

    def image_features(self, rows: Sequence[int]) -> np.ndarray:
        """(B, N, D) features of the given image rows, zero-padded to the longest."""
        feats = [self._read(r) for r in rows]
        return _zero_padded(feats, max((f.shape[0] for f in feats), default=0), self.feat_size)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        rows = self.question_row[indices]
        ques_ix = self.ques_ix[indices].astype(np.int64)
        t_max = max(int((ques_ix != 0).sum(1).max()), 1) if len(indices) else 1
        scores = self.questions.targets(indices, self.n_answers)
        batch = {
            "img_feat": torch.from_numpy(np.ascontiguousarray(self.image_features(rows))),
            "ques_ix": torch.from_numpy(np.ascontiguousarray(ques_ix[:, :t_max])),
            "answer_scores": torch.from_numpy(scores),
            "index": torch.from_numpy(indices),
        }
        if self.boxes:
            batch["bbox"] = torch.from_numpy(np.ascontiguousarray(self.image_boxes(rows, batch["img_feat"].shape[1])))
        return batch


def _zero_padded(arrays: Sequence[np.ndarray], n: int, width: int) -> np.ndarray:
    """(len(arrays), n, width) float32: each (N_i, width) array in its first N_i rows, zeros after."""
    out = np.zeros((len(arrays), n, width), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out
