"""The loader: one batch order per epoch, fixed by SEED; worker processes load the same batches."""

import numpy as np
import pytest
import torch

from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader, epoch_batches, eval_batches, make_dataset, sample_regions
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.errors import ConfigError
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


def _regions(n, seed=0):
    return np.random.default_rng(seed).integers(10, 101, size=n)


def test_bucketed_order_is_fixed_by_seed_not_by_processes_or_micro_batches():
    regions = _regions(200)
    cfg = load_config(overrides={"BATCH_SIZE": 8, "SEED": 3, "BUCKET_WINDOW": 4})
    single = epoch_batches(200, cfg, 1, Runtime(torch.device("cpu")), regions)
    for world in (2, 4):
        shares = [epoch_batches(200, cfg, 1, Runtime(torch.device("cpu"), rank=r, world_size=world), regions)
                  for r in range(world)]
        for b, batch in enumerate(single):
            np.testing.assert_array_equal(np.concatenate([s[b] for s in shares]), batch)
    accumulated = epoch_batches(200, cfg.replace(GRAD_ACCU_STEPS=4), 1, Runtime(torch.device("cpu")), regions)
    np.testing.assert_array_equal(np.concatenate(accumulated), np.concatenate(single))
    again = epoch_batches(200, cfg, 1, Runtime(torch.device("cpu")), regions)
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(single))
    other_seed = epoch_batches(200, cfg.replace(SEED=4), 1, Runtime(torch.device("cpu")), regions)
    assert not np.array_equal(np.concatenate(other_seed), np.concatenate(single))


def test_bucketing_regroups_each_window_into_batches_of_similar_region_counts():
    regions = _regions(203)  # 25 batches of 8, 3 samples dropped; windows of 4 batches, the last of 1
    cfg = load_config(overrides={"BATCH_SIZE": 8, "SEED": 5})
    plain = epoch_batches(203, cfg, 0, Runtime(torch.device("cpu")))
    bucketed = epoch_batches(203, cfg.replace(BUCKET_WINDOW=4), 0, Runtime(torch.device("cpu")), regions)
    assert len(bucketed) == len(plain) == 25 and all(len(b) == 8 for b in bucketed)
    for w in range(0, 25, 4):
        window_plain, window_bucketed = plain[w: w + 4], bucketed[w: w + 4]
        # the same samples in the window, none lost or repeated
        assert sorted(np.concatenate(window_plain)) == sorted(np.concatenate(window_bucketed))
        # batches hold consecutive runs of the window's sorted region counts: their ranges do not overlap
        ranges = sorted((regions[b].min(), regions[b].max()) for b in window_bucketed)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))
    # the batches of a window are not left in ascending order every time
    assert any(regions[bucketed[w]].max() > regions[bucketed[w + 1]].max() for w in range(0, 24, 4))
    padded = lambda batches: sum(regions[b].max() for b in batches)  # noqa: E731 - regions read after padding
    assert padded(bucketed) < 0.8 * padded(plain)


def test_bucketing_leaves_the_order_alone_when_every_image_has_the_same_regions():
    cfg = load_config(overrides={"BATCH_SIZE": 8, "SEED": 5})
    plain = epoch_batches(50, cfg, 0, Runtime(torch.device("cpu")))
    same = epoch_batches(50, cfg.replace(BUCKET_WINDOW=4), 0, Runtime(torch.device("cpu")), np.full(50, 36))
    np.testing.assert_array_equal(np.concatenate(same), np.concatenate(plain))


def test_sample_regions_are_each_questions_image_regions(tmp_path):
    from conftest import write_vqa_layout

    layout = write_vqa_layout(tmp_path, images_per_split=10)
    cfg = load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                 "IMG_FEAT_SIZE": 12, "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    dataset = make_dataset(cfg, records, build_vocab(cfg, records))
    expected = [int((dataset[[i]]["img_feat"][0].abs().sum(-1) != 0).sum()) for i in range(len(dataset))]
    assert sample_regions(dataset).tolist() == expected and len(set(expected)) > 1


def test_a_negative_bucket_window_is_refused():
    with pytest.raises(ConfigError, match=r"^BUCKET_WINDOW must be >= 0, got -1 \(from --BUCKET_WINDOW\)$"):
        load_config(overrides={"BUCKET_WINDOW": "-1"})
