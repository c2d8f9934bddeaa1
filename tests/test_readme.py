"""The README's quick start runs as written and prints what the README says."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 20
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "True cg" in out
    err = float(out.strip().splitlines()[-1].split(":")[-1])
    assert err < 1e-9
