"""The peer wrappers of benchmarks/compare.py (benchmarks/peers/) compute the right hypergradient (else the benchmark's
error-vs-time curves would compare wrong numbers): closed form of the quadratic problem, small n."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from benchmarks.hypergrad import saved_tensor_counter
from benchmarks.peers import betty_peer, boat_peer, higher_peer, hodl, torchopt_peer
from benchmarks.problems import DT, FWD, Quadratic


@pytest.fixture(scope="module")
def P():
    return Quadratic(40, 10.0, seed=3)


def test_closed_form_is_the_gradient(P):
    # ∇f(x) = M⁻ᵀ(M⁻¹x − y) against central finite differences of f(x) = ½||M⁻¹x − y||²
    f = lambda x: 0.5 * ((torch.linalg.solve(P.M, x) - P.y) ** 2).sum()  # noqa: E731
    v = torch.randn(P.n, dtype=DT, generator=torch.Generator().manual_seed(0))
    h = 1e-6
    fd = (f(P.x0 + h * v) - f(P.x0 - h * v)) / (2 * h)
    assert abs(float(fd - P.ref @ v)) < 1e-7 * abs(float(fd))


def test_nonsymmetric_closed_form():
    Q = Quadratic(30, 10.0, skew=0.3, seed=2)
    assert not torch.allclose(Q.M, Q.M.T)
    K = Q.forward_steps()
    g = hodl.implicit(Q, K, "gmres")(200)
    assert Q.rel_err(g) < 1e-8
    assert Q.rel_err(hodl.implicit(Q, K, "gmres", krylov=True)(200)) < 1e-8  # the GMRES forward


@pytest.mark.parametrize("name", ["ours_implicit", "ours_anderson", "ours_krylov", "ours_unrolled", "torchopt_root",
                                  "torchopt_unrolled", "higher_unrolled", "boat_cg", "boat_rad", "ours_betty",
                                  "betty_neumann"])
def test_wrappers_reach_the_closed_form(P, name):
    K = P.forward_steps()
    make = {
        "ours_implicit": (lambda: hodl.implicit(P, K, "cg"), 100, None),
        "ours_anderson": (lambda: hodl.implicit(P, K, "cg", anderson=20), 100, None),
        "ours_krylov": (lambda: hodl.implicit(P, K, "cg", krylov=True), 100, None),
        "ours_unrolled": (lambda: hodl.unrolled(P), K, None),
        "torchopt_root": (lambda: torchopt_peer.root(P, K), 100, "torchopt"),
        "torchopt_unrolled": (lambda: torchopt_peer.unrolled(P), K, "torchopt"),
        "higher_unrolled": (lambda: higher_peer.unrolled(P), K, "higher"),
        "boat_cg": (lambda: boat_peer.method(P, K, "CG"), 100, "boat_torch"),
        "boat_rad": (lambda: boat_peer.method(P, K, "RAD"), K, "boat_torch"),
        "ours_betty": (lambda: hodl.in_betty(P, K), 100, "betty"),
        "betty_neumann": (lambda: betty_peer.method(P, K, "neumann"), 2000, "betty"),
    }[name]
    factory, knob, module = make
    if module:
        pytest.importorskip(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = factory()(knob)
    assert P.rel_err(g) < 1e-7, name


def test_memory_of_implicit_is_flat_in_K():
    Q = Quadratic(30, 10.0, seed=1, nonlinear=1.0)
    sizes = []
    for K in (10, 100):
        acc = [0]
        FWD[0] = lambda acc=acc: saved_tensor_counter(acc)
        try:
            hodl.implicit(Q, K, "cg")(20)
            un = [0]
            FWD[0] = lambda un=un: saved_tensor_counter(un)
            hodl.unrolled(Q)(K)
        finally:
            FWD[0] = contextlib.nullcontext
        sizes.append((acc[0], un[0]))
    assert sizes[0][0] == sizes[1][0]  # implicit: nothing per step
    assert sizes[1][1] - sizes[0][1] >= 90 * Q.n * 8  # unrolled: at least one float64 vector per step
