"""The node config: Betty's ``Config`` plus the GKM solver's and our hypergradients' options."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Optional, Union

from ..errors import HODLError, UnusedOptionWarning
from ..finite_difference import FiniteDifference
from ..hypergrad import FirstOrder, HypergradMethod, Implicit, Inexact, Truncated, Unrolled
from ..iga import IGA
from ..ptt import PTT
from ..schedules import Schedule
from . import _fields
from ._betty import Config as _BettyConfig
from ._betty import hypergradient

__all__ = ["GKM_METHODS", "IMPLICIT_METHODS", "HODLConfig", "as_config"]

#: Config types of GKM nodes and the core method each selects
GKM_METHODS = ("gkm_implicit", "gkm_unrolled", "gkm_truncated", "gkm_inexact", "gkm_first_order", "gkm_ptt",
               "gkm_fd", "gkm_iga")
#: Config types of our methods for Betty's argmin ``ImplicitProblem`` nodes
IMPLICIT_METHODS = ("implicit_cg", "implicit_gmres")
_ON_NONCONVERGENCE = ("warn", "raise", "ignore")


@dataclasses.dataclass
class HODLConfig(_BettyConfig):
    r"""Betty's ``Config`` plus the options of the GKM solver and of our hypergradient methods.

    Usable for every node (it *is* a Betty ``Config``). ``type`` selects the hypergradient of the
    edge from this node to its upper node: one of :data:`GKM_METHODS` for a :class:`GKMProblem`,
    one of :data:`IMPLICIT_METHODS` (or Betty's own names) for an argmin ``ImplicitProblem``.

    The tolerances mean what they mean in the core, with the same dtype-aware defaults, so a problem
    gets the same accuracy through a Betty graph as through ``hp.GKMSolver``:

    - ``tol`` (relative) and ``atol`` (absolute): the lower solve stops when
      :math:`\|T(u) - u\| \le \max(\mathrm{tol}\,\|u\|, \mathrm{atol})`. ``tol=None`` (default) is
      :func:`hodl_plugin.gkm.default_tol` of the solution's dtype (1e-10 in float64, 1e-5 in float32);
      ``tol=0`` (with ``atol=0``) runs exactly ``max_steps`` steps. Not used by ``gkm_inexact``, whose
      forward stops at its accuracy :math:`\varepsilon_k` (``eps``): giving them with it warns.
    - ``adjoint_rtol=None`` (default) is ``hodl_plugin.hypergrad.default_adjoint_rtol`` of the dtype
      (1e-10 in float64, 1.2e-5 in float32), as ``hp.Implicit()``; ``adjoint_atol`` is absolute.
      ``on_fail=None`` (default) is the method's own: ``gkm_implicit`` raises a ``LinearSolveError`` when
      the adjoint misses its tolerance, ``gkm_inexact`` warns (its adjoint stops at δ_k), as in the core.
    - ``warm_start=True`` (default) is the one deliberate difference from the core, whose
      ``GKMSolver`` starts where it is told: each Betty step's solve starts from the node's previous
      solution (per sample with ``sample_keys``), because consecutive steps solve nearby problems. It
      changes the number of steps, not the accuracy: a warm and a cold solve stop by the same test,
      measured at the returned :math:`u`, so their results differ by less than that tolerance.
      ``warm_start=False`` starts every solve from ``initial_state`` (as the core does from its ``u0``).

    Every field is checked at construction: a value of the wrong Python type (``max_steps="1000"``,
    ``tol="1e-8"``, ``warm_start=1``) is a ``TypeError``, an out-of-range one (``max_steps=0``,
    ``on_fail="rasie"``) a ``ValueError``; both name the field. ``rtol`` was removed: ``tol`` is
    relative, ``atol`` absolute.

    Attributes:
        type: the hypergradient of the edge to the upper node (above); default ``"gkm_implicit"``.
        max_steps: :math:`K`, the most GKM steps of a lower solve.
        tol, atol: the stopping test of the lower solve (above; :ref:`math-stopping`).
        beta: the KM relaxation :math:`\beta_k` (a number or a schedule).
        alpha: HODL's aggregation weights :math:`\alpha_k` (:ref:`math-gkm`); ``None``: no aggregation.
            :math:`F` is the upper node's ``training_step`` (or the node's ``upper_objective``).
        upper_step: :math:`s`, the step of the upper descent direction.
        aggregation: ``"inside"`` :math:`T(u - \alpha s\nabla F(u))` or ``"outside"``
            :math:`(1-\alpha)T(u) + \alpha(u - s\nabla F(u))` (:ref:`math-aggregation`).
        aggregate_upper: the name of the upper node whose ``training_step`` is :math:`F`, when there
            are several.
        check_every: steps between residual checks.
        on_divergence: ``"raise"`` or ``"warn"`` (as in :class:`~hodl_plugin.GKMSolver`).
        warm_start: start each solve from the node's previous solution (above).
        linear_solver: the adjoint solver's name; ``None``: CG for a symmetric Jacobian, else GMRES.
        adjoint_rtol, adjoint_atol, adjoint_maxiter: the adjoint solve's stopping rule.
        on_fail: ``"raise"``, ``"warn"``, or ``None`` (the method's own default).
        truncate: the differentiated steps of ``gkm_truncated``.
        fd_radius: :math:`r` of ``gkm_fd``'s central difference.
        eps, delta: the accuracies :math:`\varepsilon_k`, :math:`\delta_k` of ``gkm_inexact``
            (:ref:`math-inexact`).
        method: a hodl_plugin method object of the kind ``type`` names, used as is (then the
            method's own options above must stay at their defaults).
        acceleration: the lower solve's forward accelerator (:class:`~hodl_plugin.acceleration.Anderson`,
            :class:`~hodl_plugin.acceleration.Broyden`).
        on_nonconvergence: a lower solve that stops before its tolerance: ``"warn"`` (a
            ``ConvergenceWarning`` naming the node), ``"raise"`` (a
            :class:`~hodl_plugin.errors.HODLError`) or ``"ignore"``.

    The fields of Betty's ``Config`` (``unroll_steps``, ``log_step``, ``precision``, ...) keep their
    meaning and are checked too.

    Raises:
        TypeError: a field of the wrong type, or a removed field (``rtol``).
        ValueError: a field out of range.
        UnusedOptionWarning: (a warning) ``tol`` / ``atol`` with ``type="gkm_inexact"``.

    >>> cfg = HODLConfig(type="gkm_inexact", eps=1e-3, max_steps=500, log_step=10)
    >>> _method_for(cfg)
    Inexact(eps=Constant(c=0.001), delta=Constant(c=0.001), k=0)
    >>> HODLConfig(max_steps="1000")
    Traceback (most recent call last):
    ...
    TypeError: HODLConfig(max_steps=...) must be an int >= 1, got '1000' (str)
    """

    type: str = "gkm_implicit"
    # the lower GKM solve (see hodl_plugin.GKMSolver): stop when ||T(u) - u|| <= max(tol·||u||, atol) at the
    # returned u; tol=None: the dtype's default (hodl_plugin.gkm.default_tol). Not used by gkm_inexact, whose
    # forward stops at its accuracy eps_k (set eps, or method=hp.Inexact(eps=...))
    max_steps: int = 1000
    tol: Optional[float] = None
    atol: float = 0.0
    beta: Union[float, Schedule] = 1.0
    # HODL aggregation u_{k+1} = T(u_k - α_k s ∇_u F(u_k)): on when ``alpha`` is set (F: the upper node's
    # own training_step, or the node's upper_objective if it defines one, then α defaults to Harmonic(1.0))
    alpha: Union[float, Schedule, None] = None
    upper_step: float = 1.0
    # where the upper step enters: "inside" T(u - α s∇F(u)) or "outside" (1-α)T(u) + α(u - s∇F(u)) (BDA/BOAT)
    aggregation: str = "inside"
    aggregate_upper: Optional[str] = None  # which upper node's training_step is F, when there are several
    check_every: int = 10
    on_divergence: str = "raise"
    # start each solve from the last solution (per sample with sample_keys); the core does not (docstring)
    warm_start: bool = True
    # hypergradients
    linear_solver: Optional[str] = None  # None: CG for GradientStep operators, else GMRES
    adjoint_rtol: Optional[float] = None  # None: the dtype's default (hodl_plugin.hypergrad.default_adjoint_rtol)
    adjoint_atol: float = 0.0
    adjoint_maxiter: int = 1000
    on_fail: Optional[str] = None  # None: the method's own default, as in the core (implicit raises, inexact warns)
    truncate: int = 10
    # gkm_fd: r, the length ε·||ū|| of the central difference's perturbation (DARTS's 0.01)
    fd_radius: float = 0.01
    eps: Union[float, Schedule] = 1e-4
    delta: Union[float, Schedule, None] = None
    # a hodl_plugin method object of the kind ``type`` names, used as is (options HODLConfig does not
    # spell, e.g. hp.Inexact(eps=Polynomial(1e-2, 0.5), relative=False, constants=None): ISGD's absolute
    # decaying accuracies); it then holds the counters and warm starts of this node's solver
    method: Optional[HypergradMethod] = None
    # forward acceleration of the lower solve (GKMSolver(acceleration=...), e.g. hp.Anderson(5))
    acceleration: Any = None
    # a lower solve that stops before its tolerance: "warn" (ConvergenceWarning naming the node),
    # "raise" (hodl_plugin.errors.HODLError) or "ignore"
    on_nonconvergence: str = "warn"

    def __post_init__(self) -> None:
        checks = _field_checks()
        for f in dataclasses.fields(self):
            check = checks.get(f.name)
            if check is not None:
                setattr(self, f.name, check(f.name, getattr(self, f.name)))
        if self.type == "gkm_inexact" and self.method is None and (self.tol is not None or self.atol != 0):
            warnings.warn(
                "HODLConfig(tol=/atol=...) is not used with type='gkm_inexact': its forward stops at the "
                "accuracy eps_k of each step (and the adjoint at delta_k); set eps=... (and delta=...) instead",
                UnusedOptionWarning, stacklevel=3,
            )


#: fields that HODLConfig no longer has, and what replaces them (said by the TypeError that refuses them)
_REMOVED = {
    "rtol": "HODLConfig(rtol=...) was removed: tol is the relative tolerance (the lower solve stops when "
            "||T(u) - u|| <= max(tol·||u||, atol)) and atol the absolute one; pass tol=... (and atol=...)",
}

_dataclass_init = HODLConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: HODLConfig, *args: Any, **kwargs: Any) -> None:
    for key, msg in _REMOVED.items():
        if key in kwargs:
            raise TypeError(msg)
    _dataclass_init(self, *args, **kwargs)


HODLConfig.__init__ = _init  # type: ignore[method-assign]


def _betty_types() -> list[str]:
    """The hypergradient names Betty's registry knows now (its own, ours, any a user registered)."""
    return sorted(set(hypergradient.jvp_fn_mapping) | set(GKM_METHODS) | set(IMPLICIT_METHODS))


def _type_check(name: str, value: Any) -> str:
    return _fields.choice(*_betty_types())(name, value)


def _field_checks() -> dict[str, _fields.Check]:
    """The check of every field, by name: HODLConfig's own and Betty's ``Config``'s (those it has)."""
    from ..acceleration import Accelerator

    return {
        # Betty's Config
        "type": _type_check,
        "unroll_steps": _fields.count(1),
        "first_order": _fields.flag,
        "retain_graph": _fields.flag,
        "allow_unused": _fields.flag,
        "gradient_accumulation": _fields.count(1),
        "gradient_clipping": _fields.real(minimum=0.0),
        "precision": _fields.choice("fp32", "fp16", "bf16"),
        "initial_dynamic_scale": _fields.real(positive=True),
        "scale_factor": _fields.real(positive=True),
        "warmup_steps": _fields.count(0),
        "log_step": _fields.count(None),
        "log_local_step": _fields.flag,
        "darts_alpha": _fields.real(),
        "darts_multitask": _fields.flag,
        "sama_adam_alpha": _fields.real(),
        "sama_multitask": _fields.flag,
        "neumann_iterations": _fields.count(0),
        "neumann_alpha": _fields.real(),
        "cg_iterations": _fields.count(0),
        "cg_alpha": _fields.real(),
        # ours
        "max_steps": _fields.count(1),
        "tol": _fields.real(minimum=0.0, optional=True),
        "atol": _fields.real(minimum=0.0),
        "beta": _fields.schedule(),
        "alpha": _fields.schedule(optional=True),
        "upper_step": _fields.real(positive=True),
        "aggregation": _fields.choice("inside", "outside"),
        "aggregate_upper": _fields.name_or_none,
        "check_every": _fields.count(1),
        "on_divergence": _fields.choice("raise", "warn"),
        "warm_start": _fields.flag,
        "linear_solver": _fields.linear_solver,
        "adjoint_rtol": _fields.real(minimum=0.0, optional=True),
        "adjoint_atol": _fields.real(minimum=0.0),
        "adjoint_maxiter": _fields.count(1),
        "on_fail": _fields.choice("raise", "warn", optional=True),
        "truncate": _fields.count(1),
        "fd_radius": _fields.real(positive=True),
        "eps": _fields.schedule(),
        "delta": _fields.schedule(optional=True),
        "method": _fields.instance_of(HypergradMethod, "a hodl_plugin method object (e.g. hp.Implicit(...))"),
        "acceleration": _fields.instance_of(
            Accelerator, "hodl_plugin.Anderson(history_size=m), hodl_plugin.Broyden() or another accelerator"),
        "on_nonconvergence": _fields.choice(*_ON_NONCONVERGENCE),
    }


def as_config(config: Any, node: str = "GKMProblem") -> Any:
    """A node's config from ``None`` (defaults), a Betty ``Config`` (e.g. :class:`HODLConfig`) or a dict.

    A dict becomes ``HODLConfig(**config)``; an unknown key is a ``TypeError`` that names it.

    Args:
        config: ``None``, a Betty ``Config`` (returned as is) or a dict of :class:`HODLConfig` fields.
        node: the node's name, for the messages.

    Returns:
        The config object.

    Raises:
        TypeError: an unknown or removed key, or a ``config`` of another type.

    >>> as_config({"type": "gkm_unrolled", "max_steps": 50}).max_steps
    50
    >>> as_config({"tolerance": 1e-9})
    Traceback (most recent call last):
    ...
    TypeError: GKMProblem: config dict has unknown key(s) ['tolerance']; HODLConfig takes e.g. 'tol', 'max_steps'
    """
    if config is None:
        return HODLConfig()
    if isinstance(config, _BettyConfig):
        return config
    if isinstance(config, dict):
        for key, msg in _REMOVED.items():
            if key in config:
                raise TypeError(f"{node}: {msg}")
        fields = {f.name for f in dataclasses.fields(HODLConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TypeError(
                f"{node}: config dict has unknown key(s) {unknown}; HODLConfig takes e.g. 'tol', 'max_steps'"
            )
        return HODLConfig(**config)
    raise TypeError(f"{node}: config must be a HODLConfig, a Betty Config or a dict, got {type(config).__name__}")


def _cfg(config: Any, name: str, default: Any) -> Any:
    return getattr(config, name, default)


def _given(config: Any, *names: str) -> dict[str, Any]:
    """The options among ``names`` that the config sets (not None): the others keep the core's defaults."""
    return {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}


#: the HODLConfig fields that build a method object: with ``method=`` given they must stay at their defaults
_METHOD_OPTIONS = ("linear_solver", "adjoint_rtol", "adjoint_atol", "adjoint_maxiter", "on_fail", "truncate", "eps",
                   "delta", "fd_radius")

_METHOD_CLASSES = {
    "gkm_implicit": Implicit, "gkm_unrolled": Unrolled, "gkm_truncated": Truncated, "gkm_inexact": Inexact,
    "gkm_first_order": FirstOrder, "gkm_ptt": PTT, "gkm_fd": FiniteDifference, "gkm_iga": IGA,
}


def _method_for(config: Any) -> HypergradMethod:
    """The method object of a GKM node's config: ``config.method`` as given, else built from the options.

    >>> from hodl_plugin.schedules import Polynomial
    >>> m = Inexact(eps=Polynomial(1e-2, 0.5), relative=False, constants=None)
    >>> _method_for(HODLConfig(type="gkm_inexact", method=m)) is m
    True
    >>> _method_for(HODLConfig(type="gkm_implicit", method=m))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hodl_plugin.errors.HODLError: HODLConfig(method=Inexact(...)) is not of the kind ...: pass type='gkm_inexact'
    >>> _method_for(HODLConfig(type="gkm_inexact", method=m, eps=1e-3))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hodl_plugin.errors.HODLError: HODLConfig(method=...) and ['eps'] given: ...
    """
    kind = config.type
    given = _cfg(config, "method", None)
    if given is not None:
        if kind not in _METHOD_CLASSES:
            raise HODLError(f"HODLConfig(method=...) is for GKM nodes; type={kind!r} is not one of {list(GKM_METHODS)}")
        if not isinstance(given, _METHOD_CLASSES[kind]):
            right = [k for k, c in _METHOD_CLASSES.items() if isinstance(given, c)]
            fix = f"pass type={right[0]!r}" if right else "pass a hodl_plugin method object"
            raise HODLError(
                f"HODLConfig(method={type(given).__name__}(...)) is not of the kind type={kind!r} names "
                f"({_METHOD_CLASSES[kind].__name__}): {fix}"
            )
        if isinstance(config, HODLConfig):
            defaults = {f.name: f.default for f in dataclasses.fields(HODLConfig)}
            clash = [k for k in _METHOD_OPTIONS if getattr(config, k) != defaults[k]]
            if clash:
                raise HODLError(
                    f"HODLConfig(method=...) and {clash} given: the method object carries its own options and "
                    f"these would be ignored; set them on the {type(given).__name__}(...) instead"
                )
        return given
    if kind == "gkm_implicit":
        return Implicit(
            solver=_cfg(config, "linear_solver", None),
            adjoint_rtol=_cfg(config, "adjoint_rtol", None),
            adjoint_atol=_cfg(config, "adjoint_atol", 0.0),
            adjoint_maxiter=_cfg(config, "adjoint_maxiter", 1000),
            **_given(config, "on_fail"),
        )
    if kind == "gkm_unrolled":
        return Unrolled()
    if kind == "gkm_truncated":
        return Truncated(_cfg(config, "truncate", 10))
    if kind == "gkm_first_order":
        return FirstOrder()
    if kind == "gkm_ptt":
        return PTT()
    if kind == "gkm_fd":
        return FiniteDifference(radius=_cfg(config, "fd_radius", 0.01))
    if kind == "gkm_iga":
        return IGA()
    if kind == "gkm_inexact":
        return Inexact(
            eps=_cfg(config, "eps", 1e-4),
            delta=_cfg(config, "delta", None),
            solver=_cfg(config, "linear_solver", None),
            adjoint_maxiter=_cfg(config, "adjoint_maxiter", 1000),
            **_given(config, "on_fail"),
        )
    raise HODLError(
        f"a GKMProblem needs Config(type=...) in {list(GKM_METHODS)}, got {kind!r}: the edge from a GKM "
        "node to its upper node is differentiated by one of hodl_plugin's GKM methods"
    )
