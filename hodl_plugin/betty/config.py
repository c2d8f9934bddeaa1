"""The node config: Betty's ``Config`` plus the GKM solver's and our hypergradients' options."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from ..errors import HODLError
from ..hypergrad import FirstOrder, HypergradMethod, Implicit, Inexact, Truncated, Unrolled
from ..schedules import Schedule
from ._betty import Config as _BettyConfig

__all__ = ["GKM_METHODS", "IMPLICIT_METHODS", "HODLConfig", "as_config"]

#: Config types of GKM nodes and the core method each selects
GKM_METHODS = ("gkm_implicit", "gkm_unrolled", "gkm_truncated", "gkm_inexact", "gkm_first_order")
#: Config types of our methods for Betty's argmin ``ImplicitProblem`` nodes
IMPLICIT_METHODS = ("implicit_cg", "implicit_gmres")
_ON_NONCONVERGENCE = ("warn", "raise", "ignore")


@dataclasses.dataclass
class HODLConfig(_BettyConfig):
    """Betty's ``Config`` plus the options of the GKM solver and of our hypergradient methods.

    Usable for every node (it *is* a Betty ``Config``). ``type`` selects the hypergradient of the
    edge from this node to its upper node: one of :data:`GKM_METHODS` for a :class:`GKMProblem`,
    one of :data:`IMPLICIT_METHODS` (or Betty's own names) for an argmin ``ImplicitProblem``.

    >>> cfg = HODLConfig(type="gkm_inexact", eps=1e-3, max_steps=500, log_step=10)
    >>> _method_for(cfg)
    Inexact(eps=Constant(c=0.001), delta=Constant(c=0.001), k=0)
    """

    type: str = "gkm_implicit"
    # the lower GKM solve (see hodl_plugin.GKMSolver); tol/rtol are not used by gkm_inexact, whose forward
    # stops at its accuracy eps_k (set eps, or method=hp.Inexact(eps=...))
    max_steps: int = 1000
    tol: float = 1e-8
    rtol: float = 0.0
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
    warm_start: bool = True  # start each solve from the last iterate (per sample with sample_keys)
    # hypergradients
    linear_solver: Optional[str] = None  # None: CG for GradientStep operators, else GMRES
    adjoint_rtol: float = 1e-10
    adjoint_atol: float = 0.0
    adjoint_maxiter: int = 1000
    on_fail: str = "raise"
    truncate: int = 10
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
        if self.on_nonconvergence not in _ON_NONCONVERGENCE:
            raise ValueError(
                f"HODLConfig(on_nonconvergence=...) must be one of {list(_ON_NONCONVERGENCE)}, "
                f"got {self.on_nonconvergence!r}"
            )
        if self.aggregation not in ("inside", "outside"):
            raise ValueError(f"HODLConfig(aggregation=...) must be 'inside' or 'outside', got {self.aggregation!r}")
        if self.aggregate_upper is not None and not isinstance(self.aggregate_upper, str):
            raise TypeError(
                f"HODLConfig(aggregate_upper=...) must be the name of an upper node, got {self.aggregate_upper!r}"
            )
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"HODLConfig(warm_start=...) must be a bool, got {self.warm_start!r}")
        from ..acceleration import Accelerator

        if self.acceleration is not None and not isinstance(self.acceleration, Accelerator):
            raise TypeError(
                "HODLConfig(acceleration=...) must be None or hodl_plugin.Anderson(history_size=m) (or "
                "another hodl_plugin.acceleration.Accelerator, e.g. hodl_plugin.Broyden()), got "
                f"{type(self.acceleration).__name__}"
            )


def as_config(config: Any, node: str = "GKMProblem") -> Any:
    """A node's config from ``None`` (defaults), a Betty ``Config`` (e.g. :class:`HODLConfig`) or a dict.

    A dict becomes ``HODLConfig(**config)``; an unknown key is a ``TypeError`` that names it.

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


#: the HODLConfig fields that build a method object: with ``method=`` given they must stay at their defaults
_METHOD_OPTIONS = ("linear_solver", "adjoint_rtol", "adjoint_atol", "adjoint_maxiter", "on_fail", "truncate", "eps",
                   "delta")

_METHOD_CLASSES = {
    "gkm_implicit": Implicit, "gkm_unrolled": Unrolled, "gkm_truncated": Truncated, "gkm_inexact": Inexact,
    "gkm_first_order": FirstOrder,
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
            adjoint_rtol=_cfg(config, "adjoint_rtol", 1e-10),
            adjoint_atol=_cfg(config, "adjoint_atol", 0.0),
            adjoint_maxiter=_cfg(config, "adjoint_maxiter", 1000),
            on_fail=_cfg(config, "on_fail", "raise"),
        )
    if kind == "gkm_unrolled":
        return Unrolled()
    if kind == "gkm_truncated":
        return Truncated(_cfg(config, "truncate", 10))
    if kind == "gkm_first_order":
        return FirstOrder()
    if kind == "gkm_inexact":
        return Inexact(
            eps=_cfg(config, "eps", 1e-4),
            delta=_cfg(config, "delta", None),
            solver=_cfg(config, "linear_solver", None),
            adjoint_maxiter=_cfg(config, "adjoint_maxiter", 1000),
            on_fail="warn" if _cfg(config, "on_fail", "raise") == "warn" else "raise",
        )
    raise HODLError(
        f"a GKMProblem needs Config(type=...) in {list(GKM_METHODS)}, got {kind!r}: the edge from a GKM "
        "node to its upper node is differentiated by one of hodl_plugin's GKM methods"
    )
