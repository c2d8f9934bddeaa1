r"""Linear solvers for the adjoint system of implicit differentiation.

The implicit hypergradient (:ref:`math-implicit`) needs :math:`v` with

.. math::  (I - \partial_u T(u^*; x))^\top v = \nabla_u F(u^*; x).

A solver is a small configured object (like lineax's solvers; TorchOpt's ``linear_solve`` makes them
functions): ``solver(matvec, b, x0=None) -> (x, LinearSolveInfo)``, where ``matvec(v)`` applies the
matrix to a tensor shaped like ``b``. Convergence means ``‖b - A x‖ ≤ max(rtol·‖b‖, atol)``; with
``rtol=None`` (the default) the relative tolerance follows the dtype (:func:`default_rtol`: ``1e-10``
in float64, ``1.2e-5`` in float32). What a solver can do is said by two class attributes:
``symmetric`` (valid only for symmetric matrices: the implicit mode checks the claim before using it)
and ``batched`` (it has a per-sample mode, ``batch_dims=k``, used under ``torch.func.vmap``).

- :class:`CG` (:func:`cg`) — conjugate gradients for symmetric positive definite systems: the adjoint
  of a gradient step :math:`T(u) = u - s\nabla f(u)` is :math:`s\nabla^2 f`
  (:class:`TorchOptCG` runs ``torchopt.linalg.cg`` instead).
- :class:`GMRES` (:func:`gmres`) — restarted GMRES for the general nonsymmetric case.
- :class:`BiCGSTAB` (:func:`bicgstab`) — nonsymmetric with constant memory.
- :class:`Neumann` (:func:`fixed_point` / :func:`neumann`) — the Neumann series / Richardson iteration
  :math:`v \leftarrow b + J^\top v`, which converges when :math:`T` is a contraction;
  :class:`AndersonSolve` (:func:`anderson_fixed_point`) accelerates it.
- :class:`FunctionSolver` — your own ``solve(matvec, b, x0=None)`` (returning ``x`` or ``(x, info)``),
  checked against its tolerance.

Example:
    >>> import torch
    >>> from hodl_plugin import linear_solve
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, info = linear_solve.gmres(rtol=1e-12)(lambda v: M @ v, b)
    >>> bool(torch.allclose(M @ x, b)), info.converged
    (True, True)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._torch_compat import forward_ad_active, transforms_active
from .errors import ConfigurationError, LinearSolveError

__all__ = [
    "LinearSolveInfo",
    "LinearSolver",
    "CG",
    "TorchOptCG",
    "GMRES",
    "BiCGSTAB",
    "Neumann",
    "AndersonSolve",
    "FunctionSolver",
    "default_rtol",
    "cg",
    "torchopt_cg",
    "gmres",
    "bicgstab",
    "fixed_point",
    "neumann",
    "anderson_fixed_point",
    "get",
    "as_solver",
    "configure",
    "for_operator",
]

MatVec = Callable[[Tensor], Tensor]


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of a linear solve in ``dtype``: ``1e-10`` in float64, about
    ``100·eps`` above that in lower precision (``1.2e-5`` in float32), so that it is reachable.

    Args:
        dtype: the floating dtype of the right-hand side.

    Returns:
        ``min(max(1e-10, 100·eps), 1e-2)``, ``eps`` the dtype's machine epsilon.

    >>> default_rtol(torch.float64), default_rtol(torch.float32)
    (1e-10, 1.1920928955078125e-05)
    """
    return min(max(1e-10, 100 * torch.finfo(dtype).eps), 1e-2)


def _is_dual(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (a dual level is open)."""
    return fwAD.unpack_dual(t).tangent is not None


_UNDER_TRANSFORMS = (
    "the solvers of hodl_plugin.linear_solve do not run under torch.func transforms (vmap, grad, jvp, ...): they "
    "read their residuals on the host and do not differentiate through their iterations; for a batch of "
    "independent systems pass batch_dims= (CG, GMRES, fixed_point), and for the derivatives of x = A⁻¹b "
    "decorate the solve with hp.custom_root(lambda x, b: matvec(x) - b), which vmap and every transform go through"
)
_NOT_DIFFERENTIABLE = (
    "the solvers of hodl_plugin.linear_solve do not differentiate through their iterations (autograd "
    "through them gives wrong derivatives): call the solver under torch.no_grad() on detached tensors, or, "
    "for the derivatives of x = A⁻¹b, decorate the solve with hp.custom_root(lambda x, b: matvec(x) - b)"
)


@dataclass
class LinearSolveInfo:
    r"""Diagnostics of one linear solve.

    Attributes:
        method: solver name.
        iterations: number of products with the matrix (the cost unit of every solver here).
        residual: final true residual ``‖b - A x‖``.
        threshold: the residual it had to reach, ``max(rtol·‖b‖, atol)``.
        converged: ``residual <= threshold``.
        iterations_per_sample, converged_per_sample: with ``batch_dims`` (a batch of independent
            systems, e.g. under ``torch.func.vmap``), tensors over the batch; ``iterations`` is
            then the most products any sample used and ``residual`` / ``threshold`` are the worst
            sample's (largest ``residual / threshold``).
        residual_per_sample, threshold_per_sample: with ``batch_dims``, each sample's final
            residual and threshold.
        symmetry_defect: (:class:`CG` without ``batch_dims``) the relative asymmetry of the matrix on
            CG's first two search directions, :math:`|\langle p_1, Ap_0\rangle - \langle Ap_1, p_0\rangle|
            / (\|p_1\|\|Ap_0\| + \|Ap_1\|\|p_0\|)`, rounding-sized for a symmetric matrix (``None`` when
            CG stopped before its second product).

    >>> import torch
    >>> _, info = cg(rtol=1e-12)(lambda v: 2 * v, torch.ones(3, dtype=torch.float64))
    >>> info.method, info.iterations, info.converged     # one product + the final residual check
    ('cg', 2, True)
    """

    method: str
    iterations: int
    residual: float
    threshold: float
    converged: bool
    iterations_per_sample: Optional[Tensor] = None
    converged_per_sample: Optional[Tensor] = None
    residual_per_sample: Optional[Tensor] = None
    threshold_per_sample: Optional[Tensor] = None
    symmetry_defect: Optional[float] = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() != 1:
        a, b = a.reshape(-1), b.reshape(-1)
    return torch.vdot(a, b)


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a))


def _start(matvec: MatVec, b: Tensor, x0: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Initial iterate, residual and product count: ``(0, b, 0)`` or ``(x0, b - A x0, 1)``."""
    if x0 is None:
        return torch.zeros_like(b), b.clone(), 0
    x = x0.clone()
    return x, b - matvec(x), 1


class _Batch:
    """Per-sample reductions over the trailing dims of tensors whose ``bd`` leading dims index
    independent systems."""

    def __init__(self, b: Tensor, bd: int) -> None:
        if bd < 1 or bd >= b.dim():
            raise ValueError(f"batch_dims must be in [1, {b.dim() - 1}] for b of shape {tuple(b.shape)}, got {bd}")
        self.bd, self.dims = bd, tuple(range(bd, b.dim()))

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        return (a.conj() * b).sum(self.dims)

    def norm(self, a: Tensor) -> Tensor:
        return torch.linalg.vector_norm(a, dim=self.dims)

    def ex(self, t: Tensor, like: Tensor) -> Tensor:
        """A per-sample tensor broadcastable against ``like``."""
        return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))

    def info(self, method: str, its: Tensor, res: Tensor, thresh: Tensor, conv: Tensor) -> LinearSolveInfo:
        ratio = res / thresh.clamp(min=torch.finfo(res.dtype).tiny)
        ratio = torch.where(torch.isfinite(res), ratio, torch.full_like(ratio, math.inf))
        w = int(ratio.reshape(-1).argmax())
        flat_res, flat_th = res.reshape(-1), thresh.reshape(-1)
        return LinearSolveInfo(method, int(its.max()), float(flat_res[w]), float(flat_th[w]), bool(conv.all()),
                               iterations_per_sample=its, converged_per_sample=conv,
                               residual_per_sample=res, threshold_per_sample=thresh)


def _check_system(b: Tensor, x0: Optional[Tensor], batch_dims: int) -> None:
    """A real floating right-hand side; a warm start of its shape, dtype and device."""
    if not isinstance(b, Tensor) or not b.is_floating_point():
        what = b.dtype if isinstance(b, Tensor) else type(b).__name__
        hint = " (complex systems are not supported: solve for the real and imaginary parts)" if (
            isinstance(b, Tensor) and b.is_complex()) else ""
        raise TypeError(f"the right-hand side b must be a real floating tensor, got {what}{hint}")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or not 0 <= batch_dims <= b.dim():
        raise ValueError(f"batch_dims must be an integer in [0, b.dim()] = [0, {b.dim()}], got {batch_dims!r}")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != b.shape or x0.dtype != b.dtype
                           or x0.device != b.device):
        got = (tuple(x0.shape), x0.dtype, str(x0.device)) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"the warm start x0 must be a tensor like b {(tuple(b.shape), b.dtype, str(b.device))}, "
                         f"got {got}")


def _checked(matvec: MatVec) -> MatVec:
    """``matvec`` whose first product is checked: a tensor shaped like its input, of its dtype and device
    (else the solver's arithmetic raised torch's raw size or dtype errors, or ran on in another dtype)."""
    state = {"checked": False}

    def mv(z: Tensor) -> Tensor:
        out = matvec(z)
        if not state["checked"]:
            state["checked"] = True
            if not isinstance(out, Tensor) or out.shape != z.shape or out.dtype != z.dtype or out.device != z.device:
                got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, Tensor) else type(out).__name__
                like = (tuple(z.shape), z.dtype, str(z.device))
                raise ValueError(f"matvec must return a tensor like its input {like} (the product A z), got {got}")
        return out
    return mv


def _empty_info(method: str, b: Tensor, batch_dims: int) -> LinearSolveInfo:
    """The diagnostics of a solve with nothing to solve (``b`` without entries)."""
    if not batch_dims:
        return LinearSolveInfo(method, 0, 0.0, 0.0, True)
    S = b.shape[:batch_dims]
    zeros = torch.zeros(S, dtype=b.dtype, device=b.device)
    return LinearSolveInfo(method, 0, 0.0, 0.0, True, iterations_per_sample=torch.zeros(S, dtype=torch.long),
                           converged_per_sample=torch.ones(S, dtype=torch.bool), residual_per_sample=zeros,
                           threshold_per_sample=zeros.clone())


def _safe_range(dtype: torch.dtype) -> tuple[float, float]:
    r"""Norms of right-hand sides whose solves measure every residual without squares leaving the dtype:
    above :math:`\sqrt{\mathrm{tiny}}/\epsilon` (the residual reaches ~ε‖b‖), below :math:`\sqrt{\max}/2^{24}`."""
    fi = torch.finfo(dtype)
    return 16 * math.sqrt(fi.tiny) / fi.eps, math.sqrt(fi.max) / 2.0**24


def _pow2_scale(m: Tensor) -> Tensor:
    """The power of 2 at or below each entry of ``m`` (a per-sample max ``|·|``), 1 where ``m`` is 0 or not
    finite: dividing by it is exact and never overflows (``floor``: ``m`` near the dtype's max stays finite),
    and it is at least the smallest normal number (a subnormal ``m``: its reciprocal stays finite too).

    >>> _pow2_scale(torch.tensor([3e-200, 1e200, 0.0, 1e-310], dtype=torch.float64)).log2().tolist()
    [-663.0, 664.0, 0.0, -1022.0]
    """
    ok = torch.isfinite(m) & (m > 0)
    e = torch.floor(torch.log2(torch.where(ok, m, torch.ones_like(m)))).clamp(min=math.log2(torch.finfo(m.dtype).tiny))
    return torch.where(ok, torch.exp2(e), torch.ones_like(m))


def _rhs_scale(b: Tensor, bt: Optional[_Batch]) -> Optional[Tensor]:
    """``None`` for a right-hand side whose norm (every sample's, with ``bt``) is inside :func:`_safe_range`
    or exactly 0; else the power of 2 nearest its largest entry — per sample with ``bt`` (1 for a zero or
    non-finite sample, which the solver reports) — shaped to broadcast against ``b``. One host read per
    solve (the solvers read ‖b‖ anyway); none under ``torch.func`` transforms."""
    if transforms_active() or not b.is_floating_point() or b.numel() == 0:
        return None
    lo, hi = _safe_range(b.dtype)
    dims = bt.dims if bt is not None else None
    n = torch.linalg.vector_norm(b, dim=dims, dtype=torch.float64)  # float64: a float32 norm may overflow
    nmin, nmax = torch.stack([n.min(), n.max()]).tolist() if n.dim() else [float(n)] * 2
    if lo < nmin and nmax < hi:
        return None
    m = b.abs().amax(dim=dims, keepdim=bt is not None)
    usable = torch.isfinite(m) & (m > 0)
    in_range = (n > lo) & (n < hi)
    if not bool((usable & ~in_range.reshape(usable.shape)).any()):
        return None  # every sample in range, exactly 0, or NaN / Inf (the solver reports those)
    return _pow2_scale(m)


def _warm_in_range(x0: Tensor, bt: Optional[_Batch]) -> Optional[Tensor]:
    """A scaled warm start where its norm stays in the dtype's range (per sample: 0 elsewhere): a start
    far larger than the solution (``x0 = 1`` for ``b`` ~ 1e-200) would overflow the solver's products."""
    _, hi = _safe_range(x0.dtype)
    nx = torch.linalg.vector_norm(x0, dim=bt.dims if bt is not None else None, dtype=torch.float64)
    keep = torch.isfinite(nx) & (nx < hi)
    if bt is None:
        return x0 if bool(keep) else None
    return torch.where(bt.ex(keep, x0), x0, torch.zeros_like(x0))


def _unscaled(info: LinearSolveInfo, s: Tensor, bt: Optional[_Batch]) -> LinearSolveInfo:
    """The diagnostics of the solve of ``b/s`` in the units of ``b``."""
    if bt is None:
        sf = float(s)
        return dataclasses.replace(info, residual=info.residual * sf, threshold=info.threshold * sf)
    sb = s.reshape(s.shape[: bt.bd]).to(info.residual_per_sample.dtype)
    res, thr = info.residual_per_sample * sb, info.threshold_per_sample * sb
    return bt.info(info.method, info.iterations_per_sample, res, thr, info.converged_per_sample)


def _finite(info: LinearSolveInfo, bt: Optional[_Batch]) -> LinearSolveInfo:
    """A non-finite residual never counts as converged (an Inf right-hand side has an Inf threshold)."""
    if bt is not None and info.residual_per_sample is not None:
        conv = info.converged_per_sample & torch.isfinite(info.residual_per_sample)
        if not bool(conv.eq(info.converged_per_sample).all()):
            return bt.info(info.method, info.iterations_per_sample, info.residual_per_sample,
                           info.threshold_per_sample, conv)
        return info
    if info.converged and not math.isfinite(info.residual):
        return dataclasses.replace(info, converged=False)
    return info


@dataclass(frozen=True)
class LinearSolver:
    """A linear solver: ``solver(matvec, b, x0=None, batch_dims=0) -> (x, LinearSolveInfo)``.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.

    ``batch_dims=k`` (solvers with ``batched = True``): the ``k`` leading dims of ``b`` index
    independent systems (``matvec`` must be block-diagonal over them). Each sample then has its own
    inner products, step sizes, threshold ``max(rtol·‖b_i‖, atol)`` and stopping test; a sample that
    has converged stops changing, and the loop stops when every sample has (one host sync per
    iteration, as without). ``maxiter`` then counts the batch's products, i.e. the slowest
    sample's (batched GMRES restarts every sample's cycle together).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).

    >>> CG(rtol=1e-8).replace(rtol=1e-12)
    CG(rtol=1e-12, atol=0.0, maxiter=1000)
    """

    rtol: Optional[float] = None
    atol: float = 0.0
    maxiter: int = 1000

    name: ClassVar[str] = "?"
    #: valid only for symmetric matrices (the implicit mode tests the claim before using it)
    symmetric: ClassVar[bool] = False
    #: has a per-sample mode (``batch_dims=k``)
    batched: ClassVar[bool] = False
    #: measures the matrix's symmetry on its own search directions (``info.symmetry_defect``)
    reports_symmetry: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for field in ("rtol", "atol"):
            v = getattr(self, field)
            if v is None and field == "rtol":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{type(self).__name__}: {field} must be a finite number >= 0, got {v!r}")
        if self.rtol is not None and self.rtol >= 1:
            raise ValueError(
                f"{type(self).__name__}: rtol must be below 1 (rtol >= 1 accepts x = 0), got {self.rtol!r}"
            )
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(f"{type(self).__name__}: rtol and atol cannot both be 0 (the solve would never stop)")
        m = self.maxiter
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not float(m).is_integer() or m < 1:
            raise ValueError(f"{type(self).__name__}: maxiter must be an integer >= 1, got {m!r}")
        object.__setattr__(self, "maxiter", int(m))

    def replace(self, **changes: Any) -> LinearSolver:
        """A copy with other options (validated)."""
        return dataclasses.replace(self, **changes)

    def tolerances(self, b: Tensor) -> tuple[float, float]:
        """``(rtol, atol)`` for a right-hand side ``b`` (``rtol=None``: :func:`default_rtol` of its dtype)."""
        return (default_rtol(b.dtype) if self.rtol is None else float(self.rtol)), float(self.atol)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None,
                 batch_dims: int = 0) -> tuple[Tensor, LinearSolveInfo]:
        if transforms_active():
            raise ConfigurationError(_UNDER_TRANSFORMS)
        # autograd (reverse or forward mode) would go through the iterations: refused where it would reach
        # b, x0 or the matrix
        recording, dual = torch.is_grad_enabled(), forward_ad_active()
        if any(t is not None and ((recording and t.requires_grad) or (dual and _is_dual(t))) for t in (b, x0)):
            raise ConfigurationError(_NOT_DIFFERENTIABLE)
        if not (recording or dual):
            return self._call(matvec, b, x0, batch_dims)
        with torch.no_grad():
            x, info = self._call(matvec, b, x0, batch_dims)
        y = matvec(x)  # (one more product) does the matrix read tensors that carry a derivative?
        if (recording and y.requires_grad) or (dual and _is_dual(y)):
            raise ConfigurationError(_NOT_DIFFERENTIABLE)
        return x, info

    def _call(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor], batch_dims: int = 0
              ) -> tuple[Tensor, LinearSolveInfo]:
        """The solve without :meth:`__call__`'s refusals: the library's own solves (run without autograd,
        inside its primitives' rules, also under ``torch.func`` transforms)."""
        _check_system(b, x0, batch_dims)
        rtol, atol = self.tolerances(b)
        if batch_dims and not self.batched:
            raise ValueError(f"{type(self).__name__} has no per-sample mode (batch_dims)")
        if b.numel() == 0:  # nothing to solve
            return torch.zeros_like(b), _empty_info(self.name, b, batch_dims)
        if x0 is not None and not transforms_active():  # where b = 0 the solution is 0: not x0's iterations
            zero = b.detach().abs().amax(dim=tuple(range(batch_dims, b.dim())), keepdim=True) == 0
            if bool(zero.any()):
                x0 = torch.where(zero, torch.zeros_like(x0), x0)
        matvec = _checked(matvec)
        bt = _Batch(b, batch_dims) if batch_dims else None
        s = _rhs_scale(b, bt)
        if s is None:
            x, info = self._dispatch(matvec, b, x0, bt, rtol, atol)
            return x, _finite(info, bt)
        # x = s·A⁻¹(b/s): the solve is linear and s a power of 2 (exact); atol in the units of b/s (per sample);
        # a warm start that leaves the dtype's range once scaled starts from 0 there
        x0s = None if x0 is None else _warm_in_range(x0 / s, bt)
        atol_s: Union[float, Tensor] = atol / (float(s) if bt is None else s.reshape(s.shape[: bt.bd]))
        x, info = self._dispatch(matvec, b / s, x0s, bt, rtol, atol_s)
        return x * s, _finite(_unscaled(info, s, bt), bt)

    def _solve_checked(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None, *, samples: int = 0,
                      per_sample: bool = False, probe_symmetry: bool = True, probe_singular: bool = False
                      ) -> tuple[Tensor, LinearSolveInfo]:
        r"""The solve of an implicit derivative (:ref:`math-implicit`), with the checks that it applies.

        ``samples`` leading dims of ``b`` index independent systems: solved per sample (each meets its own
        tolerance) where the solver has a per-sample mode or ``per_sample`` (a vmap's batch); else as one
        system, each sample's right-hand side scaled to unit size (one threshold for the batch would leave a
        sample with a small right-hand side inaccurate). A warm start ``x0`` is used only where it beats 0,
        per sample. ``probe_symmetry``: a solver for symmetric matrices (CG) checks the claim — on its own
        search directions after the solve where it can, else before on two random vectors.
        ``probe_singular``: first solve :math:`A z = r` for a random ``r`` (:func:`check_nonsingular`).

        Raises:
            LinearSolveError: the matrix is not symmetric (a symmetric solver), or singular (``probe_singular``).

        >>> import torch, hodl_plugin as hp
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
        >>> hp.linear_solve.cg(rtol=1e-12)._solve_checked(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        Traceback (most recent call last):
        ...
        hodl_plugin.errors.LinearSolveError: solver='cg' needs a symmetric dT/du, ...
        """
        depth = samples if per_sample or self.batched else 0
        probe = self.symmetric and probe_symmetry
        inline = probe and not depth and self.reports_symmetry  # checked after the solve, at no extra product
        if probe and not inline:
            check_symmetric(matvec, b, self)
        if probe_singular:
            check_nonsingular(matvec, b, self, depth, inline)
        if x0 is not None:  # a warm start worse than 0 is not used (keeps A⁻¹0 = 0 exactly), per sample
            x0 = better_than_zero(x0, b, matvec(x0), depth)
        eq = _equilibrate(self, b, samples) if samples and not depth else None
        if eq is not None:  # x = e·A⁻¹(b/e): each sample's right-hand side at unit size (e a power of 2, exact)
            b, x0 = b / eq, (None if x0 is None else x0 / eq)
        x, info = self._call(matvec, b, x0, depth)
        if inline:
            verify_symmetric(matvec, b, self, info)
        return (x if eq is None else x * eq), info

    def _dispatch(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor], bt: Optional[_Batch], rtol: float,
                  atol: Union[float, Tensor]) -> tuple[Tensor, LinearSolveInfo]:
        if bt is not None:
            return self._solve_batched(matvec, b, x0, bt, rtol, atol)
        return self._solve(matvec, b, x0, rtol, atol)

    def _solve(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor], rtol: float,
               atol: float) -> tuple[Tensor, LinearSolveInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _solve_batched(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor], bt: _Batch, rtol: float,
                       atol: float) -> tuple[Tensor, LinearSolveInfo]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradients for symmetric positive definite systems (Hestenes–Stiefel).

    A lean loop: step sizes stay tensors, one host sync per iteration (the stopping test), and the
    reported residual is the true ``‖b - A x‖`` at exit. Converges for a symmetric positive definite
    :math:`A` (the adjoint :math:`I - \partial_u T` of a gradient step, :ref:`math-implicit`); on any
    other matrix the result is checked by its true residual and reported, not trusted.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 1000).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).

    >>> import torch
    >>> M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> x, info = CG(rtol=1e-12)(lambda v: M @ v, torch.ones(2, dtype=torch.float64))
    >>> info.converged, info.iterations <= 4
    (True, True)

    Per sample (``batch_dims=1``): sample 0 is ``2I`` (one product), sample 1 is ``M``:

    >>> Ms = torch.stack([2 * torch.eye(2, dtype=torch.float64), M])
    >>> xs, info = CG(rtol=1e-12)(lambda v: torch.einsum("bij,bj->bi", Ms, v),
    ...                           torch.ones(2, 2, dtype=torch.float64), batch_dims=1)
    >>> info.iterations_per_sample.tolist(), bool(torch.allclose(xs[1], x))
    ([2, 3], True)
    """

    name: ClassVar[str] = "cg"
    symmetric: ClassVar[bool] = True
    batched: ClassVar[bool] = True
    #: reports ``info.symmetry_defect`` (measured on its own search directions, no extra product)
    reports_symmetry: ClassVar[bool] = True

    def _solve(self, matvec, b, x0, rtol, atol):
        thresh = max(rtol * _norm(b), atol)
        x, r, its = _start(matvec, b, x0)
        # on the CPU the step sizes are host floats (two host reads per iteration cost less than the
        # tensor arithmetic they replace); elsewhere they stay on the device (one read per iteration)
        x, its, defect = (_cg_host if b.device.type == "cpu" else _cg_device)(matvec, x, r, its, thresh, self.maxiter)
        res = _norm(b - matvec(x))
        its += 1
        return x, LinearSolveInfo("cg", its, res, thresh, res <= thresh * (1 + 1e-6), symmetry_defect=defect)


    def _solve_batched(self, matvec, b, x0, bt, rtol, atol):
        return _cg_batched(matvec, b, x0, bt, rtol, atol, self.maxiter)


@dataclass(frozen=True)
class TorchOptCG(LinearSolver):
    """Conjugate gradients through ``torchopt.linalg.cg``, with this module's diagnostics.

    ``iterations`` counts the matrix products torchopt made plus one for the final true residual.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 1000).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).
        ImportError: (at the first solve) ``torchopt`` is not installed.

    >>> import torch
    >>> M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> x, info = TorchOptCG(rtol=1e-12)(lambda v: M @ v, torch.ones(2, dtype=torch.float64))
    >>> info.converged
    True
    """

    name: ClassVar[str] = "torchopt_cg"
    symmetric: ClassVar[bool] = True

    def _solve(self, matvec, b, x0, rtol, atol):
        import torchopt

        count = [0]

        def counted(v: Tensor) -> Tensor:
            count[0] += 1
            return matvec(v)

        thresh = max(rtol * _norm(b), atol)
        x = torchopt.linalg.cg(counted, b, x0=x0, rtol=rtol, atol=atol, maxiter=self.maxiter)
        res = _norm(b - counted(x))
        return x, LinearSolveInfo("torchopt_cg", count[0], res, thresh, res <= thresh * (1 + 1e-6))


@dataclass(frozen=True)
class GMRES(LinearSolver):
    """Restarted GMRES(``restart``) for general (nonsymmetric) systems.

    Arnoldi with classical Gram–Schmidt applied twice (numerically as stable as modified
    Gram–Schmidt, two matrix products per step instead of ``j``); the small least-squares problem
    is solved with Givens rotations on the host. Memory: ``restart + 1`` vectors.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 1000).
        restart: the Krylov subspace dimension of a cycle (an integer >= 1).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).

    >>> import torch
    >>> M = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    >>> x, info = GMRES()(lambda v: M @ v, torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> [round(t, 10) for t in x.tolist()], info.converged
    ([1.0, 1.0], True)
    """

    restart: int = 50

    name: ClassVar[str] = "gmres"
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.restart
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"GMRES: restart must be an integer >= 1, got {r!r}")

    def _solve(self, matvec, b, x0, rtol, atol):
        maxiter = self.maxiter
        shape = b.shape
        bf = b.reshape(-1)
        n = bf.numel()

        def mv(v: Tensor) -> Tensor:
            return matvec(v.view(shape)).reshape(-1)

        thresh = max(rtol * _norm(b), atol)
        x, r, its = _start(mv, bf, None if x0 is None else x0.reshape(-1))
        beta = _norm(r)
        while beta > thresh and its < maxiter:
            m = min(self.restart, maxiter - its, n)
            V = torch.empty(m + 1, n, dtype=bf.dtype, device=bf.device)
            V[0] = r / beta
            H = [[0.0] * m for _ in range(m + 1)]
            cs: list[float] = []
            sn: list[float] = []
            g = [beta] + [0.0] * m
            j_used = 0
            for j in range(m):
                w = mv(V[j])
                its += 1
                basis = V[: j + 1]
                h = basis @ w
                w = w - h @ basis
                h2 = basis @ w  # re-orthogonalise (CGS2)
                w = w - h2 @ basis
                h = h + h2
                hn_t = torch.linalg.vector_norm(w)
                col = torch.cat([h, hn_t.reshape(1)]).tolist()
                hn = col[-1]
                if hn > 0:
                    V[j + 1] = w / hn_t
                # apply previous rotations to the new column
                for i in range(j):
                    t = cs[i] * col[i] + sn[i] * col[i + 1]
                    col[i + 1] = -sn[i] * col[i] + cs[i] * col[i + 1]
                    col[i] = t
                denom = math.hypot(col[j], col[j + 1])
                c, s = (1.0, 0.0) if denom == 0 else (col[j] / denom, col[j + 1] / denom)
                cs.append(c)
                sn.append(s)
                col[j] = c * col[j] + s * col[j + 1]
                col[j + 1] = 0.0
                g[j + 1] = -s * g[j]
                g[j] = c * g[j]
                for i in range(j + 2):
                    H[i][j] = col[i]
                j_used = j + 1
                if abs(g[j + 1]) <= thresh or hn == 0 or its >= maxiter:
                    break
            # back substitution H[:k,:k] y = g[:k]
            k = j_used
            y = [0.0] * k
            for i in range(k - 1, -1, -1):
                acc = g[i] - sum(H[i][jj] * y[jj] for jj in range(i + 1, k))
                y[i] = acc / H[i][i] if H[i][i] != 0 else 0.0
            x = x + torch.tensor(y, dtype=bf.dtype, device=bf.device) @ V[:k]
            r = bf - mv(x)
            its += 1
            new_beta = _norm(r)
            if not math.isfinite(new_beta) or (new_beta >= beta and k == 0):
                beta = new_beta
                break
            beta = new_beta
        return x.view(shape), LinearSolveInfo("gmres", its, beta, thresh, beta <= thresh)


    def _solve_batched(self, matvec, b, x0, bt, rtol, atol):
        return _gmres_batched(matvec, b, x0, bt, rtol, atol, self.maxiter, self.restart)


@dataclass(frozen=True)
class BiCGSTAB(LinearSolver):
    """BiCGSTAB (van der Vorst, 1992) for nonsymmetric systems in constant memory.

    Two matrix products per iteration; the reported residual is the true one at exit.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 1000).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).

    >>> import torch
    >>> M = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> x, info = BiCGSTAB(rtol=1e-12)(lambda v: M @ v, torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> [round(t, 10) for t in x.tolist()], info.converged
    ([1.0, 1.0], True)
    """

    name: ClassVar[str] = "bicgstab"

    def _solve(self, matvec, b, x0, rtol, atol):
        maxiter = self.maxiter
        thresh = max(rtol * _norm(b), atol)
        x, r, its = _start(matvec, b, x0)
        r_hat = r.clone()
        rho = alpha = omega = 1.0
        v = torch.zeros_like(b)
        p = torch.zeros_like(b)
        res = _norm(r)
        while res > thresh and its < maxiter:
            rho_new = float(_dot(r_hat, r))
            if rho_new == 0.0:  # breakdown: restart from the current residual
                r_hat = r.clone()
                rho_new = float(_dot(r_hat, r))
                p.zero_()
                v.zero_()
                rho = alpha = omega = 1.0
            beta = (rho_new / rho) * (alpha / omega)
            p = r + beta * (p - omega * v)
            v = matvec(p)
            its += 1
            denom = float(_dot(r_hat, v))
            if denom == 0.0:
                break
            alpha = rho_new / denom
            s = r - alpha * v
            if _norm(s) <= thresh:
                x = x + alpha * p
                r = s
                res = _norm(r)
                break
            t = matvec(s)
            its += 1
            tt = float(_dot(t, t))
            omega = float(_dot(t, s)) / tt if tt > 0 else 0.0
            x = x + alpha * p + omega * s
            r = s - omega * t
            rho = rho_new
            res = _norm(r)
            if omega == 0.0 or not math.isfinite(res):
                break
        # report the true residual, not the recurrence's
        true_res = _norm(b - matvec(x))
        its += 1
        return x, LinearSolveInfo("bicgstab", its, true_res, thresh, true_res <= thresh * (1 + 1e-6))



@dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Richardson iteration :math:`x \leftarrow x + (b - A x)`.

    For the adjoint system :math:`A = I - J^\top` this is the Neumann series
    :math:`v \leftarrow b + J^\top v`, which converges linearly with rate :math:`\rho(J)` when T
    is a contraction. One matrix product per iteration, constant memory.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 10000).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).

    >>> import torch
    >>> J = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    >>> x, info = Neumann(rtol=1e-12)(lambda v: v - J.T @ v, torch.ones(2, dtype=torch.float64))
    >>> info.converged
    True
    """

    maxiter: int = 10000

    name: ClassVar[str] = "fixed_point"
    batched: ClassVar[bool] = True

    def _solve(self, matvec, b, x0, rtol, atol):
        maxiter = self.maxiter
        thresh = max(rtol * _norm(b), atol)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        its = 0
        res = math.inf
        r = b if x0 is None else None
        while its < maxiter:
            if r is None:
                r = b - matvec(x)
                its += 1
            res = _norm(r)
            if res <= thresh or not math.isfinite(res) or its >= maxiter:  # (x: the iterate res measures)
                break
            x = x + r
            r = None
        return x, LinearSolveInfo("fixed_point", its, res, thresh, res <= thresh)


    def _solve_batched(self, matvec, b, x0, bt, rtol, atol):
        return _fixed_point_batched(matvec, b, x0, bt, rtol, atol, self.maxiter)


@dataclass(frozen=True)
class AndersonSolve(LinearSolver):
    r"""The Richardson / Neumann iteration of :class:`Neumann`, Anderson-accelerated.

    The map :math:`x \mapsto x + (b - Ax)` (for the adjoint system :math:`v \mapsto b + J^\top v`)
    with :class:`~hodl_plugin.acceleration.Anderson` (type II, ``history_size`` differences); on a
    linear map this is a restarted-GMRES-like Krylov method with the Neumann series' one product
    per iteration. The residual :math:`b - Ax` is the map's own residual, so convergence is
    tested on the true residual at no extra product. Also by name: ``Implicit("anderson")``.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 10000).
        history_size: m, the number of past differences Anderson uses.

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).
        ValueError: (at the first solve) ``history_size`` is not an integer >= 1.

    >>> import torch
    >>> J = torch.tensor([[0.99, 0.1], [0.0, 0.95]], dtype=torch.float64)
    >>> x, info = AndersonSolve(rtol=1e-12)(lambda v: v - J.T @ v, torch.ones(2, dtype=torch.float64))
    >>> info.converged, info.iterations < 20                  # 8 on the CPU; plain Neumann: 2812
    (True, True)
    """

    maxiter: int = 10000
    history_size: int = 5

    name: ClassVar[str] = "anderson"

    def _solve(self, matvec, b, x0, rtol, atol):
        from .acceleration import Anderson

        acc = Anderson(history_size=self.history_size)
        thresh = max(rtol * _norm(b), atol)
        x, r, its = _start(matvec, b, x0)
        state = acc.init(x, 0)
        res = _norm(r)
        while its < self.maxiter and res > thresh and math.isfinite(res):
            x = acc.step(state, x, r, torch.linalg.vector_norm(r), 1.0)
            r = b - matvec(x)
            its += 1
            res = _norm(r)
        return x, LinearSolveInfo("anderson", its, res, thresh, res <= thresh)


@dataclass(frozen=True)
class FunctionSolver(LinearSolver):
    """Your own solver ``fn(matvec, b, x0=None)`` returning ``x`` or ``(x, info)``.

    The true residual ``‖b - A x‖`` is computed (one more product) and compared with
    ``max(rtol·‖b‖, atol)``, so a solver that returns a poor ``x`` is reported, not trusted.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix (default 1000).
        fn: the solver ``fn(matvec, b, x0=None)``; ``matvec`` counts the products it makes
            (``x0`` is a warm start or ``None``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range (at construction).
        TypeError: ``fn`` is not callable (at construction), or it returns something other than ``x``
            shaped like ``b`` (at a solve).

    >>> import torch
    >>> M = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> exact = lambda matvec, b, x0=None: b / torch.tensor([2.0, 4.0], dtype=b.dtype)
    >>> x, info = FunctionSolver(fn=exact)(lambda v: M @ v, torch.ones(2, dtype=torch.float64))
    >>> x.tolist(), info.converged
    ([0.5, 0.25], True)
    """

    fn: Optional[Callable[..., Any]] = None

    name: ClassVar[str] = "function"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.fn):
            raise TypeError(f"FunctionSolver(fn=...) needs a callable fn(matvec, b, x0=None), got {self.fn!r}")

    def _solve(self, matvec, b, x0, rtol, atol):
        count = [0]

        fn_name = getattr(self.fn, "__name__", self.fn)
        like = (tuple(b.shape), b.dtype, str(b.device))

        def counted(v: Tensor) -> Tensor:
            count[0] += 1
            if not isinstance(v, Tensor) or v.shape != b.shape:
                raise ValueError(
                    f"the linear solver {fn_name!r} asked for a product with "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, but the system's vectors are "
                    f"shaped like b {tuple(b.shape)} (with batch_dims, b holds the whole batch: matvec acts on all "
                    "samples at once)"
                )
            return matvec(v)

        out = self.fn(counted, b, x0)
        x = out[0] if isinstance(out, tuple) else out
        if not isinstance(x, Tensor) or x.shape != b.shape or x.dtype != b.dtype or x.device != b.device:
            got = (tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"the linear solver {fn_name!r} must return x like b {like} (or (x, info)), got {got}"
            )
        thresh = max(rtol * _norm(b), atol)
        res = _norm(b - counted(x))
        name = getattr(self.fn, "__name__", "function")
        return x, LinearSolveInfo(name, count[0], res, thresh, res <= thresh * (1 + 1e-6))



# ------------------------------------------------------------------------------------------------
# the checks around a solve of an implicit derivative (LinearSolver._solve_checked)
# ------------------------------------------------------------------------------------------------
def _equilibrate(solver: LinearSolver, b: Tensor, samples: int) -> Optional[Tensor]:
    """Per-sample powers of 2 at each sample's largest entry, for a batch of independent systems solved as
    one by a solver without a per-sample mode and with a relative tolerance: its one threshold then gives
    every sample about ``rtol·√B`` relative accuracy, not only the largest (``info.adjoint`` reports the
    scaled system). ``None`` with an absolute tolerance, or under ``torch.func`` transforms."""
    if solver.atol or not b.is_floating_point() or transforms_active():
        return None
    return _pow2_scale(b.detach().abs().amax(dim=tuple(range(samples, b.dim())), keepdim=True))


def better_than_zero(x0: Tensor, b: Tensor, Ax0: Tensor, batch_dims: int) -> Optional[Tensor]:
    r""":math:`x_0` where :math:`\|b - Ax_0\| < \|b\|`, else 0 — per sample over ``batch_dims``
    leading dims (``None`` when no sample keeps its warm start)."""
    dims = tuple(range(batch_dims, b.dim()))
    keep = torch.linalg.vector_norm(b - Ax0, dim=dims) < torch.linalg.vector_norm(b, dim=dims)
    if not bool(keep.any()):
        return None
    if batch_dims == 0:
        return x0
    return torch.where(keep.reshape(keep.shape + (1,) * (b.dim() - batch_dims)), x0, torch.zeros_like(x0))


def symmetry_tol(dtype: torch.dtype) -> float:
    """The relative asymmetry ``|⟨a, Ac⟩ - ⟨Aa, c⟩|`` above which a matrix is not symmetric."""
    return 1e3 * torch.finfo(dtype).eps ** 0.75


def _asymmetric(solver: LinearSolver, defect: float, where: str) -> LinearSolveError:
    return LinearSolveError(
        f"solver={solver.name!r} needs a symmetric dT/du, but <a, (I-J)c> - <(I-J)a, c> = {defect:.3e} "
        f"(relative) for {where}: the operator is not symmetric. Declare symmetric_jacobian = False on it, or "
        "pass solver='gmres' to the implicit/inexact mode"
    )


def check_symmetric(matvec: MatVec, b: Tensor, solver: LinearSolver) -> None:
    """A solver for symmetric matrices (CG) gets one: test ``⟨a, A c⟩ = ⟨A a, c⟩`` on two random
    vectors (two products)."""
    gen = torch.Generator(device=b.device).manual_seed(1234)
    a = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    c = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    lhs, rhs = float((a * matvec(c)).sum()), float((matvec(a) * c).sum())
    scale = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(c))
    if abs(lhs - rhs) > symmetry_tol(b.dtype) * max(scale, 1e-300):
        raise _asymmetric(solver, (lhs - rhs) / max(scale, 1e-300), "random a, c")


def verify_symmetric(matvec: MatVec, b: Tensor, solver: LinearSolver,
                     info: LinearSolveInfo) -> None:
    """After a solve by a solver that reports ``info.symmetry_defect`` (CG, on its first two search
    directions): raise if the matrix is not symmetric. A solve that converged is right whatever the matrix
    (its true residual says so); one that did not is also tested on two random vectors (the first search
    directions span little of the space and may miss an asymmetry elsewhere)."""
    if info.symmetry_defect is not None and info.symmetry_defect > symmetry_tol(b.dtype):
        raise _asymmetric(solver, info.symmetry_defect, "CG's first two search directions a, c")
    if not info.converged:  # (the first directions may miss an asymmetry elsewhere: random ones too)
        check_symmetric(matvec, b, solver)


def check_nonsingular(matvec: MatVec, b: Tensor, solver: LinearSolver,
                       depth: int, symmetry: bool = False) -> None:
    r"""Solve :math:`A^\top z = r` for a random :math:`r` with the adjoint's own solver and tolerance.

    When Fix T is not a singleton, :math:`A` is singular and a random right-hand side has a
    component outside its range, so the solve cannot converge; the adjoint's own right-hand side may
    lie in the range (a *consistent* system, which Krylov solvers answer with the minimum-norm
    solution) and would not show it. Costs one more solve.
    """
    gen = torch.Generator(device=b.device).manual_seed(4321)
    r = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    _, info = solver._call(matvec, r, None, depth)
    if symmetry:  # an asymmetric matrix also fails this solve: say which it is
        verify_symmetric(matvec, r, solver, info)
    if not info.converged:
        where = ""
        if info.converged_per_sample is not None:  # a batch: which samples
            bad = (~info.converged_per_sample).reshape(-1).nonzero().flatten().tolist()
            where = f" (samples {bad[:8]}{'...' if len(bad) > 8 else ''} of the batch)"
        how = (f"residual {info.residual:.2e} > {info.threshold:.2e}" if math.isfinite(info.residual)
               else "it broke down: a zero or NaN inner product, as on a singular matrix")
        raise LinearSolveError(
            f"I - dT/du is singular (or too ill-conditioned for the adjoint tolerance) at the fixed point{where}: "
            f"{info.method} could not solve (I - dT/du)^T z = r for a random r ({how}, "
            f"after {info.iterations} products). Fix T is then not a singleton and the "
            "implicit hypergradient is undefined: differentiate the (aggregated) iteration with "
            "hypergrad='unrolled' or 'truncated', as HODL does (check_unique=False skips this test)"
        )


def _symmetry_defect(p0: Tensor, Ap0: Tensor, p1: Tensor, Ap1: Tensor) -> float:
    r""":math:`|\langle p_1, Ap_0\rangle - \langle Ap_1, p_0\rangle| / (\|p_1\|\|Ap_0\| + \|Ap_1\|\|p_0\|)`
    (zero for a symmetric matrix up to rounding; CG's directions are A-conjugate only if it is)."""
    v = torch.stack([_dot(p1, Ap0), _dot(Ap1, p0), _dot(p0, p0), _dot(Ap0, Ap0), _dot(p1, p1), _dot(Ap1, Ap1)])
    a, c, n0, m0, n1, m1 = v.real.tolist()
    scale = math.sqrt(max(n1, 0.0) * max(m0, 0.0)) + math.sqrt(max(m1, 0.0) * max(n0, 0.0))
    return abs(a - c) / scale if scale > 0 else 0.0


def _cg_host(matvec: MatVec, x: Tensor, r: Tensor, its: int, thresh: float,
             maxiter: int) -> tuple[Tensor, int, Optional[float]]:
    """The CG loop with host-float step sizes; returns ``(x, products, symmetry defect)``."""
    p = r
    rs = float(_dot(r, r))
    thresh2 = thresh * thresh
    first: Optional[tuple[Tensor, Tensor]] = None
    defect: Optional[float] = None
    n = 0
    while its < maxiter and rs > thresh2:
        Ap = matvec(p)
        its += 1
        n += 1
        if n == 1:
            first = (p, Ap)
        elif n == 2 and first is not None:
            defect = _symmetry_defect(first[0], first[1], p, Ap)
        pAp = float(_dot(p, Ap))
        if pAp == 0 or not math.isfinite(pAp):  # breakdown (or NaN): stop here, the true residual says
            break
        alpha = rs / pAp
        x = x.add(p, alpha=alpha)
        r = r.add(Ap, alpha=-alpha)
        rs_new = float(_dot(r, r))
        p = r.add(p, alpha=rs_new / rs)
        rs = rs_new
    return x, its, defect


def _cg_device(matvec: MatVec, x: Tensor, r: Tensor, its: int, thresh: float,
               maxiter: int) -> tuple[Tensor, int, Optional[float]]:
    """The CG loop with step sizes on the device (one host read per iteration)."""
    p = r
    rs = _dot(r, r)
    thresh2 = thresh * thresh
    first: Optional[tuple[Tensor, Tensor]] = None
    defect: Optional[float] = None
    n = 0
    while its < maxiter and float(rs) > thresh2:
        Ap = matvec(p)
        its += 1
        n += 1
        if n == 1:
            first = (p, Ap)
        elif n == 2 and first is not None:
            defect = _symmetry_defect(first[0], first[1], p, Ap)
        alpha = rs / _dot(p, Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, its, defect


def _cg_batched(matvec: MatVec, b: Tensor, x0: Optional[Tensor], bt: _Batch, rtol: float, atol: float,
                maxiter: int) -> tuple[Tensor, LinearSolveInfo]:
    """:func:`cg` on a batch of systems: per-sample step sizes and stopping; a converged sample
    gets step 0 (it stops changing). One host sync per iteration (``any`` sample still active)."""
    thresh = (rtol * bt.norm(b)).clamp(min=atol)
    x, r, its0 = _start(matvec, b, x0)
    its = torch.full(thresh.shape, its0, dtype=torch.long, device=b.device)
    p = r.clone()
    rs = bt.dot(r, r).real
    thresh2 = thresh * thresh
    active = rs > thresh2
    n = its0
    while n < maxiter and bool(active.any()):
        Ap = matvec(p)
        n += 1
        its = its + active
        pAp = bt.dot(p, Ap).real
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        x = x + bt.ex(alpha, x) * p
        r = r - bt.ex(alpha, r) * Ap
        rs_new = torch.where(active, bt.dot(r, r).real, rs)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(bt.ex(active, p), r + bt.ex(beta, p) * p, p)
        rs = rs_new
        active = active & (rs > thresh2)
    res = bt.norm(b - matvec(x))
    its = its + 1
    return x, bt.info("cg", its, res, thresh, res <= thresh * (1 + 1e-6))


def _gmres_batched(matvec: MatVec, b: Tensor, x0: Optional[Tensor], bt: _Batch, rtol: float, atol: float,
                   maxiter: int, restart: int) -> tuple[Tensor, LinearSolveInfo]:
    """:func:`gmres` on a batch of systems: one batched Arnoldi process (per-sample Gram–Schmidt
    coefficients), the samples' Givens rotations and least squares batched on the host in float64 (one
    sync per step, as unbatched). The rotations so far are kept as one orthogonal matrix per sample,
    :math:`Q_j^\top`, so a step applies them to the new Hessenberg column in one batched product. A sample
    stops extending its basis when its own residual estimate meets its threshold; samples that have
    converged keep ``x`` (their correction is 0)."""
    shape, S = b.shape, b.shape[: bt.bd]
    nb = math.prod(S)
    bf = b.reshape(nb, -1)
    n = bf.shape[1]
    f64 = dict(dtype=torch.float64)

    def mv(v: Tensor) -> Tensor:
        return matvec(v.reshape(shape)).reshape(nb, n)

    floor = atol.reshape(-1) if isinstance(atol, Tensor) else atol  # a scalar, or one per sample
    thresh_t = (rtol * torch.linalg.vector_norm(bf, dim=1)).clamp(min=floor)
    thresh = thresh_t.detach().cpu().to(**f64)
    x, r, its0 = _start(mv, bf, None if x0 is None else x0.reshape(nb, n))
    its = torch.full((nb,), its0, dtype=torch.long)
    beta_t = torch.linalg.vector_norm(r, dim=1)
    beta = beta_t.detach().cpu().to(**f64)
    active = beta > thresh
    total = its0
    while bool(active.any()) and total < maxiter:
        m = min(restart, maxiter - total, n)
        V = torch.zeros(nb, m + 1, n, dtype=bf.dtype, device=bf.device)
        V[:, 0] = r / torch.where(beta_t > 0, beta_t, torch.ones_like(beta_t)).unsqueeze(1)
        R = torch.zeros(nb, m + 1, m, **f64)  # the rotated Hessenberg columns (upper triangular)
        QT = torch.eye(m + 1, **f64).repeat(nb, 1, 1)  # the rotations so far, one orthogonal matrix per sample
        g = torch.zeros(nb, m + 1, **f64)  # Qᵀ β e₁: its entry j+1 is the residual estimate after step j
        g[:, 0] = beta
        k = torch.zeros(nb, dtype=torch.long)
        going = active.clone()
        for j in range(m):
            w = mv(V[:, j])
            total += 1
            basis = V[:, : j + 1]
            h = torch.bmm(basis, w[:, :, None])  # (nb, j + 1, 1)
            w = w - torch.bmm(h.mT, basis)[:, 0]
            h2 = torch.bmm(basis, w[:, :, None])  # re-orthogonalise (CGS2)
            w = w - torch.bmm(h2.mT, basis)[:, 0]
            hn_t = torch.linalg.vector_norm(w, dim=1)
            V[:, j + 1] = w / torch.where(hn_t > 0, hn_t, torch.ones_like(hn_t)).unsqueeze(1)
            col = torch.cat([(h + h2)[..., 0], hn_t.unsqueeze(1)], dim=1).detach().cpu().to(**f64)  # one sync
            col[:, : j + 1] = torch.bmm(QT[:, : j + 1, : j + 1], col[:, : j + 1, None])[..., 0]
            a, c_ = col[:, j], col[:, j + 1]
            denom = torch.hypot(a, c_)
            safe = torch.where(denom == 0, torch.ones_like(denom), denom)
            cs, sn = torch.where(denom == 0, 1.0, a / safe), torch.where(denom == 0, 0.0, c_ / safe)
            col[:, j], col[:, j + 1] = cs * a + sn * c_, 0.0
            rj, rj1 = QT[:, j].clone(), QT[:, j + 1].clone()
            QT[:, j], QT[:, j + 1] = cs[:, None] * rj + sn[:, None] * rj1, cs[:, None] * rj1 - sn[:, None] * rj
            gj = g[:, j].clone()
            g[:, j], g[:, j + 1] = cs * gj, -sn * gj
            R[:, : j + 2, j] = col  # (a column past a sample's own k is never read: y is 0 there)
            k = torch.where(going, j + 1, k)
            its += going
            going = going & ~(g[:, j + 1].abs() <= thresh)  # (a breakdown, h_{j+1} = 0, gives g_{j+1} = 0)
            if total >= maxiter or not bool(going.any()):
                break
        # back substitution R[:k, :k] y = g[:k], every sample at once (y = 0 beyond its own k)
        y = torch.zeros(nb, m, **f64)
        for q in range(m - 1, -1, -1):
            acc = g[:, q] - (R[:, q, q + 1 :] * y[:, q + 1 :]).sum(1)
            d = R[:, q, q]
            y[:, q] = torch.where((q < k) & (d != 0), acc / torch.where(d != 0, d, torch.ones_like(d)), 0.0)
        x = x + torch.einsum("bk,bkn->bn", y.to(dtype=bf.dtype, device=bf.device), V[:, :m])
        r = bf - mv(x)
        total += 1
        new_t = torch.linalg.vector_norm(r, dim=1)
        new = new_t.detach().cpu().to(**f64)
        beta_t = torch.where(active.to(bf.device), new_t, beta_t)
        its += active
        beta = torch.where(active, new, beta)
        active = active & torch.isfinite(new) & (new > thresh)
    its_t = its.to(b.device).reshape(S)
    res = beta.to(dtype=thresh_t.dtype, device=b.device).reshape(S)
    th = thresh_t.reshape(S)
    return x.reshape(shape), bt.info("gmres", its_t, res, th, res <= th)


def _fixed_point_batched(matvec: MatVec, b: Tensor, x0: Optional[Tensor], bt: _Batch, rtol: float,
                         atol: float, maxiter: int) -> tuple[Tensor, LinearSolveInfo]:
    """:func:`fixed_point` on a batch of systems: a sample whose residual met its threshold (or
    became non-finite) stops changing and counting products."""
    thresh = (rtol * bt.norm(b)).clamp(min=atol)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    its = torch.zeros(thresh.shape, dtype=torch.long, device=b.device)
    active = torch.ones(thresh.shape, dtype=torch.bool, device=b.device)
    res = torch.full_like(thresh, math.inf)
    r: Optional[Tensor] = b if x0 is None else None
    n = 0
    while n < maxiter:
        if r is None:
            r = b - matvec(x)
            n += 1
            its = its + active
        res = torch.where(active, bt.norm(r), res)
        active = active & (res > thresh) & torch.isfinite(res)
        if not bool(active.any()) or n >= maxiter:  # (x: the iterates res measures)
            break
        x = torch.where(bt.ex(active, x), x + r, x)
        r = None
    return x, bt.info("fixed_point", its, res, thresh, res <= thresh)


def cg(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 1000) -> CG:
    """:class:`CG` with these options.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.

    Returns:
        The configured :class:`CG` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range.

    >>> import torch
    >>> x, info = cg(rtol=1e-12)(lambda v: torch.tensor([2.0, 4.0], dtype=v.dtype) * v,
    ...                          torch.ones(2, dtype=torch.float64))
    >>> x.tolist(), info.converged
    ([0.5, 0.25], True)
    >>> cg(rtol=1e-8)
    CG(rtol=1e-08, atol=0.0, maxiter=1000)
    """
    return CG(rtol=rtol, atol=atol, maxiter=maxiter)


def torchopt_cg(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 1000) -> TorchOptCG:
    """:class:`TorchOptCG` with these options (needs ``torchopt``).

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.

    Returns:
        The configured :class:`TorchOptCG` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range.

    >>> import torch
    >>> M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> x, info = torchopt_cg(rtol=1e-12)(lambda v: M @ v, torch.tensor([2.5, 1.5], dtype=torch.float64))
    >>> [round(t, 10) for t in x.tolist()], info.converged
    ([1.0, 1.0], True)
    """
    return TorchOptCG(rtol=rtol, atol=atol, maxiter=maxiter)


def gmres(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 1000, restart: int = 50) -> GMRES:
    """:class:`GMRES` with these options.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.
        restart: the Krylov subspace dimension of a cycle.

    Returns:
        The configured :class:`GMRES` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` or ``restart`` out of range.

    >>> import torch
    >>> M = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)       # nonsymmetric
    >>> x, info = gmres(rtol=1e-12, restart=2)(lambda v: M @ v, torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> [round(t, 10) for t in x.tolist()], info.converged
    ([1.0, 1.0], True)
    >>> gmres(restart=20).restart
    20
    """
    return GMRES(rtol=rtol, atol=atol, maxiter=maxiter, restart=restart)


def bicgstab(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 1000) -> BiCGSTAB:
    """:class:`BiCGSTAB` with these options.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.

    Returns:
        The configured :class:`BiCGSTAB` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range.

    >>> import torch
    >>> M = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> x, info = bicgstab(rtol=1e-12)(lambda v: M @ v, torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> [round(t, 10) for t in x.tolist()], info.converged
    ([1.0, 1.0], True)
    """
    return BiCGSTAB(rtol=rtol, atol=atol, maxiter=maxiter)


def fixed_point(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 10000) -> Neumann:
    r""":class:`Neumann` (the Neumann series) with these options; also named ``neumann``.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.

    Returns:
        The configured :class:`Neumann` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range.

    Like every solver here, ``matvec`` applies the matrix :math:`A = I - J^\top` of the system itself (not
    :math:`J^\top`); the series runs on :math:`I - A`, and converges when that is a contraction.

    Example — :math:`(I - J^\top)v = b` with :math:`J = \tfrac14 I`, so ``matvec`` is :math:`\tfrac34 v` and
    :math:`v = \tfrac43 b`, the series :math:`\sum_k J^k b` to ``rtol``:

    >>> import torch
    >>> v, info = fixed_point(rtol=1e-12)(lambda v: 0.75 * v, torch.ones(2, dtype=torch.float64))
    >>> [round(t, 10) for t in v.tolist()], info.converged
    ([1.3333333333, 1.3333333333], True)
    """
    return Neumann(rtol=rtol, atol=atol, maxiter=maxiter)


#: the Neumann-series solver of the adjoint system
neumann = fixed_point


def anderson_fixed_point(rtol: Optional[float] = None, atol: float = 0.0, maxiter: int = 10000,
                         history_size: int = 5) -> AndersonSolve:
    """:class:`AndersonSolve` with these options.

    Args:
        rtol: relative tolerance, ``‖b - Ax‖ ≤ max(rtol·‖b‖, atol)``; ``None`` follows the dtype
            (:func:`default_rtol`).
        atol: absolute tolerance.
        maxiter: the most products with the matrix.
        history_size: m, the number of past differences Anderson uses.

    Returns:
        The configured :class:`AndersonSolve` (immutable; ``solver(matvec, b, x0=None) -> (x, info)``).

    Raises:
        ValueError: a tolerance or ``maxiter`` out of range.

    >>> import torch
    >>> J = torch.tensor([[0.99, 0.1], [0.0, 0.95]], dtype=torch.float64)
    >>> b = torch.ones(2, dtype=torch.float64)
    >>> v, info = anderson_fixed_point(rtol=1e-12)(lambda v: v - J.T @ v, b)
    >>> bool(torch.allclose(v - J.T @ v, b, atol=1e-10)), info.converged
    (True, True)
    """
    return AndersonSolve(rtol=rtol, atol=atol, maxiter=maxiter, history_size=history_size)


_BY_NAME: dict[str, type[LinearSolver]] = {
    "cg": CG,
    "torchopt_cg": TorchOptCG,
    "gmres": GMRES,
    "bicgstab": BiCGSTAB,
    "fixed_point": Neumann,
    "neumann": Neumann,
    "anderson": AndersonSolve,
}


def get(name: str, **options: Any) -> LinearSolver:
    """A solver by name: ``"cg"``, ``"torchopt_cg"``, ``"gmres"``, ``"bicgstab"``,
    ``"fixed_point"``/``"neumann"``, ``"anderson"``.

    Args:
        name: the solver's name.
        **options: its options (``rtol``, ``atol``, ``maxiter``, and ``restart`` / ``history_size``).

    Returns:
        The configured :class:`LinearSolver`.

    Raises:
        ValueError: an unknown name, or an option out of range.
        TypeError: an option the solver does not take.

    >>> get("gmres", rtol=1e-8)
    GMRES(rtol=1e-08, atol=0.0, maxiter=1000, restart=50)
    """
    try:
        cls = _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown linear solver {name!r}; choose one of {sorted(_BY_NAME)}") from None
    return cls(**options)


SolverLike = Union[str, LinearSolver, Callable[..., Any], None]


def as_solver(spec: SolverLike, default: str = "gmres") -> LinearSolver:
    """A :class:`LinearSolver` from a name, a solver object, or a function ``fn(matvec, b, x0=None)``
    (wrapped in :class:`FunctionSolver`); ``None`` gives ``default``.

    Args:
        spec: a name (:func:`get`), a :class:`LinearSolver` object or class, a function
            ``fn(matvec, b, x0=None)``, or ``None``.
        default: the name used for ``None``.

    Returns:
        The :class:`LinearSolver` (``spec`` itself when it is one).

    Raises:
        ValueError: an unknown name.
        TypeError: ``spec`` is none of these, or a solver factory such as :func:`cg` itself (pass
            ``cg(rtol=...)``, its result).

    >>> as_solver("cg"), as_solver(None).name
    (CG(rtol=None, atol=0.0, maxiter=1000), 'gmres')
    >>> as_solver(lambda matvec, b, x0=None: b).name
    'function'
    """
    if spec is None:
        return get(default)
    if isinstance(spec, LinearSolver):
        return spec
    if isinstance(spec, str):
        return get(spec)
    if isinstance(spec, type) and issubclass(spec, LinearSolver):
        return spec()
    if callable(spec):
        import inspect

        try:
            names = list(inspect.signature(spec).parameters)
        except (TypeError, ValueError):
            names = []
        if "rtol" in names and "matvec" not in names:
            raise TypeError(
                f"{getattr(spec, '__name__', spec)!r} looks like a solver factory f(rtol=, atol=, maxiter=); "
                "pass a configured solver instead, e.g. hp.linear_solve.cg(rtol=1e-12), or a function "
                "solve(matvec, b, x0=None)"
            )
        return FunctionSolver(fn=spec)
    raise TypeError(
        f"solver must be a name ({sorted(_BY_NAME)}), a hp.linear_solve solver object or a function "
        f"solve(matvec, b, x0=None), got {spec!r}"
    )


def configure(solver: SolverLike, rtol: Optional[float], atol: Optional[float],
              maxiter: Optional[int]) -> Any:
    """The adjoint solver of a method: ``solver`` (``None``: chosen per operator by :func:`for_operator`)
    with the ``adjoint_*`` options applied; a tolerance given twice is refused.

    Args:
        solver: as for :func:`as_solver`, or ``None`` (CG or GMRES, chosen per operator).
        rtol, atol, maxiter: the ``adjoint_rtol`` / ``adjoint_atol`` / ``adjoint_maxiter`` options of
            the method; ``None`` keeps the solver's own.

    Returns:
        The configured :class:`LinearSolver`; with ``solver=None``, ``None`` (no options) or the
        options deferred until :func:`for_operator` knows the operator.

    Raises:
        ConfigurationError: a solver object that already sets an option given here too.
        ValueError: an option out of range (named as the ``adjoint_*`` argument).

    >>> configure("cg", 1e-8, None, None)
    CG(rtol=1e-08, atol=0.0, maxiter=1000)
    >>> configure(cg(rtol=1e-6), 1e-8, None, None)
    Traceback (most recent call last):
    ...
    hodl_plugin.errors.ConfigurationError: the solver CG(rtol=1e-06, atol=0.0, maxiter=1000) already sets ['rtol']; ...
    """
    changes = {k: v for k, v in (("rtol", rtol), ("atol", atol), ("maxiter", maxiter)) if v is not None}
    if solver is None:  # the defaults of the solver chosen per operator are no change
        changes = {k: v for k, v in changes.items() if v != getattr(GMRES(), k)}
    try:  # validated now, named as the user wrote them
        GMRES(**{"rtol": None, **changes})
    except ValueError as e:
        field = next((k for k in ("rtol", "atol", "maxiter") if f"{k} " in str(e) or f"{k} and" in str(e)), "rtol")
        raise ValueError(str(e).replace("GMRES: ", "").replace(field, f"adjoint_{field}", 1)) from None
    if solver is None:
        base = None
    else:
        base = as_solver(solver)
    if isinstance(base, LinearSolver) and isinstance(solver, LinearSolver):
        defaults = {f.name: f.default for f in dataclasses.fields(solver)}
        clash = [k for k in changes if getattr(solver, k) != defaults.get(k)]
        if clash:
            raise ConfigurationError(
                f"the solver {solver!r} already sets {clash}; give each tolerance once, either in the solver "
                f"(hp.linear_solve.{type(solver).__name__.lower()}(rtol=...)) or as adjoint_rtol=/adjoint_atol="
                "/adjoint_maxiter="
            )
    if base is None:  # applied to the solver chosen per operator
        return None if not changes else _Deferred(changes)  # type: ignore[return-value]
    return base.replace(**changes) if changes else base


@dataclass(frozen=True)
class _Deferred:
    """Options for the solver chosen per operator (CG or GMRES), applied when it is known."""

    changes: dict

    def __repr__(self) -> str:
        return "auto(" + ", ".join(f"{k}={v!r}" for k, v in self.changes.items()) + ")"


def for_operator(solver: Any, T: Any) -> LinearSolver:
    """The solver of a call: the configured one, else CG for a symmetric Jacobian, else GMRES.

    Args:
        solver: what :func:`configure` returned.
        T: the operator; its ``symmetric_jacobian`` attribute (absent: false) chooses CG.

    Returns:
        The :class:`LinearSolver` of the adjoint solves.

    >>> import hodl_plugin as hp
    >>> step = hp.GradientStep(objective=lambda u: 0.5 * (u ** 2).sum(), step=0.5)
    >>> for_operator(None, step), for_operator(configure(None, 1e-8, None, None), lambda u: u)
    (CG(rtol=None, atol=0.0, maxiter=1000), GMRES(rtol=1e-08, atol=0.0, maxiter=1000, restart=50))
    """
    if isinstance(solver, LinearSolver):
        return solver
    base = CG() if getattr(T, "symmetric_jacobian", False) else GMRES()
    return base.replace(**solver.changes) if isinstance(solver, _Deferred) else base
