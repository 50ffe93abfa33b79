"""From records to batches: dataset assembly, the per-epoch batch order, the loader."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from accuvqa.config import Config
from accuvqa.data.dataset import VQADataset
from accuvqa.data.features import index_features
from accuvqa.data.records import VG_FOLDERS, QuestionRecord
from accuvqa.data.vocab import Vocab


def make_dataset(cfg: Config, records: Sequence[QuestionRecord], vocab: Vocab) -> VQADataset:
    """A dataset over `records` whose features come from the folders those splits use."""
    folders = {r.folder for r in records if r.folder}
    if not folders or any(not r.folder for r in records):
        folders |= set(VG_FOLDERS)
    features = index_features(cfg.FEATURE_PATH, sorted(folders))
    return VQADataset(cfg, records, vocab.token_to_ix, vocab.ans_to_ix, features)


def epoch_batches(n_samples: int, cfg: Config, epoch: int, rt: Any) -> list[np.ndarray]:
    """This process's share (`rt.rank` of `rt.world_size`) of each effective batch of one epoch.

    Full batches only. The order is one permutation fixed by (SEED, epoch): it does not depend on
    the number of processes or on GRAD_ACCU_STEPS, so neither changes what is learned.
    """
    gen = torch.Generator().manual_seed(cfg.SEED * 1_000_003 + epoch)
    order = torch.randperm(n_samples, generator=gen).numpy()
    share = cfg.BATCH_SIZE // rt.world_size
    n_batches = n_samples // cfg.BATCH_SIZE
    return [order[b * cfg.BATCH_SIZE + rt.rank * share: b * cfg.BATCH_SIZE + (rt.rank + 1) * share]
            for b in range(n_batches)]


def eval_batches(n_samples: int, batch_size: int) -> list[np.ndarray]:
    """Every sample once, in order, in batches of `batch_size` (the last one shorter)."""
    order = np.arange(n_samples)
    return [order[i: i + batch_size] for i in range(0, n_samples, batch_size)]


def batch_loader(dataset: VQADataset, batches: Sequence[np.ndarray], cfg: Config) -> Iterator[dict]:
    """Iterate over collated batches, with worker processes when NUM_WORKERS > 0."""
    if cfg.NUM_WORKERS == 0:
        return (dataset[b] for b in batches)
    return iter(torch.utils.data.DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=cfg.NUM_WORKERS,
        pin_memory=cfg.PIN_MEM, persistent_workers=False))
