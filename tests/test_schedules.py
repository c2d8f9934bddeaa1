"""Schedules: exact values (SPEC T7) and the convergence-condition checks."""

from __future__ import annotations

import math

import pytest

import hodl_plugin as hp
from hodl_plugin import schedules as S


def test_isgd_poly_values_T7():
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
