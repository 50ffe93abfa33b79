"""The loader: one batch order per epoch, fixed by SEED; worker processes load the same batches."""

import numpy as np
import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader, epoch_batches, eval_batches, make_dataset
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.runtime import Runtime
from conftest import ROOT


@pytest.mark.parametrize("world", [2, 4])
def test_sample_order_does_not_depend_on_the_number_of_processes(world):
    cfg = load_config(overrides={"BATCH_SIZE": 8, "SEED": 3})
    single = epoch_batches(50, cfg, epoch=1, rt=Runtime(torch.device("cpu")))
    shares = [epoch_batches(50, cfg, 1, Runtime(torch.device("cpu"), rank=r, world_size=world))
              for r in range(world)]
    assert len(single) == 6  # 50 // 8 full batches; the rest is dropped, as mcan-vqa
    for b, batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([s[b] for s in shares]), batch)
    other_epoch = epoch_batches(50, cfg, epoch=2, rt=Runtime(torch.device("cpu")))
    assert not np.array_equal(np.concatenate(single), np.concatenate(other_epoch))


def test_eval_batches_cover_every_sample_once_in_order():
    batches = eval_batches(10, 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_worker_processes_load_the_same_batches(easyvqa_slice):
    cfg = load_config(ROOT / "configs/easyvqa.yml", {
        "DATASET_PATH": easyvqa_slice["DATASET_PATH"], "FEATURE_PATH": easyvqa_slice["FEATURE_PATH"],
        "PRELOAD": False, "VERBOSE": False})
    records = load_records(cfg, "val", need_answers=True)
    dataset = make_dataset(cfg, records, build_vocab(cfg, records))
    batches = epoch_batches(len(dataset), cfg, 0, Runtime(torch.device("cpu")))[:3]
    in_process = list(batch_loader(dataset, batches, cfg))
    with_workers = list(batch_loader(dataset, batches, cfg.replace(NUM_WORKERS=2)))
    assert len(in_process) == len(with_workers) == 3
    for a, b in zip(in_process, with_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
