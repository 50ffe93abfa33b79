"""Checkpoints: one path resolver, the never-overwrite guard, atomic saves, clear load errors."""

import os

import pytest
import torch

import accuvqa.checkpoint
from accuvqa.checkpoint import (checkpoint_path, guard_new_run, load_checkpoint, resolve_checkpoint,
                                save_checkpoint)
from accuvqa.config import load_config
from accuvqa.errors import CheckpointError, ConfigError


def test_the_resolver_reads_ckpt_path_then_version_and_epoch_then_the_newest(tmp_path, caplog):
    cfg = load_config(overrides={"CKPTS_PATH": str(tmp_path), "VERSION": "run", "MAX_EPOCH": 13})
    assert resolve_checkpoint(cfg.replace(CKPT_PATH="x/y.pkl", CKPT_EPOCH=3)) == type(tmp_path)("x/y.pkl")
    assert resolve_checkpoint(cfg.replace(CKPT_EPOCH=3)) == tmp_path / "ckpt_run" / "epoch3.pkl"
    assert resolve_checkpoint(cfg.replace(CKPT_EPOCH=3, CKPT_VERSION="other")) == tmp_path / "ckpt_other/epoch3.pkl"
    with pytest.raises(ConfigError, match="run 'run' has no checkpoint in .*ckpt_run; .*--CKPT_PATH FILE"):
        resolve_checkpoint(cfg)
    # no epoch named: the run's newest, not MAX_EPOCH (a run stopped at epoch 2 of 13 is evaluated as it stands)
    for epoch in (1, 2):
        save_checkpoint(checkpoint_path(tmp_path, "run", epoch), {"state_dict": {}, "epoch": epoch})
    with caplog.at_level("INFO", logger="accuvqa.checkpoint"):
        assert resolve_checkpoint(cfg, "checkpoint to evaluate") == tmp_path / "ckpt_run" / "epoch2.pkl"
    assert "the newest checkpoint of run 'run' (VERSION)" in caplog.text
    # VERSION unset: the run is named by its seed, as in mcan-vqa
    assert resolve_checkpoint(load_config(overrides={"SEED": 7, "CKPT_EPOCH": 2})) == checkpoint_path("ckpts", "7", 2)


def test_checkpoint_keys_of_a_preset_are_ignored_and_the_log_says_so(tmp_path, caplog):
    (tmp_path / "preset.yml").write_text("CKPT_VERSION: small\nCKPT_EPOCH: 13\n")
    cfg = load_config(tmp_path / "preset.yml", {"CKPTS_PATH": str(tmp_path), "VERSION": "mine"})
    save_checkpoint(checkpoint_path(tmp_path, "small", 13), {"state_dict": {}})  # mcan-vqa's released one, say
    save_checkpoint(checkpoint_path(tmp_path, "mine", 1), {"state_dict": {}})
    with caplog.at_level("INFO", logger="accuvqa.checkpoint"):
        assert resolve_checkpoint(cfg, "checkpoint to resume") == checkpoint_path(tmp_path, "mine", 1)
    assert "CKPT_VERSION small, CKPT_EPOCH 13 in " in caplog.text and "ignored" in caplog.text
    # named on the command line, it counts
    named = load_config(tmp_path / "preset.yml", {"CKPTS_PATH": str(tmp_path), "CKPT_VERSION": "small",
                                                  "CKPT_EPOCH": 13})
    assert resolve_checkpoint(named) == checkpoint_path(tmp_path, "small", 13)


def test_a_flipped_byte_in_the_tensor_data_is_refused_in_one_line(tmp_path):
    path = checkpoint_path(tmp_path, "run", 1)
    weights = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"state_dict": {"w": weights}, "epoch": 1})
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], weights)
    data = bytearray(path.read_bytes())
    at = data.find(weights[1000:1004].numpy().tobytes())  # inside the tensor's bytes in the zip
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    raw = torch.load(path, weights_only=True)  # torch alone loads it: only the checksum can tell
    assert not torch.equal(raw["state_dict"]["w"], weights)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path} is corrupt: its contents do not match the checksum saved with them "
                              f"(a bit flipped on disk or in a copy); use an earlier checkpoint of the run")


def test_a_new_run_never_writes_over_a_run_of_the_same_name(tmp_path):
    cfg = load_config(overrides={"CKPTS_PATH": str(tmp_path), "VERSION": "run"})
    guard_new_run(cfg)  # nothing there yet
    save_checkpoint(checkpoint_path(tmp_path, "run", 1), {"state_dict": {}})
    with pytest.raises(ConfigError, match="already holds checkpoints of a run named 'run'"):
        guard_new_run(cfg)
    guard_new_run(cfg.replace(RESUME=True))  # continuing it is what resume is for


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, "run", 1)
    save_checkpoint(path, {"state_dict": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accuvqa.checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"state_dict": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before and os.listdir(path.parent) == ["epoch1.pkl"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


@pytest.mark.parametrize("content,message", [
    (b"\x80\x04 not a checkpoint", "cannot load checkpoint"),
    (None, "is not an accuvqa/mcan-vqa checkpoint: no 'state_dict' entry"),
])
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, message):
    path = tmp_path / "x.pkl"
    if content is None:
        torch.save({"weights": torch.ones(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint .*missing.pkl does not exist"):
        load_checkpoint(tmp_path / "missing.pkl")


def test_the_full_disk_drill_fills_each_atomic_file_at_its_byte_count(tmp_path, monkeypatch):
    """ACCUVQA_DISK_FULL_AFTER (src/accuvqa/files.py): a file that fits is written whole; one that does not fails
    with ENOSPC, as on a full disk, and leaves neither a torn file nor a temporary one."""
    import errno
    import json

    from accuvqa.files import write_json_atomic

    payload = {"checkpoint": "epoch1.pkl", "step": 10}
    size = len(json.dumps(payload))
    monkeypatch.setenv("ACCUVQA_DISK_FULL_AFTER", str(size))
    write_json_atomic(tmp_path / "fits.json", payload)
    assert json.loads((tmp_path / "fits.json").read_text()) == payload
    monkeypatch.setenv("ACCUVQA_DISK_FULL_AFTER", str(size - 1))
    with pytest.raises(OSError) as err:
        write_json_atomic(tmp_path / "full.json", payload)
    assert err.value.errno == errno.ENOSPC
    # torch.save meets the same full disk inside its zip writer, which reports it as a RuntimeError whose
    # context is the OSError (what save_run_checkpoint turns into "no space left")
    with pytest.raises(RuntimeError) as err:
        save_checkpoint(checkpoint_path(tmp_path, "run", 1), {"state_dict": {"w": torch.zeros(1000)}})
    assert isinstance(err.value.__context__, OSError) and err.value.__context__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["fits.json"]
