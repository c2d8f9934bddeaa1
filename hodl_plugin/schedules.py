r"""Schedules: tiny pure objects ``schedule(k) -> float``.

The GKM iteration (SPEC §0) uses three sequences — the KM relaxation :math:`\beta_k`, the HODL
aggregation weight :math:`\alpha_k` and, in the inexact mode, the accuracies
:math:`\varepsilon_k, \delta_k`. Each is a :class:`Schedule`: callable on the step index, with the
asymptotic facts (limit, summability, monotonicity) the convergence conditions need, so that a
solver can reject a schedule outside those conditions before it runs.

Example:
    >>> from hodl_plugin.schedules import Polynomial
    >>> a = Polynomial(2e-4, 0.75)           # a_k = 2e-4 (k + 1)^{-0.75}   (ISGD "poly")
    >>> round(a(3), 9)
    7.0711e-05
    >>> a.limit, a.summable
    (0.0, False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ScheduleError

__all__ = [
    "Schedule",
    "Constant",
    "Polynomial",
    "Harmonic",
    "Log",
    "as_schedule",
    "check_relaxation",
    "check_aggregation",
    "check_accuracy",
]


class Schedule:
    """Base class: a sequence ``k -> value`` for ``k = 0, 1, 2, ...``.

    Subclasses define ``__call__`` and the properties below; they are used to validate the
    convergence conditions, never to run the iteration.
    """

    #: value of the sequence as ``k -> ∞``
    limit: float
    #: ``Σ_k value_k < ∞``
    summable: bool
    #: the sequence never increases
    nonincreasing: bool

    def __call__(self, k: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sup(self) -> float:
        """Largest value of the sequence (its first value for non-increasing sequences)."""
        return self(0)

    def values(self, n: int, start: int = 0) -> list[float]:
        """``[self(start), ..., self(start + n - 1)]`` as Python floats.

        >>> Constant(0.5).values(3)
        [0.5, 0.5, 0.5]
        """
        return [float(self(k)) for k in range(start, start + n)]


@dataclass(frozen=True)
class Constant(Schedule):
    """``value_k = c``.

    >>> Constant(1.0)(7)
    1.0
    """

    c: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.c):
            raise ScheduleError(f"Constant schedule needs a finite value, got {self.c!r}")

    def __call__(self, k: int) -> float:
        return float(self.c)

    @property
    def limit(self) -> float:  # type: ignore[override]
        return float(self.c)

    @property
    def summable(self) -> bool:  # type: ignore[override]
        return self.c == 0

    @property
    def nonincreasing(self) -> bool:  # type: ignore[override]
        return True


@dataclass(frozen=True)
class Polynomial(Schedule):
    """``value_k = c0 · (k + offset)^(-power)`` — ISGD's "poly" schedule (SPEC §3.4, T7).

    ``power`` in (0, 1] gives a sequence that tends to 0 and is not summable (the HODL aggregation
    condition); ``power > 1`` a summable one.

    >>> Polynomial(1.0, 1.0)(0), Polynomial(1.0, 1.0)(3)
    (1.0, 0.25)
    """

    c0: float
    power: float
    offset: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.c0) and math.isfinite(self.power)):
            raise ScheduleError("Polynomial schedule needs finite c0 and power")
        if self.power < 0:
            raise ScheduleError(f"Polynomial schedule needs power >= 0, got {self.power}")
        if self.offset <= 0:
            raise ScheduleError(f"Polynomial schedule needs offset > 0, got {self.offset}")

    def __call__(self, k: int) -> float:
        return float(self.c0) * (k + self.offset) ** (-self.power)

    @property
    def limit(self) -> float:  # type: ignore[override]
        return float(self.c0) if self.power == 0 else 0.0

    @property
    def summable(self) -> bool:  # type: ignore[override]
        return self.c0 == 0 or self.power > 1

    @property
    def nonincreasing(self) -> bool:  # type: ignore[override]
        return self.c0 >= 0


def Harmonic(c0: float = 1.0) -> Polynomial:
    """``value_k = c0 / (k + 1)`` — the BDA / HODL aggregation weight of SPEC T5.

    >>> Harmonic(0.5)(1)
    0.25
    """
    return Polynomial(c0, 1.0)


@dataclass(frozen=True)
class Log(Schedule):
    """``value_k = c0 / log(k + e)^power`` — ISGD's "log" schedule, equal to ``c0`` at ``k = 0``.

    >>> Log(1.0, 1.0)(0)
    1.0
    """

    c0: float
    power: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.c0) and math.isfinite(self.power)) or self.power < 0:
            raise ScheduleError("Log schedule needs finite c0 and power >= 0")

    def __call__(self, k: int) -> float:
        return float(self.c0) / math.log(k + math.e) ** self.power

    @property
    def limit(self) -> float:  # type: ignore[override]
        return float(self.c0) if self.power == 0 else 0.0

    @property
    def summable(self) -> bool:  # type: ignore[override]
        return self.c0 == 0

    @property
    def nonincreasing(self) -> bool:  # type: ignore[override]
        return self.c0 >= 0


def as_schedule(value: float | Schedule, name: str = "schedule") -> Schedule:
    """Turn a number into a :class:`Constant`; pass schedules through.

    >>> as_schedule(0.5)
    Constant(c=0.5)
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{name} must be a number or a Schedule, got {type(value).__name__}")
    return Constant(float(value))


def check_relaxation(beta: Schedule) -> list[str]:
    r"""Problems of a KM relaxation schedule: :math:`\beta_k \in (0, 1]`, bounded away from 0.

    >>> check_relaxation(Constant(1.0))
    []
    >>> check_relaxation(Harmonic(1.0))
    ['beta_k must stay bounded away from 0 (its limit is 0.0): a vanishing KM relaxation stalls the iteration']
    """
    problems = []
    if not (0.0 < beta.sup <= 1.0) or beta(0) <= 0:
        problems.append(f"beta_k must lie in (0, 1], got beta_0 = {beta(0)} (sup {beta.sup})")
    if beta.limit <= 0:
        problems.append(
            f"beta_k must stay bounded away from 0 (its limit is {beta.limit}): "
            "a vanishing KM relaxation stalls the iteration"
        )
    return problems


def check_aggregation(alpha: Schedule) -> list[str]:
    r"""Problems of a HODL aggregation schedule: :math:`\alpha_k \in [0,1]`, non-increasing,
    :math:`\alpha_k \to 0` and :math:`\sum_k \alpha_k = \infty` (SPEC §0).

    >>> check_aggregation(Harmonic(1.0))
    []
    >>> check_aggregation(Constant(0.0))   # alpha ≡ 0 switches the aggregation off
    []
    >>> print(check_aggregation(Polynomial(1.0, 2.0))[0])  # doctest: +NORMALIZE_WHITESPACE
    sum of alpha_k must diverge for the aggregation to select the upper-optimal fixed point
    (power 2.0 > 1 makes it summable)
    """
    if isinstance(alpha, Constant) and alpha.c == 0:
        return []  # alpha ≡ 0: no aggregation, plain KM (SPEC §0)
    problems = []
    if not (0.0 <= alpha(0) <= 1.0) or not (0.0 <= alpha.sup <= 1.0):
        problems.append(f"alpha_k must lie in [0, 1], got alpha_0 = {alpha(0)}")
    if not alpha.nonincreasing:
        problems.append("alpha_k must be non-increasing")
    if alpha.limit != 0:
        problems.append(
            f"alpha_k must decrease to 0 (its limit is {alpha.limit}): with a weight that does not "
            "vanish the iteration converges to a point that is not a fixed point of T"
        )
    elif alpha.summable:
        extra = f" (power {alpha.power} > 1 makes it summable)" if isinstance(alpha, Polynomial) else ""
        problems.append(
            "sum of alpha_k must diverge for the aggregation to select the upper-optimal fixed "
            f"point{extra}"
        )
    return problems


def check_accuracy(eps: Schedule, name: str = "eps") -> list[str]:
    r"""Problems of an accuracy schedule :math:`\varepsilon_k > 0`, non-increasing (ISGD §3.3).

    >>> check_accuracy(Polynomial(1e-2, 0.5))
    []
    """
    problems = []
    if eps(0) <= 0:
        problems.append(f"{name}_k must be positive, got {name}_0 = {eps(0)}")
    if not eps.nonincreasing:
        problems.append(f"{name}_k must be non-increasing")
    return problems
