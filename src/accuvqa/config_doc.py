"""Every config key with its group, type, default and one-line meaning: `--help` and docs/config.md.

All of it is read from the dataclass fields where the keys are defined: `Config` for the common
keys, each registered model's keys dataclass for its own (`config_key(default, meaning)`), so a
new key or a new model is described in its own file only (a test names any key left undescribed).
Regenerate the page with `python -m accuvqa.config_doc > docs/config.md` (or `make docs`).
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any, NamedTuple

from accuvqa.config import GROUPS, KEYS, Config, _type_name
from accuvqa.models.registry import list_models, model_key_types, model_spec

NO_DESCRIPTION = "(no description)"


class KeyDoc(NamedTuple):
    """One row of the table."""

    key: str
    group: str  # data, model, training, run, or "model (<name>)" for a model's own keys
    type: str
    default: str
    meaning: str


def _default_text(value: Any) -> str:
    """A default as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_default_text(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _doc(f: dataclasses.Field) -> str | None:
    """The meaning written on a key's field (None when it has none)."""
    return f.metadata.get("doc") or None


def _common_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name in KEYS]


def undescribed_keys() -> list[str]:
    """Keys (common, or of a registered model) whose field carries no meaning (or, common, no group)."""
    missing = [f.name for f in _common_fields() if not _doc(f) or f.metadata.get("group") not in GROUPS]
    for model in list_models():
        missing += [f"{f.name} (model {model})" for f in dataclasses.fields(model_spec(model).keys) if not _doc(f)]
    return missing


def key_docs() -> list[KeyDoc]:
    """Every config key, grouped in GROUPS order, each registered model's keys after MODEL_USE."""
    hints = typing.get_type_hints(Config)
    rows: dict[str, list[KeyDoc]] = {group: [] for group in GROUPS}
    for f in _common_fields():
        group = f.metadata.get("group") if f.metadata.get("group") in GROUPS else "run"
        rows[group].append(KeyDoc(f.name, group, _type_name(hints[f.name]), _default_text(_field_default(f)),
                                  _doc(f) or NO_DESCRIPTION))
    for model in list_models():
        types = model_key_types(model)
        for f in dataclasses.fields(model_spec(model).keys):
            rows["model"].append(KeyDoc(f.name, f"model ({model})", _type_name(types[f.name]),
                                        _default_text(_field_default(f)), _doc(f) or NO_DESCRIPTION))
    return [row for group in GROUPS for row in rows[group]]


def help_text(width: int = 120) -> str:
    """The plain-text table shown by `accuvqa <command> --help`."""
    docs = key_docs()
    key_w = max(len(d.key) for d in docs) + 2
    type_w = max(len(d.type) for d in docs) + 2
    default_w = min(max(len(d.default) for d in docs), 24) + 2  # a longer default pushes its meaning right
    indent = 2 + key_w + type_w + default_w
    lines = ["config keys: --KEY VALUE on the command line, KEY: value in --config FILE.yml", ""]
    group = None
    for d in docs:
        if d.group != group:
            if group is not None:
                lines.append("")
            group = d.group
            lines.append(f"{group}:")
        meaning = textwrap.wrap(d.meaning, max(width - indent, 30)) or [""]
        lines.append(f"  {d.key:<{key_w}}{d.type:<{type_w}}{d.default:<{default_w - 2}}  {meaning[0]}")
        lines += [" " * indent + more for more in meaning[1:]]
    return "\n".join(lines)


def markdown() -> str:
    """docs/config.md: one table per group."""
    out = ["# Config keys", "",
           "Every key of a run, as `--KEY VALUE` on the command line or `KEY: value` in a YAML file given",
           "with `--config`. A run writes its resolved keys to `<RESULT_PATH>/<VERSION>/config.yml`, which",
           "loads back with `--config`. This page is generated: `python -m accuvqa.config_doc > docs/config.md`",
           "(`make docs`); `accuvqa <command> --help` prints the same table."]
    group = None
    for d in key_docs():
        if d.group != group:
            group = d.group
            out += ["", f"## {group}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out.append(f"| `{d.key}` | {d.type} | `{d.default}` | {d.meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def meaning(key: str, model: str) -> str | None:
    """The one-line meaning of a common key or of a key of `model` (None when undescribed)."""
    fields = _common_fields() if key in KEYS else dataclasses.fields(model_spec(model).keys)
    return next((_doc(f) for f in fields if f.name == key), None)


if __name__ == "__main__":
    print(markdown(), end="")
