"""Schedules (:mod:`hodl_plugin.schedules`): exact values, asymptotic facts, the convergence-condition checks
of :ref:`math-gkm`, and the summable ``Geometric`` weight that is accepted with a named warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _oracles import DT, rel_err

import hodl_plugin as hp
from hodl_plugin import schedules as S


def test_isgd_poly_values():
    """ISGD's "poly" schedule a_k = c0 (k + 1)^(-p)."""
    a = S.Polynomial(2e-4, 0.75)
    assert a(3) == pytest.approx(7.071067811865475e-05, rel=1e-12)
    assert a(0) == 2e-4
    e = S.Polynomial(10.0, 0.5)
    assert e(99) == pytest.approx(1.0)


def test_log_and_harmonic_and_constant():
    assert S.Log(2.0, 1.0)(0) == 2.0
    assert S.Log(1.0, 2.0)(10) == pytest.approx(1 / math.log(10 + math.e) ** 2)
    assert S.Harmonic(1.0).values(4) == [1.0, 0.5, 1 / 3, 0.25]
    assert S.Constant(0.3)(10**6) == 0.3


@pytest.mark.parametrize(
    "sched,limit,summable",
    [
        (S.Constant(0.5), 0.5, False),
        (S.Constant(0.0), 0.0, True),
        (S.Polynomial(1.0, 0.5), 0.0, False),
        (S.Polynomial(1.0, 1.5), 0.0, True),
        (S.Log(1.0, 3.0), 0.0, False),
    ],
)
def test_asymptotic_facts(sched, limit, summable):
    assert sched.limit == limit
    assert sched.summable is summable


def test_checks():
    assert S.check_relaxation(S.Constant(1.0)) == []
    assert S.check_relaxation(S.Constant(0.0))
    assert S.check_aggregation(S.Harmonic(1.0)) == []
    assert S.check_aggregation(S.Polynomial(0.5, 0.5)) == []
    assert S.check_aggregation(S.Log(1.0)) == []
    assert S.check_aggregation(S.Constant(0.1))
    assert S.check_aggregation(S.Polynomial(2.0, 1.0))  # alpha_0 > 1
    assert S.check_accuracy(S.Constant(-1.0))


def test_invalid_construction():
    with pytest.raises(hp.ScheduleError):
        S.Polynomial(1.0, -1.0)
    with pytest.raises(hp.ScheduleError):
        S.Constant(math.nan)
    with pytest.raises(hp.ScheduleError):
        S.as_schedule("fast")


# -- Geometric: values, the named warning, invalid arguments ------------------------------------------------
def test_geometric_values_and_facts():
    a = hp.Geometric(0.6, 0.9)
    assert a.values(4) == pytest.approx([0.6, 0.54, 0.486, 0.4374], rel=1e-15)
    assert a(30) == pytest.approx(0.6 * 0.9**30, rel=1e-15)
    assert a.summable and a.limit == 0.0 and a.nonincreasing
    assert sum(a.values(2000)) == pytest.approx(0.6 / (1 - 0.9), rel=1e-12)


def test_summable_schedules_warn_with_the_named_warning():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for alpha in (hp.Geometric(0.5, 0.9), hp.Polynomial(1.0, 2.0)):
        with pytest.warns(hp.SummableScheduleWarning, match="outside the selection theory"):
            hp.GKMSolver(T, upper=F, alpha=alpha)
    assert issubclass(hp.SummableScheduleWarning, hp.ConvergenceWarning)
    with warnings.catch_warnings():  # a non-summable schedule does not warn
        warnings.simplefilter("error")
        hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(1.0), aggregation="outside")
        hp.GKMSolver(T, upper=F, alpha=0.0, aggregation="outside")


@pytest.mark.parametrize(
    "args,match",
    [((-0.1, 0.9), "alpha0"), ((math.nan, 0.9), "alpha0"), ((math.inf, 0.9), "alpha0"),
     ((0.5, 1.0), "gamma"), ((0.5, 0.0), "gamma"), ((0.5, -0.5), "gamma"), ((0.5, math.nan), "gamma")],
)
def test_geometric_rejects_invalid_arguments(args, match):
    with pytest.raises(hp.ScheduleError, match=match):
        hp.Geometric(*args)


def test_geometric_zero_is_no_aggregation_and_a_huge_anderson_history_is_capped():
    """Geometric(0, γ) ≡ 0: plain KM — accepted with Anderson, no summable warning; Geometric(True, ·) refused;
    history_size far above n keeps at most n differences (was an 8 TB allocation for m = 1e6, n = 8)."""
    Q = torch.diag(torch.linspace(1, 10, 8, dtype=DT))
    x = torch.ones(8, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / 10, upper=lambda u, x: (u ** 2).sum(),
                         alpha=hp.Geometric(0.0, 0.5), acceleration=hp.Anderson(history_size=10 ** 6))
        u = s(torch.zeros(8, dtype=DT), x)
    assert rel_err(u, torch.linalg.solve(Q, x)) < 1e-9
    with pytest.raises(hp.ScheduleError):
        hp.Geometric(True, 0.9)
