r"""Hypergradient methods: how :math:`\nabla_x F(u^*(x); x)` flows through the lower solve.

A method is an object with one small protocol, ``method.run(iteration, u0, params, info, key) -> u``:
it runs the GKM iteration (:class:`~hodl_plugin.gkm.GKMIteration`) and returns a tensor whose autograd
graph carries its hypergradient. Pass one to ``GKMSolver(..., hypergrad=method)`` or use its name.

``"unrolled"`` (:class:`Unrolled`)
    exact derivative of the K-step map :math:`u_K(x)`; memory grows with K.
``"truncated"`` (:class:`Truncated`)
    back-propagation through the last k steps only; memory grows with k.
``"implicit"`` (:class:`~hodl_plugin.implicit.Implicit`)
    :math:`\nabla_x F + J_x^\top v` with :math:`(I-J_u)^\top v = \nabla_u F` at :math:`u^*`;
    memory flat in K.
``"inexact"`` (:class:`~hodl_plugin.inexact.Inexact`)
    implicit, forward to :math:`\varepsilon_k`, adjoint to :math:`\delta_k`, warm starts, error
    bound; memory flat in K.
``"first_order"`` (:class:`FirstOrder`)
    :math:`\nabla_x F + J_x^\top\nabla_u F` (Jacobian-free: the implicit term is dropped); memory
    flat in K.
``"ptt"`` (:class:`~hodl_plugin.ptt.PTT`)
    IAPTT-GM's pessimistic trajectory truncation: back-propagation to the iterate :math:`u_{k^*}` with
    the largest F; memory grows with :math:`k^*`.
``"fd"`` (:class:`~hodl_plugin.finite_difference.FiniteDifference`)
    DARTS: one unrolled step, its mixed second derivative by a central difference of f; memory flat in K.
``"iga"`` (:class:`~hodl_plugin.iga.IGA`)
    Gauss–Newton implicit gradient approximation :math:`\nabla_x F - \lambda\nabla_x f`; memory flat in K.

with :math:`J_u = \partial_u T(u^*; x)` and :math:`J_x = \partial_x T(u^*; x)`
(:ref:`choosing a mode <math-choosing>` compares them).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor

from ._capture import detached
from .linear_solve import default_rtol as default_adjoint_rtol

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration, SolverInfo

__all__ = ["HypergradMethod", "Unrolled", "Truncated", "FirstOrder", "get_method", "default_adjoint_rtol"]


class HypergradMethod:
    """Protocol of a hypergradient method (see the module docstring).

    A method runs the iteration ``it`` (its options, ``max_steps`` included, are the iteration's)
    from ``u0`` and returns a tensor whose autograd graph carries its hypergradient; stateful methods
    also implement ``state_dict``/``load_state_dict`` (saved with the solver's ``state_dict``).

    Example — a method that back-propagates through the last step only:

    >>> import torch, hodl_plugin as hp
    >>> class LastStep(hp.HypergradMethod):
    ...     name = "last_step"
    ...     def run(self, it, u0, params, info, key=None):
    ...         with torch.no_grad():
    ...             u = it.run(u0, [p.detach() for p in params], info, num_steps=it.max_steps - 1, stop=False)
    ...         return it.run(u, params, info, start=info.steps, num_steps=1, stop=False)
    >>> x = torch.ones(2, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=LastStep())(torch.zeros(2), x).sum().backward()
    >>> x.grad
    tensor([1., 1.])
    """

    name: str = "?"
    #: whether the returned tensor carries the derivative w.r.t. ``u0`` (a learned initialisation,
    #: :class:`~hodl_plugin.LearnedInit`)
    differentiates_start: bool = False
    #: whether the method needs the GKM iterates themselves (it differentiates the trajectory, or
    #: evaluates its rule at the K-th iterate), not only the fixed point: ``forward="krylov"``, which
    #: computes the fixed point without them, is then refused
    needs_gkm_iterates: bool = False

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        raise NotImplementedError

    def validate(self, it: GKMIteration) -> None:
        """Raise ``ValueError`` if the method cannot run with the iteration's options."""

    def bind(self, owner: object) -> None:
        """Called by the solver that uses this method (stateful methods refuse a second one)."""

    def state_dict(self) -> dict[str, Any]:
        """Counters and warm starts (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a stateless method refuses another method's state)."""
        if state:
            raise ValueError(
                f"the {self.name} method holds no state, but the state of a {state.get('method', '?')!r} method was "
                "given: load it into a solver with that hypergrad"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Unrolled(HypergradMethod):
    r"""Back-propagation through all K GKM steps (HODL/BMO's choice; :ref:`what it differentiates <math-unrolled>`).

    Differentiates exactly the map :math:`x \mapsto u_k(x)` that produced the returned iterate,
    aggregation included; memory grows linearly with K (autograd keeps every step).

    >>> import torch, hodl_plugin as hp
    >>> x = torch.ones(1, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, max_steps=2, tol=0.0, hypergrad=Unrolled())(
    ...     torch.zeros(1), x).backward()
    >>> x.grad                                   # u_2 = 1.5 x
    tensor([1.5000])
    """

    name = "unrolled"
    differentiates_start = True
    needs_gkm_iterates = True

    def run(self, it, u0, params, info, key=None):
        return it.run(u0, params, info)


class Truncated(HypergradMethod):
    r"""Back-propagation through the last ``steps`` GKM steps only (the earlier ones run without
    autograd); memory grows with ``steps``, not with K.

    The returned :math:`u_K` carries the derivative of :math:`u_K` w.r.t. :math:`x` with
    :math:`u_{K-k}` held fixed (:ref:`the modes compared <math-choosing>`); for a contraction this is the implicit
    hypergradient's Neumann series cut after :math:`k` terms.

    Args:
        steps: :math:`k`, the number of differentiated last steps (an integer >= 1, at most
            ``max_steps``).

    Raises:
        ValueError: ``steps`` is not an integer >= 1; or (when the solver is built) it exceeds
            ``max_steps``.

    Example — :math:`T(u; x) = \tfrac12 u + x`, 50 steps, the last two differentiated:
    :math:`\partial u_{50}/\partial x = 1 + \tfrac12` (the exact :math:`\mathrm{d}u^*/\mathrm{d}x` is 2):

    >>> import torch, hodl_plugin as hp
    >>> x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    >>> solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, max_steps=50, tol=0.0, hypergrad=Truncated(2))
    >>> solver(torch.zeros(1, dtype=torch.float64), x).backward()
    >>> x.grad
    tensor([1.5000], dtype=torch.float64)
    >>> Truncated(5)
    Truncated(steps=5)
    """

    name = "truncated"
    needs_gkm_iterates = True

    def __init__(self, steps: int = 10) -> None:
        from .gkm import validate_count

        self.steps = validate_count(steps, "Truncated(steps=...)")

    def validate(self, it: GKMIteration) -> None:
        if self.steps > it.max_steps:
            raise ValueError(f"Truncated(steps={self.steps}) needs max_steps >= {self.steps}, got {it.max_steps}")

    def run(self, it, u0, params, info, key=None):
        with torch.no_grad():
            u = it.run(u0.detach(), detached(params), info, num_steps=it.max_steps - self.steps)
        # exactly `steps` differentiated steps: the tail never stops on the tolerance
        return it.run(u.detach(), params, info, start=info.steps, num_steps=self.steps, stop=False)

    def __repr__(self) -> str:
        return f"Truncated(steps={self.steps})"


class FirstOrder(HypergradMethod):
    r"""Jacobian-free hypergradient :math:`\nabla_x F + J_x^\top \nabla_u F` (Fung et al., 2022).

    The forward runs without autograd; the returned :math:`u^*` carries the derivative of
    :math:`T(u^*; x)` as if :math:`u^*` did not depend on x (its value is :math:`u^*` itself, its
    gradient flows through one evaluation of T), i.e. the first term of the Neumann series of the
    implicit hypergradient — the cheap baseline.

    >>> import torch, hodl_plugin as hp
    >>> x = torch.ones(1, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=FirstOrder())(torch.zeros(1), x).backward()
    >>> x.grad                                   # J_x = 1 (the exact one is 2)
    tensor([1.])
    """

    name = "first_order"

    def run(self, it, u0, params, info, key=None):
        with torch.no_grad():
            u = it.run(u0.detach(), detached(params), info).detach()
        w = it.T(u, *params)
        return u + (w - w.detach())  # the value of u*, the derivative of T(u*; x) in x


def _methods() -> dict[str, Callable[..., HypergradMethod]]:
    from .finite_difference import FiniteDifference
    from .iga import IGA
    from .implicit import Implicit
    from .inexact import Inexact
    from .ptt import PTT

    return {"unrolled": Unrolled, "truncated": Truncated, "implicit": Implicit, "inexact": Inexact,
            "first_order": FirstOrder, "ptt": PTT, "fd": FiniteDifference, "iga": IGA}


def get_method(spec: Union[str, HypergradMethod], **kwargs: Any) -> HypergradMethod:
    """A method object from its name (``kwargs`` go to its constructor) or pass one through.

    Args:
        spec: a method's name (``"implicit"``, ``"unrolled"``, ``"truncated"``, ``"inexact"``,
            ``"first_order"``, ``"ptt"``, ``"fd"``, ``"iga"``: the module docstring) or a
            :class:`HypergradMethod` object.
        **kwargs: options of the named method's constructor (none with an object).

    Returns:
        The :class:`HypergradMethod`: a new one for a name, ``spec`` itself for an object.

    Raises:
        ValueError: an unknown name, or options given with a method object.
        TypeError: an option the named method does not take.

    >>> get_method("truncated", steps=3)
    Truncated(steps=3)
    >>> get_method("truncated", step=3)
    Traceback (most recent call last):
    ...
    TypeError: hypergrad='truncated' takes the options ['steps']; got unknown ['step']
    """
    if isinstance(spec, HypergradMethod):
        if kwargs:
            raise ValueError("options are given to the method object's constructor, not here")
        return spec
    methods = _methods()
    if not isinstance(spec, str) or spec not in methods:
        raise ValueError(f"unknown hypergrad {spec!r}; choose one of {sorted(methods)} or pass a method object")
    factory = methods[spec]
    allowed = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"hypergrad={spec!r} takes the options {allowed}; got unknown {unknown}")
    return factory(**kwargs)


def __getattr__(name: str) -> Any:  # ``hodl_plugin.hypergrad.Implicit`` / ``.Inexact``: the methods' homes
    if name in ("Implicit", "Inexact"):
        return _methods()[name.lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
