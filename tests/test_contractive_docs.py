"""The example of docs/contractive.rst (tests/compat/contractive_deq.py): the page's claims hold when it runs.

The spectral norms are recomputed here from the singular values of the weight the model used, not taken
from the example's own bookkeeping."""

from __future__ import annotations

import pathlib
import re
import runpy

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).parent / "compat" / "contractive_deq.py"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))


def norms_along_training(example, mode, steps=100):
    """||W||_2 (largest singular value) of the weight each training step used, and the step's error if any."""
    used = []
    original = example["DEQ"].forward

    def spy(self, x):
        u, z, W = original(self, x)
        used.append(float(torch.linalg.svdvals(W.detach())[0]))
        return u, z, W

    example["DEQ"].forward = spy
    try:
        out = example["train"](mode, steps=steps)
    finally:
        example["DEQ"].forward = original
    return used, out


def test_unconstrained_weight_leaves_the_contraction_region_and_the_solve_says_so(example):
    used, out = norms_along_training(example, "free")
    assert max(used) > 1.0
    assert out["error"] is not None and "DivergenceError" in out["error"]
    assert len(out["losses"]) < 100  # training stopped at the divergence


def test_exact_normalisation_keeps_the_bound_at_every_step(example):
    used, out = norms_along_training(example, "exact")
    assert len(used) == 100 and max(used) <= 0.9 * (1 + 1e-12)
    assert out["error"] is None and out["unconverged"] == 0
    assert out["losses"][-1] < 0.5 * out["losses"][0]  # and it learns


def test_spectral_norm_and_jacobian_penalty_train_without_a_failed_solve(example):
    for mode in ("spectral_norm", "jacobian"):
        used, out = norms_along_training(example, mode)
        assert out["error"] is None and out["unconverged"] == 0, mode
        assert out["losses"][-1] < 0.5 * out["losses"][0], mode
        assert out["max_local"] < 1.0, mode  # a contraction at every fixed point of training
    assert max(norms_along_training(example, "jacobian")[0]) > 1.0  # though W itself is not bounded


def test_one_power_iteration_per_step_lags_the_weight(example):
    """The page's warning: torch's default n_power_iterations=1 does not keep ||W||_2 <= 1 at lr 0.05."""
    out = example["train"]("spectral_norm", power_iterations=1)
    assert out["max_norm"] > 1.0 and out["max_local"] > 1.0


def test_page_numbers_are_the_ones_the_example_prints(example, capsys):
    """The table printed in docs/contractive.rst is this run's output (its decimals to 2 %: BLAS may differ)."""
    example["main"]()
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    page = (pathlib.Path(__file__).parents[1] / "docs" / "contractive.rst").read_text().splitlines()
    decimals = re.compile(r"\d+\.\d+")
    for line in printed:
        mode = line.split()[0]
        (shown,) = [p for p in page if p.strip().startswith(mode + " ") and "max ||W||_2" in p]
        got, want = ([float(v) for v in decimals.findall(t.split("   step")[0])] for t in (line, shown))
        assert len(got) == len(want) == 4 and got == pytest.approx(want, rel=0.02), (line, shown)
