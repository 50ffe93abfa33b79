"""Checkpoint files: where they live, atomic save, safe load, weights; a trained model from one.

Files are mcan-vqa's: `<CKPTS_PATH>/ckpt_<VERSION>/epoch<N>.pkl`, a dict with `state_dict`,
`optimizer` and `lr_base`, plus ours (config, position in the run, every RNG state, the GradScaler,
the micro-batch count, vocabularies and their fingerprint: `accuvqa.resume` puts them in and takes
them out). With CKPT_EVERY_STEPS, mid-epoch checkpoints `step<N>.pkl` sit beside them, and
`latest.json` names the newest of all. Every function here takes the bare model, never a
DistributedDataParallel wrapper (callers unwrap it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from accuvqa.config import Config
from accuvqa.data.loader import run_vocab
from accuvqa.data.vocab import Vocab
from accuvqa.errors import CheckpointError, ConfigError, error_chain
from accuvqa.files import atomic_write, write_json_atomic
from accuvqa.models import build_model, model_spec

log = logging.getLogger(__name__)

LATEST = "latest.json"  # in a run's folder: the name of its newest checkpoint


def checkpoint_path(ckpts_path: str | Path, version: str, epoch: int) -> Path:
    """`<CKPTS_PATH>/ckpt_<VERSION>/epoch<N>.pkl`, as mcan-vqa names them."""
    return Path(ckpts_path) / f"ckpt_{version}" / f"epoch{epoch}.pkl"


def step_checkpoint_path(ckpts_path: str | Path, version: str, step: int) -> Path:
    """`<CKPTS_PATH>/ckpt_<VERSION>/step<N>.pkl`: a mid-epoch checkpoint after N updates."""
    return Path(ckpts_path) / f"ckpt_{version}" / f"step{step}.pkl"


def latest_checkpoint(ckpts_path: str | Path, version: str) -> Path | None:
    """The newest checkpoint of a run: the one `latest.json` names, else the highest epoch file."""
    run_dir = Path(ckpts_path) / f"ckpt_{version}"
    try:
        named = run_dir / json.loads((run_dir / LATEST).read_text())["checkpoint"]
        if named.is_file():
            return named
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no pointer (an mcan-vqa run folder, or none yet): epoch files decide
    epochs = [int(m.group(1)) for p in run_dir.glob("epoch*.pkl") if (m := re.fullmatch(r"epoch(\d+)\.pkl", p.name))]
    return checkpoint_path(ckpts_path, version, max(epochs)) if epochs else None


def resolve_checkpoint(cfg: Config, purpose: str = "checkpoint") -> Path:
    """The checkpoint a command loads: CKPT_PATH; else epoch CKPT_EPOCH of run CKPT_VERSION (else VERSION);
    else that run's newest checkpoint. One log line says which and why (the key that named it).

    Only the command line names a checkpoint: CKPT_* keys a config file sets are ignored (`cfg.ignored`,
    see config.CHECKPOINT_KEYS), so a preset never sends a command to another run's checkpoint.
    """
    version = cfg.CKPT_VERSION or cfg.run_version
    run = f"run {version!r} ({'CKPT_VERSION' if cfg.CKPT_VERSION else 'VERSION'})"
    if cfg.CKPT_PATH:
        path, why = Path(cfg.CKPT_PATH), "named by CKPT_PATH"
    elif cfg.CKPT_EPOCH > 0:
        path = checkpoint_path(cfg.CKPTS_PATH, version, cfg.CKPT_EPOCH)
        why = f"epoch {cfg.CKPT_EPOCH} (CKPT_EPOCH) of {run}"
    else:
        found = latest_checkpoint(cfg.CKPTS_PATH, version)
        if found is None:
            hint = ", or start it without --RESUME" if cfg.RESUME else ", or name one with --CKPT_PATH FILE"
            raise ConfigError(f"run {version!r} has no checkpoint in {Path(cfg.CKPTS_PATH) / f'ckpt_{version}'}; "
                              f"check --VERSION / --CKPTS_PATH{hint}")
        path, why = found, f"the newest checkpoint of {run}"
    if cfg.ignored:
        files = sorted({source for _, source in cfg.ignored.values()})
        keys = ", ".join(f"{key} {value}" for key, (value, _) in cfg.ignored.items())
        why += f"; {keys} in {', '.join(files)} ignored: only the command line names another checkpoint"
    log.info("%s: %s (%s)", purpose, path, why)
    return path


def last_good_checkpoint(path: Path) -> Path | None:
    """The newest other checkpoint in `path`'s folder that loads and matches its checksum (None: none)."""
    others = sorted((p for p in path.parent.glob("*.pkl") if p != path), key=lambda p: p.stat().st_mtime_ns,
                    reverse=True)
    for other in others:
        try:
            load_checkpoint(other)
        except CheckpointError:
            continue
        return other
    return None


def guard_new_run(cfg: Config) -> None:
    """ConfigError when a new (not resumed) run would write over checkpoints of a run of the same name."""
    run_dir = Path(cfg.CKPTS_PATH) / f"ckpt_{cfg.run_version}"
    if not cfg.RESUME and run_dir.is_dir() and any(run_dir.glob("*.pkl")):
        raise ConfigError(
            f"{run_dir} already holds checkpoints of a run named {cfg.run_version!r}; a new run never "
            f"overwrites them: pick another --VERSION, or continue it with --RESUME True")


def content_checksum(state: Mapping[str, Any]) -> str:
    """sha256 of everything a checkpoint holds but its `checksum`: every tensor's dtype, shape and bytes, every
    other value's repr, in key order. A flipped bit anywhere in the weights or the run state changes it."""
    digest = hashlib.sha256()

    def feed(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where}:{value.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                if not (where == "" and key == "checksum"):
                    feed(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                feed(item, f"{where}[{i}]")
        else:
            digest.update(f"{where}={value!r}\n".encode())

    feed(state, "")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` with its checksum, atomically: a crash leaves the old file or the new one, never a torn one."""
    state = {**state, "checksum": content_checksum(state)}
    return atomic_write(path, lambda f: torch.save(state, f))


def save_run_checkpoint(cfg: Config, path: Path, state: dict[str, Any]) -> Path:
    """Save a checkpoint of the run, point `latest.json` at it, keep the newest KEEP_CKPTS mid-epoch ones.

    A failed write (a full disk, above all) is one CheckpointError naming the cause and the last
    good checkpoint; no temporary file is left and earlier checkpoints are untouched.
    """
    last_good = latest_checkpoint(cfg.CKPTS_PATH, cfg.run_version)
    try:
        save_checkpoint(path, state)
        write_json_atomic(path.parent / LATEST, {"checkpoint": path.name, "epoch": state["epoch"],
                                                 "step": state["step"]})
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError ("[enforce fail at inline_container.cc ...] unexpected
        # pos"), the OSError it met kept as its context
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        full = free < 2 * 2**20 or any(getattr(c, "errno", None) == errno.ENOSPC for c in error_chain(e))
        last = last_good if last_good else "none (nothing was saved yet)"
        if full:
            raise CheckpointError(f"no space left on the device while writing {path}: free some space or set "
                                  f"CKPTS_PATH to another disk; the last good checkpoint is {last}") from e
        raise CheckpointError(f"cannot write checkpoint {path}: {str(e).strip().splitlines()[0]}; the last good "
                              f"checkpoint is {last}") from e
    if cfg.KEEP_CKPTS > 0:
        steps = sorted((int(m.group(1)), p) for p in path.parent.glob("step*.pkl")
                       if (m := re.fullmatch(r"step(\d+)\.pkl", p.name)))
        for _, old in steps[:-cfg.KEEP_CKPTS]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain values only, never code.

    Every failure is one CheckpointError naming the file: missing (with what its run folder
    holds), refused (a pickle that would call a function or build an object when loaded: nothing
    of it runs), truncated, or corrupt (torch.load then raises nearly anything: IndexError,
    OSError, KeyError, struct.error, UnicodeDecodeError, ...).
    """
    import pickletools
    import warnings

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: name a checkpoint file in it "
                              f"(epoch<N>.pkl)")
    if not path.is_file():
        run_dir = path.parent
        if not run_dir.is_dir():
            there = (f"; there is no folder {run_dir} (no run of that name: check CKPTS_PATH and "
                     f"--VERSION / --CKPT_VERSION)")
        else:
            names = sorted((p.name for p in run_dir.glob("*.pkl")),
                           key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
            there = (f"; {run_dir} holds {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names
                     else f"; {run_dir} holds no checkpoint")
        raise CheckpointError(f"checkpoint {path} does not exist{there}")

    def globals_referenced() -> list[str]:
        """'module.name' of every global the file's pickles reference, read with pickletools (which
        parses opcodes and executes nothing)."""
        blobs: list[bytes] = []
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                blobs = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]  # a plain pickle, or torch's legacy format: pickles back to back
        found: list[str] = []
        for blob in blobs:
            pos = 0
            for _ in range(8):
                strings: list[Any] = []
                memo: dict[int, Any] = {}
                names: list[str] = []  # kept only when the pickle is whole: a truncated one is corrupt
                try:
                    for op, arg, at in pickletools.genops(blob[pos:]):
                        if op.name in ("GLOBAL", "INST"):
                            names.append(str(arg).replace(" ", "."))
                        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                            names.append(f"{strings[-2]}.{strings[-1]}")
                        elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                            strings.append(arg)
                        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                            memo[int(arg)] = strings[-1]
                        elif op.name == "MEMOIZE" and strings:
                            memo[len(memo)] = strings[-1]
                        elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                            strings.append(memo[int(arg)])
                        if op.name == "STOP":
                            found += names
                            pos += at + 1
                            break
                    else:
                        break
                except (ValueError, TypeError, IndexError, UnicodeDecodeError):
                    break  # not (or no longer) a pickle
        return found

    def plain(name: str) -> bool:  # what a checkpoint may reference: torch's types and a few containers
        module = name.rsplit(".", 1)[0]
        return (module == "torch" or module.startswith("torch.") or module in ("collections", "_codecs")
                or (module in ("builtins", "__builtin__")
                    and name.rsplit(".", 1)[-1] in ("set", "frozenset", "bytearray", "complex")))

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols etc.: one line on stderr only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring: a corrupt file raises nearly anything
        if isinstance(e, pickle.UnpicklingError):
            try:
                code = [g for g in dict.fromkeys(globals_referenced()) if not plain(g)]
            except (OSError, zipfile.BadZipFile, RuntimeError):
                code = []
            if code:
                raise CheckpointError(
                    f"refused to load {path}: it is not a plain checkpoint (it would call {', '.join(code[:3])} "
                    f"when loaded, i.e. run code); a checkpoint holds only tensors and plain values: use one "
                    f"saved by accuvqa or mcan-vqa") from e
        with open(path, "rb") as f:
            head = f.read(4)
        text = str(e).strip()
        reason = re.search(r"Unsupported[^\n]*?(?= was not|\. |\n|$)", text)  # weights_only's own reason
        detail = reason.group(0) if reason else re.split(r"(?<=\.) ", text.splitlines()[0])[0][:200] if text else ""
        if not head:
            why = "the file is empty"
        elif head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            why = "it is truncated (a zip archive without its end: an interrupted copy or save?)"
        else:
            why = (f"it is corrupt or not a PyTorch checkpoint ({type(e).__name__}"
                   f"{': ' + detail if detail else ''})")
        raise CheckpointError(f"cannot load checkpoint {path}: {why}") from e
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not an accuvqa/mcan-vqa checkpoint: no 'state_dict' entry")
    if not isinstance(state["state_dict"], dict):
        raise CheckpointError(f"{path} is not an accuvqa/mcan-vqa checkpoint: its 'state_dict' is a "
                              f"{type(state['state_dict']).__name__}, not a mapping of weights")
    if "checksum" in state and state["checksum"] != content_checksum(state):  # mcan-vqa's files carry none
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum saved with "
                              f"them (a bit flipped on disk or in a copy); use an earlier checkpoint of the run")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path, model_use: str = "mcan",
                 cfg: Config | None = None) -> None:
    """Load a checkpoint's state_dict strictly; size mismatches name the dictionary to pin, and
    (given `cfg`, for a checkpoint that stores its config) the model keys that differ.

    mcan-vqa saves the weights of a multi-GPU run as `nn.DataParallel` does, every key prefixed
    with 'module.'; that prefix is removed.
    """
    weights = state["state_dict"]
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = model_spec(model_use)
    for key, what, pin in ((spec.token_param, "token dictionary", "TOKEN_DICT_PATH"),
                           (spec.answer_param, "answer dictionary", "ANSWER_DICT_PATH")):
        got = weights.get(key)
        if got is not None and key in expected and tuple(got.shape)[:1] != expected[key][:1]:
            pinned = getattr(cfg, pin, None) if cfg is not None else None
            raise CheckpointError(
                f"{path}: {key} has {got.shape[0]} rows but the {what} has {expected[key][0]} entries"
                f"{f' ({pin} {pinned})' if pinned else ''}; "
                f"pin the dictionary the checkpoint was trained with ({pin})")
    try:
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        from accuvqa.config import model_key_types

        saved = state.get("config")
        if cfg is not None and isinstance(saved, dict):
            keys = [*model_key_types(model_use), "IMG_FEAT_SIZE", "WORD_EMBED_SIZE", "MODEL_USE"]
            differ = [k for k in keys if k in saved and saved[k] != getattr(cfg, k, saved[k])]
            if differ:
                raise CheckpointError(
                    f"{path} was trained with " + ", ".join(f"{k} {saved[k]}" for k in differ)
                    + " but the config has " + ", ".join(f"{k} {getattr(cfg, k)}" for k in differ)
                    + "; set " + " ".join(f"--{k} {saved[k]}" for k in differ) + " (the checkpoint's)") from e
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected]
        shaped = [k for k in expected if k in weights and tuple(getattr(weights[k], "shape", ())) != expected[k]]
        first_shape = list(getattr(weights[shaped[0]], "shape", ())) if shaped else None
        parts = [f"{len(missing)} weights missing (first {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first {unexpected[0]})" if unexpected else "",
                 f"{len(shaped)} of another shape (first {shaped[0]}: {first_shape} in the file, "
                 f"{list(expected[shaped[0]])} in the model)" if shaped else ""]
        detail = "; ".join(p for p in parts if p) or str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} does not match the configured model ({model_use}): {detail}; "
                              f"check the model keys (LAYER, HIDDEN_SIZE, ...)") from e


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Restore the optimizer's moments (ours or mcan-vqa's); an empty entry starts afresh."""
    saved = state.get("optimizer")
    if not saved:
        log.warning("%s holds no optimizer state: the optimizer's moments start from zero", path)
        return
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model and OPT ({e}); "
                              f"resume with the config the checkpoint was trained with") from e


def load_trained(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Vocab, Path, int]:
    """Model, vocabularies, path and epoch of the checkpoint that `resolve_checkpoint` names
    (the run's newest when none is named)."""
    model, vocab, path, epoch, _ = load_trained_state(cfg, device)
    return model, vocab, path, epoch


def load_trained_state(cfg: Config, device: torch.device
                       ) -> tuple[torch.nn.Module, Vocab, Path, int, dict[str, Any]]:
    """`load_trained`'s model, vocabularies, path and epoch, and the checkpoint's contents (its feature
    extractor, ...)."""
    path = resolve_checkpoint(cfg, "checkpoint to evaluate")
    state = load_checkpoint(path)
    vocab = run_vocab(cfg, state, path)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix))
    load_weights(model, state, path, cfg.MODEL_USE, cfg)
    return model.to(device), vocab, path, int(state.get("epoch", cfg.CKPT_EPOCH)), state
