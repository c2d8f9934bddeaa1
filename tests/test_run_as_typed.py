"""Every benchmark and every recipe runs as its docs type it, ``python -m benchmarks.<name> --quick`` and
``python -m recipes.<name> --quick``, in a subprocess from a fresh working directory: a renamed function, a
removed option or a changed signature fails here (in ``make test-slow``), not in a user's terminal.

The modules are found, not listed: every ``benchmarks/*.py`` and ``recipes/*.py`` (not ``_private``) with a
``__main__`` block. The recipes' runs, with their checks of the results, are in ``test_recipes.py``; the
fast tests here check that each one has such a run and that each benchmark offers ``--quick``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import runnable

ROOT = pathlib.Path(__file__).resolve().parents[1]


BENCHMARKS = runnable("benchmarks")
RECIPES = runnable("recipes")


def run_module(module: str, cwd: pathlib.Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--quick"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def test_the_modules_are_found():
    assert {"anderson", "betty_overhead", "compare", "hypergrad", "vmap"} <= set(BENCHMARKS)
    assert {"nonsingleton", "sparse_coding", "hyper_cleaning", "learned_regularizer", "deconvolution", "derain",
            "few_shot"} <= set(RECIPES)
    assert "problems" not in BENCHMARKS and "report" not in BENCHMARKS  # helpers, not run by users


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_offers_quick(name):
    assert '"--quick"' in (ROOT / "benchmarks" / f"{name}.py").read_text(), (
        f"benchmarks/{name}.py: give it a --quick (about a minute) so that make test-slow runs it")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_has_a_quick_run_with_checks(name):
    import test_recipes

    assert name in test_recipes.RECIPES
    assert callable(getattr(test_recipes, f"test_{name}_quick", None)), (
        f"recipes/{name}.py: add test_{name}_quick to tests/test_recipes.py (runs --quick, checks the results)")


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it after `make test`)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_as_typed(name, tmp_path):
    proc, seconds = run_module(f"benchmarks.{name}", tmp_path, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), "printed nothing"
    assert "Traceback" not in proc.stderr
    print(f"python -m benchmarks.{name} --quick: {seconds:.0f} s")
