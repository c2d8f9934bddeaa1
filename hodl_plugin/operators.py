r"""Operators :math:`T(u; x)` for the GKM solver.

An operator is any callable ``T(u, *params) -> tensor shaped like u``; the GKM iteration converges
when it is nonexpansive (averaged) in u. These ``nn.Module``\ s cover the common cases; their
learnable parts receive gradients from every hypergradient method.

- :class:`GradientStep` — :math:`T(u) = u - s\nabla_u f(u; x)`, averaged for :math:`s\in(0,2/L)`;
  its Jacobian is symmetric, so the implicit mode uses CG. The step s is a number, a scalar tensor
  (learnable) or a function of the parameters.
- :class:`ProximalGradient` — :math:`T(u) = \mathrm{prox}_{s g}(u - s\nabla_u f(u; x))`.
- :class:`LearnedResidual` — :math:`T(u) = u - \tau N_\omega(u; x)` around an ``nn.Module``.
- :class:`KMAveraged` — :math:`T_\beta = (1-\beta)I + \beta T`.
- :func:`functional_operator` — a module as a pure function of explicit parameter tensors
  (``torch.func.functional_call``).

Your own operator: ``symmetric_jacobian``
-----------------------------------------
A plain function or module ``T(u, *params)`` is an operator as it is. One attribute changes how it
is differentiated: ``T.symmetric_jacobian``. The implicit and inexact modes solve the adjoint system
:math:`(I - \partial_u T)^\top v = \nabla_u F`; their default solver is **CG** when
``getattr(T, "symmetric_jacobian", False)`` is true and **GMRES** otherwise. CG is the faster one
(one product per iteration, no Krylov basis kept), but is valid only for a symmetric
:math:`\partial_u T` — e.g. :math:`T = u - s\nabla f` with a scalar step and twice-differentiable f
(:class:`GradientStep` sets it). A function you write loses CG unless you say so::

    T = lambda u, x: u - s * (A @ u - x)      # A symmetric: ∂_u T = I - sA is symmetric
    T.symmetric_jacobian = True               # the implicit mode now uses CG (else GMRES)

Claim it only when it holds: the claim is tested (on CG's first search directions, and on two random
vectors for a batch or when CG does not converge), and a false
claim raises :class:`~hodl_plugin.errors.LinearSolveError` (whatever ``on_fail`` says). Not
claiming it costs only speed: GMRES is correct for any Jacobian. To choose explicitly, pass the
solver, ``hypergrad=hp.Implicit("gmres")``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ._autodiff import grad_u
from .prox import Prox

#: A step size. A positive number, a positive scalar tensor (may require grad), or ``step(*params)``
StepLike = Union[float, Tensor, Callable[..., Union[float, Tensor]]]

__all__ = ["StepLike", "GradientStep", "ProximalGradient", "LearnedResidual", "KMAveraged", "functional_operator"]


def _gradient(grad: Optional[Callable[..., Tensor]], objective: Optional[Callable[..., Tensor]]):
    if (grad is None) == (objective is None):
        raise ValueError("give exactly one of grad= (∇_u f) or objective= (f, differentiated by autograd)")
    if grad is not None:
        return grad
    return _AutogradGradient(objective)


class _AutogradGradient:
    """:math:`\nabla_u f(u, *params)` of an objective by autograd (picklable when ``f`` is)."""

    def __init__(self, objective: Callable[..., Tensor]) -> None:
        self.objective = objective

    def __call__(self, u: Tensor, *params: Tensor) -> Tensor:
        return grad_u(self.objective, u, params)


def _check_step(step: float) -> float:
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number, got {step!r}")
    return float(step)


def _check_step_like(step: StepLike) -> StepLike:
    """Validate a :data:`StepLike` at construction: a positive finite number, a positive finite
    real scalar tensor, or a callable (its value is checked when called)."""
    if isinstance(step, Tensor):
        if not step.is_floating_point() or step.numel() != 1:
            raise ValueError(f"a tensor step must be a real floating scalar (one element), got dtype "
                             f"{step.dtype} and shape {tuple(step.shape)}")
        value = float(step.detach())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"step must be positive and finite, got the tensor value {value}")
        return step
    if isinstance(step, bool) or not (isinstance(step, (int, float)) or callable(step)):
        raise TypeError(f"step must be a positive number, a scalar tensor or a callable step(*params), got {step!r}")
    if callable(step):
        return step
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive number, got {step!r}")
    return float(step)


class GradientStep(nn.Module):
    r"""Gradient step :math:`T(u; x) = u - s\,\nabla_u f(u; x)`.

    Averaged (hence GKM-convergent) when :math:`f(\cdot; x)` is convex and L-smooth and
    :math:`s \in (0, 2/L)`; a contraction with factor :math:`\max(|1-s\mu|, |1-sL|)` when it is also
    μ-strongly convex. ``symmetric_jacobian = True``: :math:`I - \partial_u T = s\nabla^2 f`.

    Args:
        grad: ``∇_u f(u, *params)``; or
        objective: ``f(u, *params)`` (scalar), differentiated by autograd.
        step: s — a positive number; a positive scalar tensor, e.g. an ``nn.Parameter`` (registered,
            so it receives hypergradients like the module's other parameters; its value is checked
            here only, keep it in :math:`(0, 2/L)` while training); or a callable ``step(*params)``
            returning a number or a one-element tensor, evaluated at every application of T, so a
            step computed from θ (e.g. :math:`1/L(\theta)`) is differentiated with everything else.
            A tensor step is a scalar: a per-coordinate step would break the symmetric Jacobian.

    Raises:
        ValueError: both or neither of ``grad`` and ``objective``; a step that is not positive and
            finite, or a tensor step with more than one element; (when called) a callable step whose
            value is not positive and finite.
        TypeError: a step that is neither a number, a tensor nor a callable.

    >>> import torch
    >>> T = GradientStep(grad=lambda u, b: u - b, step=0.5)
    >>> T(torch.zeros(2), torch.ones(2))
    tensor([0.5000, 0.5000])

    A step from the parameters: for :math:`f = \tfrac{\theta}{2}\|u\|^2 - b^\top u`, :math:`s = 1/\theta`
    reaches the fixed point :math:`b/\theta` in one step:

    >>> T = GradientStep(grad=lambda u, b, th: th * u - b, step=lambda b, th: 1 / th)
    >>> T(torch.zeros(2), torch.ones(2), torch.tensor(4.0))
    tensor([0.2500, 0.2500])
    """

    symmetric_jacobian = True

    def __init__(self, grad=None, *, objective=None, step: StepLike) -> None:
        super().__init__()
        self.grad_fn = _gradient(grad, objective)
        #: f itself when given as ``objective=`` (``None`` with ``grad=``); the finite-difference and IGA
        #: hypergradients need its values, not only its gradient
        # (a plain attribute: a module given as objective stays unregistered, as before)
        object.__setattr__(self, "objective", objective)
        self.step = _check_step_like(step)

    def step_size(self, *params: Tensor) -> Union[float, Tensor]:
        """The step s for these params (a number or a 0-dim tensor)."""
        s = self.step
        if callable(s) and not isinstance(s, Tensor):
            s = s(*params)
            if isinstance(s, Tensor):
                if s.numel() != 1:
                    raise ValueError(f"the callable step returned shape {tuple(s.shape)}; it must return a scalar")
            elif isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
                raise ValueError(f"the callable step returned {s!r}; it must return a positive number or tensor")
        return s.reshape(()) if isinstance(s, Tensor) else s

    def forward(self, u: Tensor, *params: Tensor) -> Tensor:
        return u - self.step_size(*params) * self.grad_fn(u, *params)


class ProximalGradient(nn.Module):
    r"""Proximal-gradient step :math:`T(u; x) = \mathrm{prox}_{s g}(u - s\nabla_u f(u; x))`.

    Averaged for convex L-smooth f, convex g and :math:`s\in(0,2/L)`. ``prox`` is
    ``prox(v, step, *params)`` (see :mod:`hodl_plugin.prox`), so g may carry learned weights.

    Args:
        grad: ``∇_u f(u, *params)``; or
        prox: :math:`\mathrm{prox}_{sg}`, called as ``prox(v, step, *params)``.
        objective: ``f(u, *params)`` (scalar) instead of ``grad``, differentiated by autograd.
        step: s, a positive number.

    Raises:
        ValueError: both or neither of ``grad`` and ``objective``, or a step that is not a positive
            number.
        TypeError: ``prox`` is not callable.

    LASSO :math:`\tfrac12\|Au-b\|^2 + \lambda\|u\|_1` with a learned λ:

    >>> import torch
    >>> from hodl_plugin import prox
    >>> A = torch.eye(2); b = torch.tensor([2.0, 0.1])
    >>> T = ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=prox.l1_param(0), step=1.0)
    >>> T(torch.zeros(2), torch.tensor(0.5))
    tensor([1.5000, 0.0000])
    """

    def __init__(self, grad=None, *, prox: Prox, objective=None, step: float) -> None:
        super().__init__()
        self.grad_fn = _gradient(grad, objective)
        if not callable(prox):
            raise TypeError("prox must be callable prox(v, step, *params)")
        self.prox = prox
        self.step = _check_step(step)

    def forward(self, u: Tensor, *params: Tensor) -> Tensor:
        return self.prox(u - self.step * self.grad_fn(u, *params), self.step, *params)


class LearnedResidual(nn.Module):
    r"""Learned-residual operator :math:`T(u; x) = u - \tau\,N_\omega(u, *x)`.

    Wraps a network :math:`N_\omega` (``net(u, *params)``); its parameters ω are learned by the
    upper level. T is a contraction when :math:`I - \tau N_\omega` is (e.g. :math:`N_\omega` strongly
    monotone and Lipschitz, or spectrally normalised layers and a small τ); the solver detects
    divergence otherwise.

    Args:
        net: the network :math:`N_\omega`, called as ``net(u, *params)``; its parameters are learned.
        step: :math:`\tau`, a positive number.

    Raises:
        ValueError: ``step`` is not a positive number.

    >>> import torch
    >>> net = torch.nn.Linear(3, 3)
    >>> T = LearnedResidual(net, step=0.1)
    >>> T(torch.zeros(2, 3)).shape
    torch.Size([2, 3])
    """

    def __init__(self, net: nn.Module, step: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.step = _check_step(step)

    def forward(self, u: Tensor, *params: Tensor) -> Tensor:
        return u - self.step * self.net(u, *params)


class KMAveraged(nn.Module):
    r"""Krasnoselskii–Mann averaging :math:`T_\beta(u) = (1-\beta)u + \beta T(u)`, :math:`\beta\in(0,1]`.

    Same fixed points as T; averaged when T is nonexpansive.

    Args:
        T: the operator, ``T(u, *params)`` (a function or an ``nn.Module``).
        beta: :math:`\beta \in (0, 1]`.

    Raises:
        ValueError: ``beta`` outside (0, 1].

    >>> import torch
    >>> KMAveraged(lambda u: -u, beta=0.5)(torch.ones(2))
    tensor([0., 0.])
    """

    def __init__(self, T: Callable[..., Tensor], beta: float = 0.5) -> None:
        super().__init__()
        if not 0 < beta <= 1:
            raise ValueError(f"beta must lie in (0, 1], got {beta}")
        self.T = T
        self.beta = float(beta)
        self.symmetric_jacobian = getattr(T, "symmetric_jacobian", False)

    def forward(self, u: Tensor, *params: Tensor) -> Tensor:
        return (1 - self.beta) * u + self.beta * self.T(u, *params)


def functional_operator(module: nn.Module) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    r"""A module as a pure function of explicit tensors, via ``torch.func.functional_call``.

    Pass ``weights`` to the solver as trailing params to treat the module's parameters like any other
    learned variable (the TorchOpt / ``torch.func`` style). ``weights`` are the module's own
    parameter tensors, so their ``.grad`` fills as usual.

    Args:
        module: the operator as an ``nn.Module`` with ``forward(u, *params)``.

    Returns:
        tuple: ``(fn, weights)`` with ``fn(u, *params, *weights) == module(u, *params)``; ``weights``
        in the order of ``module.named_parameters()``. Nothing is raised here.

    >>> import torch, hodl_plugin as hp
    >>> net = torch.nn.Linear(2, 2, dtype=torch.float64)
    >>> fn, w = functional_operator(hp.LearnedResidual(net, step=0.1))
    >>> u = torch.ones(1, 2, dtype=torch.float64)
    >>> bool(torch.equal(fn(u, *w), hp.LearnedResidual(net, step=0.1)(u)))
    True
    """
    names = [n for n, _ in module.named_parameters()]
    weights = tuple(p for _, p in module.named_parameters())
    n_w = len(names)

    def fn(u: Tensor, *args: Tensor) -> Tensor:
        user, mod = args[: len(args) - n_w], args[len(args) - n_w :]
        return torch.func.functional_call(module, dict(zip(names, mod)), (u, *user))

    fn.symmetric_jacobian = getattr(module, "symmetric_jacobian", False)  # type: ignore[attr-defined]
    return fn, weights
