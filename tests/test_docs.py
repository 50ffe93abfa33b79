"""Docs that cannot drift: every shell command in README.md and docs/*.md is run here or marked as not
runnable, and what the README and docs list (modules, models, presets, links) is what exists.

The convention (written for users in docs/README.md, "Commands in these pages"):
- A shell command is a line of a fenced ```bash / ```sh / ```shell block, with its continuation
  lines (a trailing backslash, an open quote, a `for ... done`), or a line starting with `$ ` in a
  ```console block or in the text. Other fences (```python, ```yaml, a bare ```) hold no command;
  a bare fence whose lines start like a command (`accuvqa `, `make `, `.venv/bin/`) is an error.
- A command is marked as not run by a comment holding `not run by the tests: REASON`: a trailing
  `# not run by the tests: REASON` on one of its lines, or `<!-- not run by the tests: REASON -->`
  on the line before its block (the whole block). Every other command is run.
- `# exit N` in a command's comment: the command shows an error on purpose and must exit with N.
- Commands run page by page (README first, then docs/ by name), a block's commands in one bash
  process, in a scratch folder shared by all pages: a `.venv` link to the environment running these
  tests, also on PATH (as after `. .venv/bin/activate`); `configs/` holding the shipped presets, the
  easy-VQA ones at MAX_EPOCH 1 and NUM_THREADS 1; and the bundled easy-VQA cut to its first
  IMAGES images per split (a sitecustomize hook on the `easy_vqa` package), so `accuvqa prepare` and
  every run on it take seconds. Each must exit 0 (or its `# exit N`). A command an earlier page or
  block already ran (the same text, comments and `.venv/bin/` aside) is not run again.

Beside the commands: README's layout section lists exactly the module files of src/accuvqa; its first
screen holds the pitch, the two commands and the task table; docs/models.md and docs/reliability.md
name every registered model, and models.md's table every preset; relative links, file paths and test
names in the pages exist; docs/config.md is what `make docs` writes; docs/troubleshooting.md covers
every module that raises a user error.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
CONSOLE = {"console"}
IMAGES = 60  # easy-VQA images per split in the scratch folder: ~520 train questions, 8 updates of 64
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
NOT_RUN = re.compile(r"not run by the tests:\s*(.*?)\s*(?:-->)?\s*$")
EXIT = re.compile(r"#.*\bexit (\d+)\b")
LOOKS_LIKE_A_COMMAND = re.compile(r"^\s*(\$ |accuvqa |make |\.venv/bin/|torchrun |pip |python )")
PER_COMMAND_S = 300  # a hang guard, not a speed requirement


@dataclass(frozen=True)
class Command:
    """One shell command of a page: where it is, its text, and whether and how it runs."""

    doc: Path
    line: int  # 1-based line of its first line
    block: int  # index of its block in the page (text commands: -1 - line)
    text: str
    not_run: str | None  # the reason it is not run, or None
    exit_code: int  # the exit status it must end with

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, first content line (1-based), lines, and the block marker's reason."""

    lang: str
    line: int
    lines: tuple[str, ...]
    not_run: str | None


def blocks_and_text(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of a page, and its lines outside them (numbered)."""
    lines = path.read_text().splitlines()
    blocks, text = [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            text.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(before) if before.strip().startswith("<!--") else None
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[:3]):
            end += 1
        blocks.append(Block(lang, i + 2, tuple(lines[i + 1:end]), marker.group(1) if marker else None))
        i = end + 1
    return blocks, text


@cache
def _complete(text: str) -> bool:
    """Whether `text` is a whole shell command (bash -n: no open quote, loop or here-document)."""
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, check=False)
    return not re.search(r"unexpected end of file|unexpected EOF|here-document", check.stderr)


def _command(path: Path, line: int, block: int, text: str, block_reason: str | None) -> Command:
    reasons = [m.group(1) for part in text.splitlines() if (m := NOT_RUN.search(part))]
    code = EXIT.search(text)
    return Command(path, line, block, text, block_reason or (reasons[0] if reasons else None),
                   int(code.group(1)) if code else 0)


def shell_commands(lines: list[tuple[int, str]], prompt: bool) -> list[tuple[int, str]]:
    """(line, text) of each command in numbered lines: every line (`prompt` False: a bash block) or the
    lines starting with `$ ` (`prompt` True), each with its continuation lines."""
    found, current, first = [], [], 0
    for number, line in lines:
        if not current:
            if prompt:
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            elif not line.strip() or line.lstrip().startswith("#"):
                continue
            first = number
        elif prompt and line.lstrip().startswith("> "):
            line = line.lstrip()[2:]
        current.append(line)
        text = "\n".join(current)
        if line.rstrip().endswith("\\") or not _complete(text):
            continue
        found.append((first, text))
        current = []
    if current:
        found.append((first, "\n".join(current)))
    return found


def page_commands(path: Path) -> list[Command]:
    """Every shell command of a page, in page order."""
    blocks, text = blocks_and_text(path)
    commands = []
    for index, block in enumerate(blocks):
        if block.lang in SHELL | CONSOLE:
            numbered = list(enumerate(block.lines, start=block.line))
            for line, cmd in shell_commands(numbered, prompt=block.lang in CONSOLE):
                commands.append(_command(path, line, index, cmd, block.not_run))
    for line, cmd in shell_commands(text, prompt=True):
        commands.append(_command(path, line, -1 - line, cmd, None))
    return sorted(commands, key=lambda c: c.line)


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------- the convention itself

def test_the_parser_reads_the_convention(tmp_path):
    """Continuation lines, loops, markers, expected exits and prompts are read as the module docstring says."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash",
        "accuvqa train --config c.yml \\",
        "    --VERSION a          # not run by the tests: slow",
        "for k in 1 4; do",
        "  echo $k",
        "done",
        "accuvqa train --MODEL_USE nosuch     # exit 2",
        "```",
        "<!-- not run by the tests: needs a GPU -->",
        "```sh",
        "nvidia-smi",
        "```",
        "```console",
        "$ echo hi",
        "hi",
        "```",
        "$ make demo",
        "```python",
        "print('not a command')",
        "```",
    ]) + "\n")
    commands = page_commands(page)
    assert [(c.line, c.text.splitlines()[0], c.not_run, c.exit_code) for c in commands] == [
        (2, "accuvqa train --config c.yml \\", "slow", 0),
        (4, "for k in 1 4; do", None, 0),
        (7, "accuvqa train --MODEL_USE nosuch     # exit 2", None, 2),
        (11, "nvidia-smi", "needs a GPU", 0),
        (14, "echo hi", None, 0),
        (17, "make demo", None, 0),
    ]
    assert commands[1].text == "for k in 1 4; do\n  echo $k\ndone"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_marker_gives_a_reason_and_no_command_hides_in_a_bare_fence(doc):
    blocks, _ = blocks_and_text(doc)
    for block in blocks:
        if block.lang in SHELL | CONSOLE:
            continue
        hidden = [line for line in block.lines if LOOKS_LIKE_A_COMMAND.match(line)]
        assert block.lang in ("python", "yaml", "json", "text") or not hidden, (
            f"{_id(doc)}:{block.line}: a ```{block.lang} block holds commands ({hidden[0].strip()!r}): "
            f"fence it as ```bash so the test runs it or sees its marker")
    for command in page_commands(doc):
        assert command.not_run is None or command.not_run.strip(), \
            f"{command.where()}: `not run by the tests:` needs a reason after the colon"


# ----------------------------------------------------------------------------- running the commands

SITECUSTOMIZE = f'''\
"""Cut the bundled easy-VQA to its first images per split (tests/test_docs.py's scratch folder)."""
import easy_vqa

def _cut(full):
    def first_images():
        paths = full()
        return {{k: paths[k] for k in sorted(paths)[:{IMAGES}]}}
    return first_images

easy_vqa.get_train_image_paths = _cut(easy_vqa.get_train_image_paths)
easy_vqa.get_test_image_paths = _cut(easy_vqa.get_test_image_paths)
'''


def _normalised(text: str) -> str:
    """A command's text without comments (`#` after a space), line continuations and repeated spaces,
    and with `.venv/bin/` dropped (the scratch PATH makes the two the same command)."""
    text = re.sub(r"(^|\s)#[^\n]*", " ", text.replace("\\\n", " "))
    return " ".join(text.replace(".venv/bin/", "").split())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict, set]:
    """The folder the pages' commands run in, and their environment (see the module docstring)."""
    assert (Path(sys.prefix) / "bin" / "accuvqa").exists(), \
        f"run the tests from the project's environment (make test): {sys.prefix}/bin holds no accuvqa command"
    root = tmp_path_factory.mktemp("docs")
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (root / "configs").mkdir()
    for preset in sorted((ROOT / "src/accuvqa/configs").glob("*.yml")):
        values = yaml.safe_load(preset.read_text()) or {}
        if values.get("DATASET") == "easyvqa":
            values.update(MAX_EPOCH=1, NUM_THREADS=1)
        (root / "configs" / preset.name).write_text(yaml.safe_dump(values, sort_keys=False))
    hooks = root / ".hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PATH": f"{root / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(root / ".venv"), "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT / 'src'}",
           "MPLBACKEND": "Agg", "ACCUVQA_DEBUG": ""}
    return root, env, set()  # the normalised commands run so far: a page repeating one does not run it again


def _block_script(commands: list[Command]) -> str:
    """One bash script for a block's runnable commands: each followed by a check of its exit status."""
    parts = []
    for n, command in enumerate(commands):
        check = f'if [ "$__rc" -ne {command.exit_code} ]; then echo "__DOCS_FAILED__ {n} $__rc"; exit 97; fi'
        parts += [f"echo '>>> {command.where()}' >&2", command.text, f"__rc=$?; {check}"]
    return "\n".join(parts) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_unmarked_command_of_the_page_runs(doc, scratch):
    """Each command that carries no `not run by the tests:` marker runs in the scratch folder and ends with
    its exit status (0, or its `# exit N`)."""
    root, env, done = scratch
    by_block: dict[int, list[Command]] = {}
    for command in page_commands(doc):
        if command.not_run is None:
            by_block.setdefault(command.block, []).append(command)
    for block in by_block.values():
        commands = [c for c in block if _normalised(c.text) not in done]
        if not commands:
            continue
        result = subprocess.run(["bash", "-c", _block_script(commands)], cwd=root, env=env, capture_output=True,
                                text=True, timeout=PER_COMMAND_S * len(commands), check=False)
        failed = re.search(r"__DOCS_FAILED__ (\d+) (\d+)", result.stdout)
        if failed or result.returncode != 0:
            command = commands[int(failed.group(1))] if failed else commands[-1]
            status = failed.group(2) if failed else result.returncode
            output = (result.stdout + result.stderr)[-3000:]
            pytest.fail(f"{command.where()}: exit {status}, expected {command.exit_code}:\n{command.text}\n"
                        f"--- its block's output (end):\n{output}\n"
                        f"Fix the command, or mark it `# not run by the tests: REASON`.")
        done.update(_normalised(c.text) for c in commands)


# ----------------------------------------------------------------------------- what the pages list

def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def layout_entries(section: str) -> set[str]:
    """Module files named in the name column of the layout block, as paths under src/accuvqa.

    A line's name column ends at the first run of two spaces; a name ending in `/` opens a folder for
    the more-indented lines below it; `a.py, b.py` names several files of the same folder."""
    block = re.search(r"```[\w]*\n(.*?)```", section, re.DOTALL)
    assert block, "the layout section has no fenced block"
    lines = block.group(1).splitlines()
    assert lines and lines[0].strip() == "src/accuvqa/", "the layout block starts with src/accuvqa/"
    folders: list[tuple[int, str]] = []  # (indent, folder) open above the current line
    found = set()
    for line in lines[1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name_column = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        folders = [(i, f) for i, f in folders if i < indent]
        if not re.fullmatch(r"[\w./, ]+", name_column):  # a continued description
            continue
        prefix = "".join(f for _, f in folders)
        for name in re.split(r"[,\s]+", name_column):
            if name.endswith("/"):
                folders.append((indent, name))
            elif name.endswith(".py"):
                found.add(prefix + name)
    return found


def test_the_readme_layout_lists_every_module_and_nothing_else():
    package = ROOT / "src" / "accuvqa"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    listed = layout_entries(_section((ROOT / "README.md").read_text(), "Layout"))
    assert listed == modules, (f"README.md's layout section misses {sorted(modules - listed)} and lists "
                               f"{sorted(listed - modules)}, which src/accuvqa does not hold")


def test_the_readme_first_screen_holds_the_pitch_the_two_commands_and_the_task_table():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    for needed in ("make demo", "make test", "| I want to"):
        assert needed in first_screen, f"README.md's first 60 lines lack {needed!r}"


def test_every_command_of_the_readme_task_table_is_a_checked_command():
    """An `accuvqa ...` in the README's "I want to" table is a command of some page's fenced block, so it is
    run (or marked) there too."""
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"^\| I want to.*?(?=^[^|])", readme, re.MULTILINE | re.DOTALL).group(0)
    every = "\n".join(c.text for doc in DOCS for c in page_commands(doc))
    for cell in re.findall(r"`((?:accuvqa|make|\.venv/bin/accuvqa) [^`]*)`", table):
        cell = cell.removesuffix(" ...")  # "accuvqa predict ... --VERSION run1 ...": the rest is in the doc
        assert cell in every, f"README's task table shows `{cell}`, which no fenced block of the docs holds"


def test_the_model_pages_name_every_model_and_every_preset():
    from accuvqa.config import list_presets
    from accuvqa.models import list_models

    models_page = (ROOT / "docs/models.md").read_text()
    for name in list_models():
        assert f"`{name}`" in models_page, f"docs/models.md does not name model `{name}`"
        assert f"`{name}`" in (ROOT / "docs/reliability.md").read_text(), \
            f"docs/reliability.md does not name model `{name}`"
    table = re.search(r"^\| `MODEL_USE` \| presets \|.*?(?=^[^|])", models_page, re.MULTILINE | re.DOTALL)
    assert table, "docs/models.md has no table headed | `MODEL_USE` | presets |"
    for preset in list_presets():
        assert f"`{preset}`" in table.group(0), f"docs/models.md's presets table lacks `{preset}`"
    registered = ", ".join(list_models())
    for doc in DOCS:
        for listed in re.findall(r"registered: ([a-z_, ]+[a-z_])", doc.read_text()):
            assert listed == registered, f"{_id(doc)} quotes 'registered: {listed}'; the registry says {registered}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_relative_link_reaches_a_file_and_heading(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{_id(doc)} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{_id(doc)} links to {target}: no such heading in {path.name}"


def test_the_config_page_is_generated_from_the_code():
    from accuvqa import config_doc

    assert (ROOT / "docs/config.md").read_text().rstrip("\n") == config_doc.markdown().rstrip("\n"), \
        "docs/config.md is not what the code describes: run make docs"


def test_the_troubleshooting_page_covers_every_error_source():
    """Each module that raises a user-facing error is named on docs/troubleshooting.md, so a new kind of
    error is seen there."""
    page = (ROOT / "docs/troubleshooting.md").read_text()
    raising = set()
    for path in (ROOT / "src/accuvqa").rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.Call) and getattr(node.func, "id", None) in
               ("ConfigError", "DataError", "CheckpointError") for node in ast.walk(tree)):
            raising.add(str(path.relative_to(ROOT / "src/accuvqa")))
    missing = sorted(m for m in raising if m not in page)
    assert not missing, f"docs/troubleshooting.md does not cover the errors raised in {missing}"


def test_every_file_and_test_a_page_names_exists():
    """`tests/test_x.py::test_name`, `benchmarks/x.py`, `src/accuvqa/...`: what the pages point to is there."""
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE))
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(r"\b((?:src|tests|benchmarks|configs)/[\w./-]*\w\.(?:py|yml))\b", text):
            if not re.search(r"[A-Z]{3,}", path):  # configs/NAME.yml: a placeholder
                assert (ROOT / path).exists(), f"{_id(doc)} names {path}, which does not exist"
        for name in sorted(set(re.findall(r"\b(test_\w+)\b(?!\.py)", text))):
            assert name in defined, f"{_id(doc)} names {name}, which no file in tests/ defines"
