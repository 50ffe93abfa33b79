"""Help that teaches: every config key in `--help` and docs/config.md, and a suggestion for a mistyped command."""

import contextlib
import dataclasses
import io
import re

import pytest

from accuvqa import config_doc
from accuvqa.cli import COMMANDS, _parser, run
from accuvqa.config import KEYS, Config, load_config, model_key_types
from accuvqa.errors import ConfigError
from accuvqa.models import list_models, register_model
from accuvqa.models.registry import _REGISTRY, config_key
from accuvqa.runlog import config_yaml
from conftest import ROOT, run_cli


def _help(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parser().parse_args([command, "--help"])
    return out.getvalue()


def test_every_config_key_has_a_group_and_a_meaning():
    missing = config_doc.undescribed_keys()
    assert not missing, (f"config keys without a description: {', '.join(missing)}; describe each on its field "
                         f"(config_key(default, meaning) in Config or in the model's keys), then run: "
                         f"python -m accuvqa.config_doc > docs/config.md")
    assert {f.metadata["group"] for f in dataclasses.fields(Config) if f.name in KEYS} <= set(config_doc.GROUPS)


def test_a_model_key_is_described_by_its_own_field_alone():
    """Adding a model is its file: the meaning written on its keys' fields reaches --help, the docs and config.yml."""
    @dataclasses.dataclass(frozen=True)
    class Keys:
        WIDTH: int = config_key(8, "width of the toy layer")

        def validate(self, where):
            pass

    register_model("described", keys=Keys)(lambda *a: None)
    try:
        assert config_doc.undescribed_keys() == []
        row = next(d for d in config_doc.key_docs() if d.key == "WIDTH")
        assert (row.group, row.type, row.default, row.meaning) == (
            "model (described)", "int", "8", "width of the toy layer")
        assert re.search(r"^  WIDTH +int +8 +width of the toy layer$", config_doc.help_text(), re.M)
        assert "| `WIDTH` | int | `8` | width of the toy layer |" in config_doc.markdown()
        toy = load_config(overrides={"MODEL_USE": "described"})
        assert "\nWIDTH: 8  # width of the toy layer\n" in config_yaml(toy)
    finally:
        del _REGISTRY["described"]


def test_a_model_key_without_a_description_is_named():
    @dataclasses.dataclass(frozen=True)
    class Keys:
        WIDTH: int = 8

        def validate(self, where):
            pass

    register_model("undocumented", keys=Keys)(lambda *a: None)
    try:
        assert config_doc.undescribed_keys() == ["WIDTH (model undocumented)"]
        row = next(d for d in config_doc.key_docs() if d.key == "WIDTH")
        assert (row.group, row.type, row.default, row.meaning) == (
            "model (undocumented)", "int", "8", "(no description)")
    finally:
        del _REGISTRY["undocumented"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command_lists_every_key_with_type_default_and_meaning(command):
    text = _help(command)
    table = text.split("config keys: --KEY VALUE on the command line")[1]
    rows, group = {}, None  # (group, key) -> its row: models share key names (HIDDEN_SIZE, ...)
    for line in table.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = line[:-1]
        elif line[:2] == "  " and line[2] != " ":
            rows[group, line.split()[0]] = line
    docs = config_doc.key_docs()
    assert set(rows) == ({(d.group, d.key) for d in docs if d.key in KEYS}
                         | {(f"model ({m})", k) for m in list_models() for k in model_key_types(m)})
    for doc in docs:
        row = rows[doc.group, doc.key]
        # columns: key, type, default, then the first words of the meaning
        after_key = row[2 + len(doc.key):].lstrip()
        assert after_key.startswith(doc.type) and after_key[len(doc.type):].lstrip().startswith(doc.default), row
        assert doc.meaning.split()[0] in row
    for heading in ("data:", "model:", "model (mcan):", "training:", "run:"):
        assert heading in text.splitlines()
    lines = text.splitlines()
    assert lines.index("data:") < lines.index("model:") < lines.index("training:") < lines.index("run:")
    assert "  GRAD_ACCU_STEPS" in text.split("training:")[1].split("run:")[0]
    assert re.search(r"^  HIDDEN_SIZE +int ", text.split("model (mcan):")[1].split("training:")[0], re.M)


def test_train_help_in_a_subprocess_shows_the_table(tmp_path):
    r = run_cli("train", "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert re.search(r"^  BATCH_SIZE +int +64 ", r.stdout, re.M)
    assert "effective batch: samples per optimizer update" in r.stdout


def test_docs_config_md_is_the_generated_table():
    page = (ROOT / "docs/config.md").read_text()
    assert page == config_doc.markdown(), ("docs/config.md is out of date: run "
                                           "python -m accuvqa.config_doc > docs/config.md (or make docs)")
    for doc in config_doc.key_docs():
        assert f"| `{doc.key}` | {doc.type} | `{doc.default}` |" in page


def test_an_unknown_command_suggests_the_closest_one_and_exits_2(tmp_path):
    r = run_cli("trian", "--config", "small", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"accuvqa: error: unknown command 'trian'; did you mean train? "
                                f"(commands: {', '.join(COMMANDS)})")


@pytest.mark.parametrize("typed,suggestion", [("plt", "plot"), ("prepair", "prepare"), ("vall", "val"),
                                              ("predcit", "predict"), ("zzzzzz", None)])
def test_the_suggestion_is_the_closest_command(typed, suggestion):
    with pytest.raises(ConfigError) as e:
        run([typed])
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    assert str(e.value) == f"unknown command {typed!r}{hint} (commands: {', '.join(COMMANDS)})"
