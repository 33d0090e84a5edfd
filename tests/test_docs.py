"""Docs that run: every shell and Python block of README.md and docs/*.md is executed.

Blocks fenced as ```sh, ```bash, ```shell, ```console, ```python or ```py are run; other fences
(```text, ```json, ...) are not. A marker on the line directly above a fence changes that:

    <!-- docs-test: skip (reason) -->   not run; the reason is required and shown as the skip reason
    <!-- docs-test: slow -->            run only with ``pytest -m slow`` (long blocks; an optional
                                        reason in parentheses is allowed: ``slow (reason)``)

How a file's blocks run (one test per block; the test id is ``FILE:LINE`` of the opening fence):
- in order, in one fresh temporary working directory per file, so a block can use the files that
  an earlier block of the same file wrote (a fast block must not depend on a slow one); selecting
  one block (``-k``) first runs the earlier fast blocks of its file;
- the repository's tracked top-level entries (docs/, bench/, README.md, ...) are symlinked into that
  directory, so commands written for the repository root work (``docs/configs/...``);
  ``$GEOMPROBE_REPO`` names the repository too;
- ``PATH`` starts with the running interpreter's bin folder: ``geomprobe`` and ``python`` are the
  test environment's; ``MPLBACKEND=Agg``;
- shell blocks run in ``bash -e -o pipefail``; in a block that has lines starting with ``$ `` only
  those lines (and their ``\\`` continuation lines) are commands, the rest is output and ignored;
  comments are fine;
- each Python block runs in a fresh interpreter (a block is self-contained: its own imports);
  ``>>> `` / ``... `` prompts are stripped and the other lines of such a block are ignored as output.
A failing block reports its file, line, source and output.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
FAST_TIMEOUT_S = 600  # generous: a cold numba cache on a loaded machine; long blocks belong under slow
SLOW_TIMEOUT_S = 3600
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
# Outputs that a docs run may leave in a checkout; never linked into the working directory.
_NOT_LINKED = {"runs", "results", "geomprobe-demo", "build", "dist"}


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    marker: str | None  # None, "slow" or "skip (reason)"
    marker_line: int | None = None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in SHELL_LANGS | PYTHON_LANGS

    @property
    def slow(self) -> bool:
        return self.marker is not None and re.fullmatch(r"slow(\s*\(.+\))?", self.marker) is not None

    @property
    def skip_reason(self) -> str | None:
        if self.marker and self.marker.startswith("skip"):
            m = re.fullmatch(r"skip\s*\((.+)\)", self.marker)
            return m.group(1).strip() if m else ""
        return None


def doc_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def parse_blocks(path: pathlib.Path, root: pathlib.Path = ROOT) -> tuple[list[Block], list[str]]:
    """Every fenced block of a markdown file, and the problems found in its markers."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _MARKER.match(line)
        if m:
            if pending:
                problems.append(f"{rel}:{pending[0]}: docs-test marker not directly above a fence")
            pending = (i + 1, m.group(1))
            i += 1
            continue
        f = _FENCE.match(line)
        if f:
            indent, fence, lang = f.groups()
            body = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
                j += 1
            marker = pending[1] if pending else None
            blocks.append(Block(rel, i + 1, lang.lower(), "\n".join(body) + "\n", marker,
                                pending[0] if pending else None))
            pending = None
            i = j + 1
            continue
        if pending and line.strip():
            problems.append(f"{rel}:{pending[0]}: docs-test marker not directly above a fence")
            pending = None
        i += 1
    if pending:
        problems.append(f"{rel}:{pending[0]}: docs-test marker not directly above a fence")
    for b in blocks:
        if b.marker is None:
            continue
        if not b.slow and b.skip_reason is None:
            problems.append(f"{rel}:{b.marker_line}: unknown docs-test marker {b.marker!r} "
                            "(use 'skip (reason)', 'slow' or 'slow (reason)')")
        elif b.skip_reason == "":
            problems.append(f"{rel}:{b.marker_line}: 'docs-test: skip' needs a reason in parentheses")
        elif not b.runs:
            problems.append(f"{rel}:{b.marker_line}: docs-test marker on a ```{b.lang or '(no language)'} "
                            "block, which is never run")
    problems.sort(key=lambda s: int(s.split(":")[1]))
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in parse_blocks(f)[0]]


def shell_script(source: str) -> str:
    """The commands of a shell block: the ``$ `` lines (and continuations) if any, else all lines."""
    lines = source.splitlines()
    if not any(ln.startswith("$ ") or ln == "$" for ln in lines):
        return source
    out: list[str] = []
    cont = False
    for ln in lines:
        if ln.startswith("$ ") or cont:
            cmd = ln[2:] if ln.startswith("$ ") and not cont else ln
            out.append(cmd)
            cont = cmd.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def python_script(source: str) -> str:
    """A Python block's code: with ``>>> `` prompts, only the prompted lines (prompts stripped)."""
    lines = source.splitlines()
    if not any(ln.startswith(">>> ") or ln == ">>>" for ln in lines):
        return source
    return "\n".join(ln[4:] for ln in lines if ln.startswith((">>> ", "... ")) or ln in (">>>", "...")) + "\n"


def _link_repository(workdir: pathlib.Path) -> None:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
        top = {n.split("/", 1)[0] for n in names}
    except (OSError, subprocess.CalledProcessError):
        top = {p.name for p in ROOT.iterdir()}
    for name in sorted(top):
        if name.startswith(".") or name in _NOT_LINKED or name.endswith(".egg-info"):
            continue
        if (ROOT / name).exists():
            (workdir / name).symlink_to(ROOT / name)


def _env(workdir: pathlib.Path) -> dict:
    env = dict(os.environ)
    bindir = str(pathlib.Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["GEOMPROBE_REPO"] = str(ROOT)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def run_block(block: Block, workdir: pathlib.Path) -> subprocess.CompletedProcess:
    timeout = SLOW_TIMEOUT_S if block.slow else FAST_TIMEOUT_S
    if block.lang in SHELL_LANGS:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", shell_script(block.source)]
    else:
        script = workdir / f".docs-test-{pathlib.Path(block.path).stem}-{block.line}.py"
        script.write_text(python_script(block.source), encoding="utf-8")
        cmd = [sys.executable, str(script)]
    try:
        return subprocess.run(cmd, cwd=workdir, env=_env(workdir), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(cmd, -1, out, err + f"\n[timed out after {timeout} s"
                                           + ("" if block.slow else "; mark the block <!-- docs-test: slow -->")
                                           + "]")


def _report(block: Block, proc: subprocess.CompletedProcess) -> str:
    output = (proc.stdout or "") + (proc.stderr or "")
    if len(output) > 6000:
        output = "...\n" + output[-6000:]
    return (f"docs block {block.id} (```{block.lang}) failed with exit code {proc.returncode}\n"
            f"--- block ---\n{block.source}--- output ---\n{output}")


class _FileState:
    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.results: dict[int, bool] = {}  # block line -> passed


@pytest.fixture(scope="session")
def _doc_states(tmp_path_factory):
    return {}


def _state(states: dict, tmp_path_factory, path: str) -> _FileState:
    if path not in states:
        d = tmp_path_factory.mktemp("docs-" + re.sub(r"\W", "_", path))
        _link_repository(d)
        states[path] = _FileState(d)
    return states[path]


BLOCKS = [b for b in all_blocks() if b.runs]


def _param(b: Block):
    marks = [pytest.mark.slow] if b.slow else []
    return pytest.param(b, id=b.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_block_runs(block: Block, _doc_states, tmp_path_factory):
    if block.skip_reason is not None:
        pytest.skip(f"docs-test: skip ({block.skip_reason})")
    st = _state(_doc_states, tmp_path_factory, block.path)
    # earlier blocks of the file first: fast ones are run if they have not run yet; slow ones only
    # count if they ran already (a fast block must not depend on a slow one)
    for b in BLOCKS:
        if b.path != block.path or b.line >= block.line or b.skip_reason is not None:
            continue
        if b.line not in st.results and not b.slow:
            st.results[b.line] = run_block(b, st.workdir).returncode == 0
        if st.results.get(b.line) is False:
            pytest.skip(f"an earlier block of {block.path} failed: {b.id}")
    proc = run_block(block, st.workdir)
    st.results[block.line] = proc.returncode == 0
    assert proc.returncode == 0, _report(block, proc)


@pytest.mark.parametrize("path", [f.relative_to(ROOT).as_posix() for f in doc_files()])
def test_doc_markers_are_well_formed(path):
    """A docs-test marker sits directly above a run fence and is 'slow' or 'skip (reason)'."""
    _, problems = parse_blocks(ROOT / path)
    assert problems == [], "\n".join(problems)


# --- the runner's own rules, on made-up markdown (known answers) ------------------------------------

def _parse_text(tmp_path, text):
    f = tmp_path / "x.md"
    f.write_text(text, encoding="utf-8")
    return parse_blocks(f, root=tmp_path)


def test_parser_reads_languages_markers_and_lines(tmp_path):
    text = ("# t\n"
            "```sh\necho a\n```\n"
            "<!-- docs-test: slow (compiles) -->\n```python\nprint(1)\n```\n"
            "<!-- docs-test: skip (needs a GPU) -->\n```console\n$ nvidia-smi\n```\n"
            "```text\nnot run\n```\n")
    blocks, problems = _parse_text(tmp_path, text)
    assert problems == []
    assert [(b.line, b.lang, b.runs, b.slow, b.skip_reason) for b in blocks] == [
        (2, "sh", True, False, None),
        (6, "python", True, True, None),
        (10, "console", True, False, "needs a GPU"),
        (13, "text", False, False, None),
    ]
    assert blocks[0].source == "echo a\n" and blocks[0].id == "x.md:2"


def test_parser_flags_bad_markers(tmp_path):
    text = ("<!-- docs-test: skip -->\n```sh\necho\n```\n"
            "<!-- docs-test: fast -->\n```sh\necho\n```\n"
            "<!-- docs-test: slow -->\n\nsome text\n```sh\necho\n```\n"
            "<!-- docs-test: slow -->\n```text\nx\n```\n")
    _, problems = _parse_text(tmp_path, text)
    assert len(problems) == 4, problems
    assert "needs a reason" in problems[0]
    assert "unknown docs-test marker 'fast'" in problems[1]
    assert "not directly above a fence" in problems[2]
    assert "never run" in problems[3]


def test_console_prompts_select_commands_and_continuations():
    src = "$ echo one \\\n    two\none two\n# a comment line of output\n$ echo three\nthree\n"
    assert shell_script(src) == "echo one \\\n    two\necho three\n"
    assert shell_script("echo plain\n# comment\n") == "echo plain\n# comment\n"
    assert python_script(">>> x = 1\n>>> for i in range(2):\n...     x += i\n>>> x\n2\n") == (
        "x = 1\nfor i in range(2):\n    x += i\nx\n")


def test_failing_block_reports_file_line_and_output(tmp_path):
    b = Block("docs/x.md", 7, "console", "$ echo hello-out\nhello-out\n$ false\n", None)
    proc = run_block(b, tmp_path)
    assert proc.returncode != 0
    msg = _report(b, proc)
    assert "docs/x.md:7" in msg and "hello-out" in msg and "$ false" in msg


def test_blocks_of_a_file_share_a_working_directory_and_see_the_repository(tmp_path):
    _link_repository(tmp_path)
    a = Block("docs/x.md", 1, "sh", "test -f docs/metrics.md && echo 42 > out.txt\n", None)
    b = Block("docs/x.md", 5, "python", "from pathlib import Path\nassert Path('out.txt').read_text() == '42\\n'\n", None)
    c = Block("docs/x.md", 9, "sh", "command -v geomprobe\n", None)
    for blk in (a, b, c):
        proc = run_block(blk, tmp_path)
        assert proc.returncode == 0, _report(blk, proc)
    assert pathlib.Path(proc.stdout.strip()).parent == pathlib.Path(sys.executable).parent


def test_readme_explains_every_column_of_the_printed_table():
    """README's column table lists exactly the printed table's abbreviations and their metrics."""
    from geomprobe.cli._common import TABLE_METRICS

    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| column | metric"))
    documented = {}
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in ln.strip("|").split("|")]
        documented[cells[0]] = cells[1]
    assert documented == {abbr: metric for metric, abbr in TABLE_METRICS}


# Fences without a language are neither run nor declared output. Files listed here still have some
# (their owners were asked to name the language: sh/python to run, text for output); the xfail is
# strict, so a fixed file must leave this list.
_UNTAGGED_PENDING: dict[str, str] = {}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=[pytest.mark.xfail(strict=True, reason=_UNTAGGED_PENDING[p])] if p in _UNTAGGED_PENDING else [])
    for p in [f.relative_to(ROOT).as_posix() for f in doc_files()]
])
def test_every_fence_names_its_language(path):
    """A block with commands but no language would silently escape these tests: every fence says
    what it holds (sh / console / python are run; text, json, ... are not)."""
    blocks, _ = parse_blocks(ROOT / path)
    untagged = [b.id for b in blocks if not b.lang]
    assert untagged == [], f"fences without a language (use text for output): {untagged}"


def test_developing_layout_names_every_core_module():
    """docs/developing.md's layout lists every module and subpackage of geomprobe/ and every kernel file."""
    text = (ROOT / "docs" / "developing.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):text.index("## Conventions")]
    core = ROOT / "geomprobe"
    names = [p.name for p in core.glob("*.py") if p.name != "__init__.py"]
    names += [p.name + "/" for p in core.iterdir() if (p / "__init__.py").is_file()]
    names += [p.name for p in (core / "_kernels").glob("*.py") if p.name != "__init__.py"]
    missing = sorted(n for n in set(names) if not re.search(rf"(?<![\w.]){re.escape(n)}", layout))
    assert missing == [], f"docs/developing.md layout omits: {missing}"
