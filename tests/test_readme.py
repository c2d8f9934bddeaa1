"""The README's python blocks run as written and print what the README says (every block is run)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_python_block_is_checked_here():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "hp.GKMSolver" in blocks[0] and "hb.GKMProblem" in blocks[1]


def test_quick_start_runs(capsys):
    block = re.search(r"## Quick start\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert block == python_blocks()[0]
    assert len(block.strip().splitlines()) <= 20
    assert "x = torch.zeros" not in block  # a nonzero x: u*(x) = A⁻¹x is not trivially 0
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "True cg" in out
    err = float(out.strip().splitlines()[-1].split(":")[-1])
    assert err < 1e-9


def test_betty_example_runs(capsys):
    pytest.importorskip("betty")
    block = python_blocks()[1]
    exec(compile(block, "README Betty example", "exec"), {})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    learned, grid = (float(v) for v in re.findall(r"λ = ([0-9.]+)", line))
    # the hypergradient-trained λ reaches the grid-search optimum of the closed-form ridge solution
    assert abs(learned - grid) < 0.01 * grid, line
    assert f"learned λ = {learned:.3f}, grid search λ = {grid:.3f}" in README.read_text()
