"""A user's install path, as in the README's "Use it in your own project".

Build the wheel (``python -m build --wheel``), make a fresh venv, upgrade its pip to the newest,
install torch then the wheel (no extras), import the core without Betty, and run the README's quick
start there. Needs the package index (CI has it); about a minute, most of it unpacking torch.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the wheel make install pins; any torch>=2.1 satisfies the package


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)


def test_wheel_installs_into_fresh_venv_and_runs_quick_start(tmp_path):
    pytest.importorskip("build", reason="python -m build is a dev extra: make install")
    # build from a copy of what the wheel holds, so the work tree gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hodl_plugin", src / "hodl_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("hodl_plugin-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([py, "-m", "pip", "install", "--quiet", TORCH])
    _run([py, "-m", "pip", "install", "--quiet", wheel])

    # the core imports without Betty (or TorchOpt); the adapter refuses with the install command
    out = _run([py, "-c", (
        "import importlib.util, sys, hodl_plugin\n"
        "assert importlib.util.find_spec('betty') is None and importlib.util.find_spec('torchopt') is None\n"
        "try:\n"
        "    import hodl_plugin.betty\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
        "print(hodl_plugin.__file__)\n"
    )], cwd=tmp_path)
    assert str(venv) in out  # the installed wheel, not the work tree
    assert "refused:" in out and "--ignore-requires-python" in out and "betty-ml==0.2.1" in out

    out = _run([py, "-c", _quick_start()], cwd=tmp_path)
    assert "True cg" in out
    assert float(out.strip().splitlines()[-1].split(":")[-1]) < 1e-9
