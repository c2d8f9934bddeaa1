r"""Schedules: tiny pure objects ``schedule(k) -> float``.

The GKM iteration (HODL's scheme, see the math page) uses three sequences — the KM relaxation :math:`\beta_k`, the HODL
aggregation weight :math:`\alpha_k` and, in the inexact mode, the accuracies
:math:`\varepsilon_k, \delta_k`. Each is a :class:`Schedule`: callable on the step index, with the
asymptotic facts (limit, summability, monotonicity) the convergence conditions need, so that a
solver can reject a schedule outside those conditions before it runs (and warn, with
:class:`~hodl_plugin.errors.SummableScheduleWarning`, for a summable aggregation weight such as
:class:`Geometric`, accepted but outside the selection theory).

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
    "Geometric",
    "as_schedule",
    "check_relaxation",
    "check_aggregation",
    "summable_aggregation",
    "check_accuracy",
]


class Schedule:
    """Base class: a sequence ``k -> value`` for ``k = 0, 1, 2, ...``.

    Subclasses define ``__call__`` and the properties below (:attr:`limit`, :attr:`summable`,
    :attr:`nonincreasing`); the solver reads those properties to check the convergence conditions
    when it is built, and calls the schedule at each step. Any object of a subclass can be passed
    where a schedule is expected (``alpha=``, ``beta=``, ``eps=``, ``delta=``).

    Example:
        >>> from hodl_plugin.schedules import Schedule
        >>> class Halving(Schedule):                  # value_k = 2^-k
        ...     limit, summable, nonincreasing = 0.0, True, True
        ...     def __call__(self, k):
        ...         return 0.5 ** k
        >>> Halving().values(3)
        [1.0, 0.5, 0.25]
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

    Args:
        c: the value, a finite number.

    Raises:
        ScheduleError: ``c`` is not finite.

    Example:
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
    """``value_k = c0 · (k + offset)^(-power)`` — ISGD's "poly" schedule.

    ``power`` in (0, 1] gives a sequence that tends to 0 and is not summable (the HODL aggregation
    condition); ``power > 1`` a summable one.

    Args:
        c0: the scale (the value at ``k = 0`` when ``offset = 1``).
        power: the decay exponent, >= 0 (0 is a constant).
        offset: added to ``k`` before the power, > 0.

    Raises:
        ScheduleError: a value that is not finite, ``power < 0`` or ``offset <= 0``.

    Example:
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
    """``value_k = c0 / (k + 1)`` — the BDA / HODL aggregation weight.

    Args:
        c0: the first value.

    Returns:
        Polynomial: ``Polynomial(c0, 1.0)``, non-summable and vanishing.

    Raises:
        ScheduleError: ``c0`` is not finite.

    Example:
        >>> Harmonic(0.5)(1)
        0.25
    """
    return Polynomial(c0, 1.0)


@dataclass(frozen=True)
class Log(Schedule):
    """``value_k = c0 / log(k + e)^power`` — ISGD's "log" schedule, equal to ``c0`` at ``k = 0``.

    Args:
        c0: the first value.
        power: the exponent of the logarithm, >= 0.

    Raises:
        ScheduleError: a value that is not finite, or ``power < 0``.

    Example:
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


@dataclass(frozen=True)
class Geometric(Schedule):
    r"""``value_k = alpha0 · gamma^k`` (:math:`k = 0, 1, \dots`) — the BDA/BOAT aggregation weight.

    Summable (for ``gamma < 1``): outside HODL's selection theory, which needs
    :math:`\sum_k\alpha_k = \infty`; :class:`~hodl_plugin.GKMSolver` accepts it with a
    :class:`~hodl_plugin.errors.SummableScheduleWarning`. It is what the same group's codes run for
    a few unrolled steps (combined with ``aggregation="outside"``):

    - BOAT (``callous-youth/BOAT``, ``boat_torch/gm_ol/ngd.py`` with ``gda_loss``; configs
      ``"GDA": {"alpha_init": 0.5, "alpha_decay": 0.9}``): lower step ``k`` minimises
      :math:`\alpha_k F + (1-\alpha_k) f` by one gradient step, then ``alpha *= alpha_decay`` —
      i.e. ``Geometric(0.5, 0.9)``;
    - BDA (``vis-opt-group/BDA``, ``boml/lower_iter/aggr.py``): the upper gradient is weighted by
      :math:`\alpha\gamma\,0.9^{k}` (``0.9**(t_tensor-1)`` with ``t_tensor = k+1``), i.e.
      ``Geometric(alpha * gamma, 0.9)`` (the logged runs: :math:`\alpha = 0.6, \gamma = 1`, T = 5).
      BDA keeps the lower gradient's weight fixed at :math:`(1-\alpha)` where the outside form uses
      :math:`(1-\alpha_k)`: the two differ by :math:`\alpha_k (u_k - T(u_k))`, which vanishes on
      :math:`\mathrm{Fix}\,T` (fold :math:`(1-\alpha)` into the step of ``T`` to follow BDA's lower part).

    Args:
        alpha0: the first value, finite and >= 0 (the solver checks :math:`\alpha_0 \le 1`).
        gamma: the ratio, in (0, 1) (``gamma = 1`` is :class:`Constant`).

    Raises:
        ScheduleError: ``alpha0`` negative or not finite, ``gamma`` outside (0, 1).

    >>> a = Geometric(0.5, 0.9)
    >>> a.values(3), a.summable, a.limit
    ([0.5, 0.45, 0.405], True, 0.0)
    """

    alpha0: float
    gamma: float

    def __post_init__(self) -> None:
        if isinstance(self.alpha0, bool) or isinstance(self.gamma, bool):
            raise ScheduleError(f"Geometric schedule needs numbers, got alpha0={self.alpha0!r}, gamma={self.gamma!r}")
        if not (math.isfinite(self.alpha0) and self.alpha0 >= 0):
            raise ScheduleError(f"Geometric schedule needs a finite alpha0 >= 0, got {self.alpha0!r}")
        if not (math.isfinite(self.gamma) and 0 < self.gamma < 1):
            raise ScheduleError(
                f"Geometric schedule needs a ratio gamma in (0, 1), got {self.gamma!r} "
                "(use Constant(alpha0) for gamma = 1)"
            )

    def __call__(self, k: int) -> float:
        return float(self.alpha0) * float(self.gamma) ** k

    @property
    def limit(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def summable(self) -> bool:  # type: ignore[override]
        return True

    @property
    def nonincreasing(self) -> bool:  # type: ignore[override]
        return True


def is_zero(schedule: Schedule) -> bool:
    """Whether ``schedule`` is identically 0 (``Constant(0)``, ``Geometric(0, γ)``): no aggregation.

    >>> is_zero(Constant(0.0)), is_zero(Geometric(0.0, 0.9)), is_zero(Harmonic(1.0))
    (True, True, False)
    """
    return (isinstance(schedule, Constant) and schedule.c == 0) or (
        isinstance(schedule, Geometric) and schedule.alpha0 == 0
    )


def as_schedule(value: float | Schedule, name: str = "schedule") -> Schedule:
    """Turn a number into a :class:`Constant`; pass schedules through.

    Args:
        value: a number or a :class:`Schedule`.
        name: the option's name, for the error message.

    Returns:
        Schedule: ``value`` itself, or ``Constant(value)``.

    Raises:
        ScheduleError: ``value`` is neither a number nor a schedule (a bool is not a number here).

    Example:
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

    Args:
        beta: the relaxation schedule :math:`\beta_k`.

    Returns:
        list[str]: one sentence per violated condition; empty when the schedule is valid. (Nothing is
        raised here: :class:`~hodl_plugin.solver.GKMSolver` raises
        :class:`~hodl_plugin.errors.ScheduleError` with these sentences, or warns with ``strict=False``.)

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
    :math:`\alpha_k \to 0`. Summability is not a problem here but a warning
    (:func:`summable_aggregation`).

    Args:
        alpha: the aggregation schedule :math:`\alpha_k`.

    Returns:
        list[str]: one sentence per violated condition; empty when valid (the solver raises
        :class:`~hodl_plugin.errors.ScheduleError` with them).

    >>> check_aggregation(Harmonic(1.0))
    []
    >>> check_aggregation(Constant(0.0))   # alpha ≡ 0 switches the aggregation off
    []
    >>> check_aggregation(Geometric(0.5, 0.9))   # summable: accepted (with a warning by the solver)
    []
    >>> print(check_aggregation(Constant(0.5))[0])  # doctest: +ELLIPSIS
    alpha_k must decrease to 0 (its limit is 0.5): ...
    """
    if is_zero(alpha):
        return []  # alpha ≡ 0: no aggregation, plain KM
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
    return problems


def summable_aggregation(alpha: Schedule) -> str:
    r"""The warning text for a summable aggregation schedule (:math:`\sum_k \alpha_k < \infty`),
    or ``""`` when :math:`\sum_k \alpha_k = \infty` (or :math:`\alpha \equiv 0`, no aggregation).

    Args:
        alpha: the aggregation schedule.

    Returns:
        str: the text of the :class:`~hodl_plugin.errors.SummableScheduleWarning` the solver emits, or
        ``""``. Nothing is raised.

    >>> summable_aggregation(Harmonic(1.0))
    ''
    >>> print(summable_aggregation(Polynomial(1.0, 2.0)))  # doctest: +ELLIPSIS
    sum of alpha_k is finite (power 2.0 > 1 makes it summable): ... outside the selection theory ...
    """
    if is_zero(alpha) or not alpha.summable or alpha.limit != 0:
        return ""
    extra = f" (power {alpha.power} > 1 makes it summable)" if isinstance(alpha, Polynomial) else ""
    if isinstance(alpha, Geometric):
        extra = f" (Geometric: sum = {alpha.alpha0 / (1 - alpha.gamma):.4g})"
    return (
        f"sum of alpha_k is finite{extra}: accepted, but outside the selection theory of HODL "
        "(which needs sum alpha_k = inf to select the F-optimal fixed point of T); the iterates "
        "approach Fix T, not necessarily its F-optimal point. Use Harmonic/Polynomial(power <= 1) "
        "for the selection, or keep this (the BDA/BOAT codes' default for a few unrolled steps)"
    )


def check_accuracy(eps: Schedule, name: str = "eps") -> list[str]:
    r"""Problems of an accuracy schedule :math:`\varepsilon_k > 0`, non-increasing (as ISGD requires).

    Args:
        eps: the accuracy schedule (:math:`\varepsilon_k` or :math:`\delta_k` of the inexact mode).
        name: the option's name, for the sentences.

    Returns:
        list[str]: one sentence per violated condition; empty when valid
        (:class:`~hodl_plugin.hypergrad.Inexact` raises :class:`~hodl_plugin.errors.ScheduleError` with them).

    >>> check_accuracy(Polynomial(1e-2, 0.5))
    []
    """
    problems = []
    if eps(0) <= 0:
        problems.append(f"{name}_k must be positive, got {name}_0 = {eps(0)}")
    if not eps.nonincreasing:
        problems.append(f"{name}_k must be non-increasing")
    return problems
