r"""What every first-order bilevel method shares: the two variables, the step rule, the state.

A method solves

.. math::

    \min_{x,\,y}\ F(x, y) \quad\text{s.t.}\quad y \in \arg\min_{y'} f(x, y')

by moving **both** variables at every step with first derivatives of :math:`F` and :math:`f` only
(no Hessian, no implicit differentiation). Its ``step(*args)`` does one iteration in place and
returns a :class:`StepInfo`; ``args`` (a batch, say) are passed on to both objectives,
``upper(x, y, *args)`` and ``lower(x, y, *args)``.

Each variable moves by a plain gradient step of its own size (``x_lr``, ``y_lr``) or by a torch
optimizer the user built over it (``x_optimizer``, ``y_optimizer``: the method writes its
direction into ``.grad`` and calls ``optimizer.step()``), never both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigurationError
from ._vars import Var, Variable, call_scalar, check_finite, grads

__all__ = ["StepInfo", "FirstOrderMethod", "positive", "nonnegative", "count", "inner_descent"]


@dataclass(frozen=True)
class StepInfo:
    r"""Diagnostics of one step, measured at the iterate the step started from.

    Attributes:
        step: the iteration index k (0 for the first step).
        upper: :math:`F(x_k, y_k)`.
        lower: :math:`f(x_k, y_k)`.
        gap: the method's measure of lower-level optimality (e.g. BOME's
            :math:`q = f(x_k, y_k) - f(x_k, \hat y)`), ``nan`` for a method without one.
        multiplier: the weight the method put on the lower level this step (BOME's
            :math:`\lambda_k`, the penalty :math:`\gamma_k`, ...), ``nan`` for a method without one.

    Example — BOME's first step on :math:`F = \|y - 1\|^2`, :math:`f = \tfrac12\|y - x\|^2` from
    :math:`x = y = 0`: :math:`F = 1`, :math:`f = 0`, and :math:`\hat y = y` already minimises
    :math:`f(0, \cdot)`, so the gap and :math:`\lambda_0` are 0:

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(1, requires_grad=True); y = torch.zeros(1, requires_grad=True)
    >>> bome = hp.BOME(x, y, upper=lambda x, y: ((y - 1) ** 2).sum(), lower=lambda x, y: 0.5 * ((y - x) ** 2).sum(),
    ...                x_lr=0.1, y_lr=0.1, inner_lr=0.5)
    >>> bome.step()
    StepInfo(step=0, upper=1.0, lower=0.0, gap=0.0, multiplier=0.0)
    """

    step: int
    upper: float
    lower: float
    gap: float = math.nan
    multiplier: float = math.nan


def positive(value: Any, name: str) -> float:
    """``value`` as a positive finite float, else ``ValueError`` naming it.

    Args:
        value: the option's value (a bool is refused).
        name: its name, for the message.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a finite number > 0.

    >>> positive(2, "eta")
    2.0
    >>> positive(0.0, "eta")
    Traceback (most recent call last):
    ...
    ValueError: eta must be a positive finite number, got 0.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def nonnegative(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0, else ``ValueError`` naming it.

    Args:
        value: the option's value (a bool is refused).
        name: its name, for the message.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a finite number >= 0.

    >>> nonnegative(0, "inner_momentum")
    0.0
    >>> nonnegative(float("nan"), "inner_momentum")
    Traceback (most recent call last):
    ...
    ValueError: inner_momentum must be a finite number >= 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else ``ValueError`` naming it.

    Args:
        value: the option's value (an ``int``; a bool or a float is refused).
        name: its name, for the message.
        minimum: the least value accepted.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not an integer >= ``minimum``.

    >>> count(0, "inner_steps", minimum=0)
    0
    >>> count(2.0, "inner_steps")
    Traceback (most recent call last):
    ...
    ValueError: inner_steps must be an integer >= 1, got 2.0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Mover:
    """Moves one variable along a direction: ``p -= lr * d``, or ``p.grad = d; optimizer.step()``."""

    def __init__(self, var: Var, lr: Optional[float], optimizer: Optional[torch.optim.Optimizer], name: str) -> None:
        if (lr is None) == (optimizer is None):
            raise ConfigurationError(
                f"give exactly one of {name}_lr= (a plain gradient step) or {name}_optimizer= (a torch optimizer "
                f"over {name}); got {'both' if lr is not None else 'neither'}"
            )
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"{name}_optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if theirs != {id(p) for p in var.params}:
                raise ConfigurationError(
                    f"{name}_optimizer must be built over exactly the parameters of {name} "
                    f"({len(var.params)} tensors); it holds {len(theirs)} others or a different set"
                )
        self.var, self.optimizer = var, optimizer
        self.lr = None if lr is None else positive(lr, f"{name}_lr")

    def move(self, direction: Sequence[Tensor]) -> None:
        if self.optimizer is None:
            self.var.add_(direction, -self.lr)  # type: ignore[arg-type]
            return
        for p, d in zip(self.var.params, direction):
            p.grad = d.detach().clone()
        self.optimizer.step()
        for p in self.var.params:
            p.grad = None


def inner_descent(lower: Callable[..., Tensor], x: Var, aux: Var, steps: int, lr: float, momentum: float,
                  args: tuple, kwargs: dict) -> None:
    r"""``steps`` gradient steps on :math:`f(x, \cdot)` from ``aux`` (in place), heavy ball ``momentum``
    in torch's SGD convention (:math:`b_0 = g_0`, :math:`b_t = \mu b_{t-1} + g_t`,
    :math:`\hat y \leftarrow \hat y - \alpha b_t`).

    Args:
        lower: :math:`f`, called ``lower(x, y, *args, **kwargs)``.
        x: the upper variable (held fixed).
        aux: :math:`\hat y`, the auxiliary copy of y that moves.
        steps: the number of steps.
        lr: :math:`\alpha`, their step size.
        momentum: :math:`\mu` (0: plain gradient descent).
        args, kwargs: passed on to ``lower``.

    Returns:
        ``None``; ``aux`` is updated in place.

    Example — one step of size 1 on :math:`\tfrac12\|\hat y - x\|^2` lands on :math:`\hat y = x`:

    >>> import torch
    >>> from hodl_plugin.baselines._vars import Var
    >>> x, y_hat = Var(torch.tensor([2.0], requires_grad=True), "x"), Var(torch.zeros(1, requires_grad=True), "y")
    >>> inner_descent(lambda x, y: 0.5 * ((y - x) ** 2).sum(), x, y_hat, steps=1, lr=1.0, momentum=0.0,
    ...               args=(), kwargs={})
    >>> y_hat.params[0].tolist()
    [2.0]
    """
    buf: Optional[list[Tensor]] = None
    for _ in range(steps):
        g = grads(call_scalar(lower, "lower", x.obj, aux.obj, *args, **kwargs), aux.params)
        if momentum:
            buf = g if buf is None else [momentum * b + gi for b, gi in zip(buf, g)]
            g = buf
        aux.add_(g, -lr)


class FirstOrderMethod:
    """Base class: holds ``x``, ``y``, the objectives and the step rule; subclasses define :meth:`_step`.

    Args:
        x: the upper variable: a leaf tensor with ``requires_grad=True``, an ``nn.Module`` or a tuple of
            such tensors. Updated in place.
        y: the lower variable, likewise.
        upper: :math:`F`, called ``upper(x, y, *args)`` and returning a scalar tensor.
        lower: :math:`f`, called ``lower(x, y, *args)`` and returning a scalar tensor.
        x_lr, y_lr: plain gradient step sizes of x and y; or
        x_optimizer, y_optimizer: torch optimizers built over exactly x's (y's) tensors.

    Raises:
        ConfigurationError: both or neither of ``x_lr`` / ``x_optimizer`` (likewise for y), an
            optimizer over other tensors than the variable's, or x and y sharing a tensor.
        TypeError: an objective that is not callable, or an optimizer that is not a ``torch.optim.Optimizer``.
        ValueError: an option out of range (named in the message).
        DivergenceError: (at a :meth:`step`) a non-finite direction or iterate.

    Example — the step rule of every method (here :class:`~hodl_plugin.baselines.ALTO`'s): each
    variable moves by exactly one of a step size or an optimizer:

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(1, requires_grad=True); y = torch.zeros(1, requires_grad=True)
    >>> F, f = lambda x, y: ((y - 1) ** 2).sum(), lambda x, y: 0.5 * ((y - x) ** 2).sum()
    >>> hp.ALTO(x, y, F, f, x_lr=0.1)
    Traceback (most recent call last):
    ...
    hodl_plugin.errors.ConfigurationError: give exactly one of y_lr= (a plain gradient step) or y_optimizer= ...
    >>> alto = hp.ALTO(x, y, F, f, x_lr=0.1, y_optimizer=torch.optim.SGD([y], lr=0.5))
    >>> [alto.step().step for _ in range(3)], alto.state_dict()["k"]
    ([0, 1, 2], 3)
    """

    name = "first-order method"

    def __init__(self, x: Variable, y: Variable, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *,
                 x_lr: Optional[float] = None, y_lr: Optional[float] = None,
                 x_optimizer: Optional[torch.optim.Optimizer] = None,
                 y_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if not callable(upper) or not callable(lower):
            raise TypeError("upper and lower must be callables: upper(x, y, *args) -> scalar tensor, "
                            "lower(x, y, *args) -> scalar tensor")
        self.x, self.y = Var(x, "x"), Var(y, "y")
        if {id(p) for p in self.x.params} & {id(p) for p in self.y.params}:
            raise ConfigurationError("x and y share a tensor: the upper and lower variables must be disjoint")
        self.upper, self.lower = upper, lower
        self._move_x = _Mover(self.x, x_lr, x_optimizer, "x")
        self._move_y = _Mover(self.y, y_lr, y_optimizer, "y")
        self.k = 0
        self.info: Optional[StepInfo] = None
        self._aux: dict[str, Var] = {}  # persistent auxiliary variables (warm-started ŷ, θ, z, v)

    # -- objectives ------------------------------------------------------------------------------
    def F(self, x: Var, y: Var, args: tuple, kwargs: dict) -> Tensor:
        return call_scalar(self.upper, "upper", x.obj, y.obj, *args, **kwargs)

    def f(self, x: Var, y: Var, args: tuple, kwargs: dict) -> Tensor:
        return call_scalar(self.lower, "lower", x.obj, y.obj, *args, **kwargs)

    def both_grads(self, value: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(∇_x, ∇_y) of a scalar."""
        g = grads(value, self.x.params + self.y.params)
        n = len(self.x.params)
        return g[:n], g[n:]

    def aux(self, name: str, warm: bool) -> Var:
        """The auxiliary copy ``name`` of y: the previous one when ``warm`` and present, else a fresh copy of y."""
        if warm and name in self._aux:
            return self._aux[name]
        self._aux[name] = self.y.copy()
        return self._aux[name]

    # -- the iteration ---------------------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> StepInfo:
        """One iteration: updates ``x`` and ``y`` in place and returns its :class:`StepInfo`."""
        with torch.enable_grad():
            info = self._step(args, kwargs)
        for var in (self.x, self.y):
            check_finite(self.name, self.k, **{var.name: var.params})
        self.k += 1
        self.info = info
        return info

    def _step(self, args: tuple, kwargs: dict) -> StepInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the iteration count and the auxiliary variables (the next step starts afresh)."""
        self.k, self.info, self._aux = 0, None, {}

    def state_dict(self) -> dict[str, Any]:
        """The iteration count and the auxiliary variables' values (not the optimizers' states)."""
        return {"k": self.k, "aux": {name: var.values() for name, var in self._aux.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self._aux = {}
        for name, values in state["aux"].items():
            var = self.y.copy()
            var.assign_(values)
            self._aux[name] = var

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step {self.k})"
