"""The README tells the truth: its code runs and prints what it says, its commands exist as written,
and every measured table in it is the one its benchmark wrote (each number in one place)."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- (?P<name>[a-z_]+):(?:begin|start) -->\n(?P<body>.*?)<!-- (?P=name):end -->", re.S)


def text() -> str:
    return README.read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", text(), re.S)


def prose() -> str:
    """The README without its fenced code, inline code and marker blocks: what a person reads as claims."""
    t = re.sub(r"```.*?```", "", text(), flags=re.S)
    t = BLOCK.sub("", t)
    return re.sub(r"`[^`]*`", "", t)


def test_every_python_block_is_checked_here():
    blocks = python_blocks()
    assert len(blocks) == 1
    assert "hp.GKMSolver" in blocks[0]


def test_quick_start_runs(capsys):
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text(), re.S).group(1)
    assert block == python_blocks()[0]
    assert len(block.strip().splitlines()) <= 20
    assert "x = torch.zeros" not in block  # a nonzero x: u*(x) = A⁻¹x is not trivially 0
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    claimed = re.search(r"It prints `([^`]*)` and a relative error below `([^`]*)`", text())
    assert out[0] == claimed.group(1)
    assert float(out[-1].split(":")[-1]) < float(claimed.group(2))


def test_prose_holds_no_measured_number():
    """Measured figures live in the marker blocks their benchmarks write (or on the documentation page
    that reports them), never retyped in the prose, where they would go stale: no decimal fractions,
    ratios (``2.1×``), percentages or timings outside code and marker blocks."""
    p = re.sub(r"\b(torch|betty-ml|numpy|Python|pip|python)[ =<>]*\d+(\.\d+)*", "", prose())
    found = re.findall(r"\d+\.\d+|\d+(?:\.\d+)?\s*[×x%]|\d+(?:\.\d+)?\s*(?:s|ms|min|MB|dB)\b", p)
    assert not found, f"numbers in the README prose (put them in a benchmark's marker block or the docs): {found}"


def test_no_status_log_and_no_pointers_a_reader_cannot_follow():
    t = text()
    for phrase in ("## Status", "SPEC", "issue ", "this session", "closing notes", "the old table", "CI machine"):
        assert phrase not in t, phrase
    assert not re.search(r"\b[0-9a-f]{7,40}\b", prose()), "a commit hash in the README"


def test_commands_shown_exist_as_written():
    """Every `python -m package.module [--flags]` the README shows names a module that exists and flags
    its argument parser accepts; every `make TARGET` is a Makefile target; every path exists."""
    t = text()
    for cmd in re.findall(r"python -m ((?:benchmarks|recipes)\.[a-z_]+)((?: --[a-z-]+)*)", t):
        module, flags = cmd
        mod = importlib.import_module(module)
        assert hasattr(mod, "main"), module
        parser_flags = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", pathlib.Path(mod.__file__).read_text()))
        for flag in flags.split():
            assert flag in parser_flags, f"{module} has no {flag}"
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for target in re.findall(r"`make ([a-z-]+)`|^make ([a-z-]+)", t, re.M):
        name = target[0] or target[1]
        assert name in targets, f"make {name}"
    for path in re.findall(r"`((?:docs|examples|tests|benchmarks|recipes)/[\w./-]+)`", t):
        assert "_build" in path or (ROOT / path).exists(), path  # _build: written by `make docs`
    for line in re.findall(r"```bash\n(.*?)```", t, re.S):
        for command in line.splitlines():
            command = command.split("#")[0].strip()
            if command.startswith("python -m"):
                shlex.split(command)  # well-formed


def marker_blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text())}


def test_marker_blocks_are_whole_and_name_their_command_date_and_machine():
    t = text()
    blocks = marker_blocks()
    assert "anderson" in blocks
    for name, body in blocks.items():
        assert t.count(f"<!-- {name}:end -->") == 1, name
        first = body.strip().splitlines()[0] if body.strip() else ""
        assert re.search(r"`python -m benchmarks\.\w+", first), f"{name}: the block must start by naming its command"
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", first), f"{name}: the block must give the date of the run"
        assert re.search(r"x86_64|aarch64|arm64|CPU|GPU|H100|H200", first), f"{name}: the block must name the machine"


def test_anderson_block_is_what_its_results_file_renders():
    """The table between the anderson markers equals ``benchmarks.anderson.markdown`` of the rows that
    ``--write-readme`` saved in ``benchmarks/results/anderson.json``: a README number edited by hand, or
    a results file from another run, fails here."""
    from benchmarks import anderson

    saved = json.loads((ROOT / "benchmarks" / "results" / "anderson.json").read_text())
    rendered = anderson.markdown(saved["rows"], saved["repeats"], saved["when"])
    assert marker_blocks()["anderson"].strip() == rendered.strip()


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_markdown_files_link_only_to_existing_files(name):
    t = (ROOT / name).read_text()
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)\)", t):
        assert (ROOT / target).exists(), target
