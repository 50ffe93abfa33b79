"""Batches of (region features, question tokens, soft answer scores) over question records."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from accuvqa.config import Config
from accuvqa.data.features import feature_file, read_boxes, read_features, region_counts
from accuvqa.data.qa_store import QuestionArrays, encode_records
from accuvqa.data.records import QuestionRecord
from accuvqa.data.store import PackedFeatures
from accuvqa.data.vocab import Vocab
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

    def __init__(self, cfg: Config, records: Sequence[QuestionRecord] | QuestionArrays, token_to_ix: dict[str, int],
                 ans_to_ix: dict[str, int], features: Mapping[int, Path | PackedFeatures], boxes: bool = False) -> None:
        # the questions as arrays (no object per question, so loader workers share them as they are):
        # read from `accuvqa prepare`'s store, or encoded here from the JSON's records
        self.questions = (records if isinstance(records, QuestionArrays)
                          else encode_records(records, Vocab(token_to_ix, ans_to_ix), cfg.MAX_TOKEN))
        self.records = self.questions.records  # None when read from the store
        self.boxes = boxes
        self.n_answers = len(ans_to_ix)
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
                f"no feature file for image {self.questions.image_id[first]} (question "
                f"{self.questions.question_id[first]}): expected "
                f"{feature_file(cfg.FEATURE_PATH, folder or 'train2014', int(self.questions.image_id[first]))}; "
                f"{len(missing)} image(s) of {int(lacking.sum())} question(s) lack one")
        self.question_row = np.searchsorted(self.image_ids, self.questions.image_id)  # (N,) image row of each question
        # each image's feature file, or its folder's packed store (accuvqa prepare writes one)
        self.paths = [features[iid] for iid in self.image_ids]
        self.packed_store = bool(self.paths) and isinstance(self.paths[0], PackedFeatures)
        # named at start, not mid-epoch: unreadable files, another feature size, what gets cut
        self.regions = (np.array([s.count(i) for s, i in zip(self.paths, self.image_ids)], dtype=np.int64)
                        if self.packed_store else region_counts(self.paths, self.feat_size))
        _warn_cut(self.regions, self.questions.n_tokens, cfg, self.questions.split_names())
        self.packed: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.packed_boxes: np.ndarray | None = None
        if cfg.PRELOAD and not self.packed_store:  # a packed store is preloaded by the OS page cache
            self.preload()

    def preload(self) -> None:
        """Read every image's features once into one packed array (N_images, max N, D)."""
        feats = [self._read(row) for row in range(len(self.paths))]
        n_max = max((f.shape[0] for f in feats), default=0)
        self.packed = _zero_padded(feats, n_max, self.feat_size)
        self.counts = np.array([f.shape[0] for f in feats], dtype=np.int64)
        if self.boxes:
            self.packed_boxes = _zero_padded([self._read_boxes(row) for row in range(len(self.paths))], n_max, 4)

    def __len__(self) -> int:
        return len(self.questions)

    def _read(self, row: int) -> np.ndarray:
        """(N, D) regions of the image at `row`, cut to IMG_FEAT_PAD_SIZE."""
        if self.packed_store:
            return self.paths[row].read(self.image_ids[row], self.pad_size)
        return read_features(self.paths[row], self.feat_size, self.pad_size)

    def _read_boxes(self, row: int) -> np.ndarray:
        """(N, 4) boxes of the image at `row`, one per region read by `_read`."""
        if self.packed_store:
            boxes = self.paths[row].read_boxes(self.image_ids[row], self.pad_size)
        else:
            boxes = read_boxes(self.paths[row], self.pad_size)
        regions = min(int(self.regions[row]), self.pad_size)
        if len(boxes) != regions:
            raise DataError(f"{self.paths[row]}: image {self.image_ids[row]} has {len(boxes)} boxes 'bbox' for "
                            f"{regions} regions; boxes and features must come from the same detection")
        return boxes

    def image_boxes(self, rows: Sequence[int], n: int) -> np.ndarray:
        """(B, n, 4) boxes of the given image rows, zero-padded as `image_features` pads."""
        if self.packed_boxes is not None:
            return self.packed_boxes[rows, :n]
        return _zero_padded([self._read_boxes(r) for r in rows], n, 4)

    def image_features(self, rows: Sequence[int]) -> np.ndarray:
        """(B, N, D) features of the given image rows, zero-padded to the longest."""
        if self.packed is not None:
            n = int(self.counts[rows].max()) if len(rows) else 0
            return self.packed[rows, :n]
        feats = [self._read(r) for r in rows]
        return _zero_padded(feats, max(f.shape[0] for f in feats), self.feat_size)

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
