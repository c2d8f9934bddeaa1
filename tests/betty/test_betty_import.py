"""Importing the adapter: the exact install command when Betty is missing or too old; one module per concern."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = 'pip install --ignore-requires-python "betty-ml==0.2.1" "numpy<2.3"'


def _import_with(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\nimport hodl_plugin.betty\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_missing_betty_names_the_install_command():
    r = _import_with("import sys; sys.modules['betty'] = None")  # `import betty` raises ImportError
    assert r.returncode != 0
    assert "ImportError" in r.stderr and INSTALL in r.stderr


def test_betty_011_is_refused_with_the_install_command():
    r = _import_with("import betty; betty.__version__ = '0.1.1'")
    assert r.returncode != 0
    assert "found 0.1.1" in r.stderr and INSTALL in r.stderr


def test_core_imports_without_betty():
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['betty'] = None; import hodl_plugin; "
                        "assert 'hodl_plugin.betty' not in sys.modules"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr


def test_public_names_unchanged_and_only_the_package_imports_betty():
    pytest.importorskip("betty")
    import hodl_plugin.betty as hb

    assert hb.__all__[:14] == ["HODLConfig", "GKMProblem", "GKM_METHODS", "IMPLICIT_METHODS", "register",
                               "set_log_level", "HODLEngine", "unwrap", "engine_state_dict",
                               "load_engine_state_dict", "save_checkpoint", "load_checkpoint", "gkm_vjp",
                               "implicit_vjp"]
    for name in hb.__all__:
        assert hasattr(hb, name)
    importers = [p for p in (ROOT / "hodl_plugin").rglob("*.py")
                 if any(line.startswith(("import betty", "from betty")) or line.strip().startswith(
                     ("import betty", "from betty.")) for line in p.read_text().splitlines()
                        if ">>>" not in line)]
    assert [p.relative_to(ROOT).as_posix() for p in importers] == ["hodl_plugin/betty/_betty.py"]
