r"""Per-sample Anderson acceleration: ``batch_dims > 0``, or one problem under ``torch.func`` transforms.

Every sample :math:`b` runs the iteration of :mod:`~hodl_plugin.acceleration.anderson` on its own
history (its own :math:`\gamma_b`, restarts and safeguard), and one step does the work of all samples
at once: the newest secant pair of every sample goes into slot :math:`i = k \bmod m` of a
preallocated ring buffer ``W`` of shape ``(B, m, 2n)`` (rows :math:`[\Delta u, \Delta f]`), the raw
Gram matrices :math:`G_b = \Delta F_b^\top\Delta F_b` gain that row and column from one batched
product (which also gives :math:`\Delta F_b^\top f_b`), the column scaling
:math:`D_b^{-1} = \mathrm{diag}(G_b)^{-1/2}` and the ridge are applied in the small
:math:`m\times m` space, one batched solve gives every :math:`\gamma_b` and the condition probe, and
one batched product gives every :math:`(\Delta U_b + \beta\Delta F_b)\gamma_b`. A converged sample the
loop keeps frozen arrives unchanged (:math:`\Delta f_b = 0`): it keeps its row of every buffer (no
gather, no re-indexing) and gets :math:`\gamma_b = 0`.

Two implementations of the same step:

- :class:`HostBatch` — CPU tensors run eagerly: numpy on views of the tensors (a small numpy
  operation costs a fraction of a torch one), decisions as Python branches on host arrays (reading a
  CPU array is no device sync); the :math:`m\times m` solves only for the samples that moved;
- :class:`MaskedBatch` — GPU tensors and ``torch.func`` transforms: torch operations only, every
  decision a mask, no host synchronisation (the buffers are allocated from the first iterate, so
  under ``vmap`` they are batched like it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _kernels
from .base import MaskedCounters, as_rows, normal_window, np, rescale, row_sq, solve

if TYPE_CHECKING:  # pragma: no cover
    from .anderson import Anderson


def _all(mask: Any) -> bool:
    """``mask.all()`` of a 1-d boolean array, without the method's Python wrapper."""
    return bool(np.logical_and.reduce(mask))


def _probe(m: int) -> list[float]:
    """The fixed, generic probe vector of the condition estimate (the same as the one-problem path)."""
    return [math.cos(2.3 * i + 0.4) for i in range(m)]


class HostBatch:
    r"""Per-sample Anderson state on the host (numpy); see the module docstring.

    The ring buffer keeps the raw pairs :math:`[\Delta u, \Delta f]` and ``G`` the raw Gram matrices
    with the relative ridge on the diagonal, :math:`\Delta F^\top\Delta F + \lambda\,\mathrm{diag}`
    — the scaled ridge matrix :math:`H = D^{-1}GD^{-1}` of the one-problem path without scaling any
    vector: :math:`(D^{-1}\Delta F^\top\Delta F D^{-1} + \lambda I)\,D\gamma = D^{-1}\Delta F^\top f`
    is :math:`G\gamma = \Delta F^\top f`, and the condition probe :math:`H^{-1}p = D\,G^{-1}Dp` rides
    along as a second right-hand side. A step is one product for the new Gram row and column and
    :math:`\Delta F^\top f` (whose result then holds both right-hand sides), one batched
    :math:`m\times m` solve, one product for the update: about 25 numpy operations.
    """

    #: the residual norms are taken here, in numpy (summed in float64), at every step
    measures_itself = True

    def __init__(self, acc: Anderson, u: Tensor, B: int) -> None:
        n = u.numel() // B if B else 0
        m = min(acc.history_size, max(n, 1))  # more differences than dimensions add nothing
        dt = np.float64 if u.dtype == torch.float64 else np.float32
        self.shape, self.B, self.n, self.m, self.steps, self.dtype = u.shape, B, n, m, 0, dt
        self.W = np.zeros((B, m, 2 * n), dt)  # ring buffer of [Δu, Δf] rows; zero rows are unused
        self.dU, self.dF = self.W[:, :, :n], self.W[:, :, n:]
        self.lam1 = 1.0 + acc.regularization
        self.I1 = np.eye(m, dtype=dt) * self.lam1  # the Gram matrix of an empty history
        self.G = np.repeat(self.I1[None], B, 0)  # ΔFᵀΔF + λ diag(ΔFᵀΔF); an empty slot: 1 + λ
        self.Gd = self.G.reshape(B, m * m)[:, :: m + 1]  # their diagonals (a view)
        self.X = np.empty((B, 2, n), dt)  # rows [Δf, f] of the step
        self.XT = self.X.transpose(0, 2, 1)  # ... as the columns of the product with ΔF
        self.probe = np.asarray(_probe(m), dt)
        # ‖D G⁻¹D p‖ with D² = diag G = (1 + λ) diag(ΔFᵀΔF) is (1 + λ)‖H⁻¹p‖: the limit takes the factor
        self.lim2 = (acc.restart_cond * self.lam1 * float(np.linalg.norm(self.probe)) / m) ** 2
        self.tiny, self.big = float(np.finfo(dt).tiny), float(np.finfo(dt).max)
        self.sg = acc.safeguard if math.isfinite(acc.safeguard) else None
        self.restarts = np.zeros(B, np.int64)
        self.up: Any = None  # the last accepted point and its residual, (B, n)
        self.fp: Any = None
        self.rlim: Any = None  # safeguard · its residual norm; the largest float after a fall-back
        self.scale: Any = None  # per-sample exponents e once a residual left the window (units of 2^-e)
        self.window = normal_window(dt)  # residual norms whose Gram entries stay inside the dtype's range
        # steps 2-4 as one compiled loop over the samples where numba is installed (the numpy code below
        # otherwise; acc._compiled = False forces it)
        self.kernel = _kernels.anderson() if getattr(acc, "_compiled", None) is not False and B and n else None
        self.gamma, self.ok = np.empty((B, m), dt), np.empty(B, bool)

    def _limit(self, r: Any) -> Any:
        return r * self.sg if self.sg is not None else np.full_like(r, self.big)

    def step(self, acc: Anderson, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        B, n = self.B, self.n
        un, fn = as_rows(u, B, n), as_rows(f, B, n)
        rn, normal = _kernels.norms(self, fn)  # (r, torch's, is given at checks only)
        mix = beta if acc.mixing is None else acc.mixing
        self.steps += 1
        if self.steps == 1:  # no history yet: the plain KM step
            self.up, self.fp, self.rlim = un, fn, self._limit(rn)
            return torch.from_numpy(un + mix * fn).view(self.shape)
        with np.errstate(all="ignore"):  # a diverging sample may overflow, a NaN one fail its solve: the
            if normal and self.scale is None:  # loop reports them
                out = self._step(rn <= self.rlim, un, fn, rn, mix, beta)  # (1. safeguard: NaN, Inf fail it)
            else:  # residuals beyond 1e±140: the step in units of 2^-e per sample (exact; see rescale)
                e = rescale(self, rn, self.window, self._reset)
                rn, ec = np.ldexp(rn, e), e[:, None]
                out = np.ldexp(self._step(rn <= self.rlim, np.ldexp(un, ec), np.ldexp(fn, ec), rn, mix, beta), -ec)
        t = torch.from_numpy(out)
        return t if t.shape == self.shape else t.view(self.shape)

    def _reset(self, move: Any) -> None:
        """Clear the history of the samples in ``move`` (their units changed: :func:`~.base.rescale`)."""
        self.W[move] = 0.0
        self.G[move] = self.I1

    def _step(self, keep: Any, un: Any, fn: Any, rn: Any, mix: float, beta: float) -> Any:
        """Steps 2-5 of :meth:`step` (numpy arrays in, the next iterates out)."""
        if self.kernel is not None:  # steps 2-4 compiled (_kernels._anderson_rows: the same arithmetic)
            out = np.empty_like(un)
            args = (self.W, self.G, self.up, self.fp, un, fn, (self.steps - 2) % self.m, self.lam1, self.tiny,
                    self.probe, self.lim2, mix, out, self.gamma, self.ok)
            if _kernels.run(self, args):
                return self._accept(keep, self.ok, out, un, fn, rn, beta)
        n, m = self.n, self.m
        # 2. the new pair into slot i; its Gram row/column and ΔFᵀf from one batched product
        i = (self.steps - 2) % m
        X = self.X
        np.subtract(un, self.up, out=self.dU[:, i])
        np.subtract(fn, self.fp, out=X[:, 0])
        X[:, 1] = fn
        self.dF[:, i] = X[:, 0]
        g = np.matmul(self.dF, self.XT)  # (B, m, 2): [ΔFᵀΔf, ΔFᵀf]
        gi = g[:, :, 0]
        self.G[:, i] = gi
        self.G[:, :, i] = gi
        gii = self.Gd[:, i]
        moved = gii > 0  # a sample the loop keeps frozen did not move: γ = 0
        np.multiply(gii, self.lam1, out=gii)
        np.maximum(gii, self.tiny, out=gii)  # (a zero row is decoupled, not singular)
        # 3. γ of every sample that moved (one batched solve), with the restart test; g's first column
        #    becomes the probe's right-hand side
        gamma, ok = self._solve(g, moved)
        # 4. u + βf - (ΔU + βΔF)γ for all samples from one batched product
        c = np.matmul(gamma[:, None, :], self.W)[:, 0]
        out = fn - c[:, n:]
        if mix != 1.0:
            out *= mix
        out += un
        out -= c[:, :n]
        return self._accept(keep, ok, out, un, fn, rn, beta)

    def _accept(self, keep: Any, ok: Any, out: Any, un: Any, fn: Any, rn: Any, beta: float) -> Any:
        """5. restarts and fall-backs; the accepted point becomes the reference."""
        if _all(keep & ok):
            self.up, self.fp, self.rlim = un, fn, self._limit(rn)
        else:
            self._restart(keep, ok, out, un, fn, rn, beta)
        return out

    def _solve(self, g: Any, moved: Any) -> tuple[Any, Any]:
        r"""``(γ, ok)``: :math:`\gamma = G^{-1}\Delta F^\top f` (``g[:, :, 1]``) for the samples that
        ``moved`` (0 for the others, whose solve is skipped when they are the majority); ``ok`` false
        where the condition estimate :math:`m\|H^{-1}p\|/\|p\|` of the scaled matrix exceeds
        ``restart_cond`` (or the solve failed), and then γ = 0."""
        B, m = self.B, self.m
        if _all(moved):
            idx = None
        else:
            k = int(np.count_nonzero(moved))
            if k == 0:
                return np.zeros((B, m), self.G.dtype), np.ones(B, bool)
            # solve for the samples that moved only when that saves more than the gather costs
            idx = np.flatnonzero(moved) if 4 * k < 3 * B else None
        H, R, d = (self.G, g, self.Gd) if idx is None else (self.G[idx], g[idx], self.Gd[idx])
        d = np.sqrt(d)  # D: the column scaling
        np.multiply(d, self.probe, out=R[:, :, 0])
        sol = solve(H, R, quiet=False)  # NaN where singular (the caller silences numpy)
        x = sol[:, :, 0]
        x *= d
        ok = row_sq(x) <= self.lim2  # NaN fails
        gamma = sol[:, :, 1]
        if not _all(ok):
            gamma[~ok] = 0.0  # restart: the plain KM step
        if idx is None:
            if not _all(moved):
                gamma[~moved] = 0.0
                ok |= ~moved
            return gamma, ok
        full, ok_full = np.zeros((B, m), gamma.dtype), np.ones(B, bool)
        full[idx], ok_full[idx] = gamma, ok
        return full, ok_full

    def _restart(self, keep: Any, ok: Any, out: Any, un: Any, fn: Any, rn: Any, beta: float) -> None:
        """Samples that failed the safeguard or the restart test lose their history; the rejected
        ones continue from the KM step of their last accepted point (``out`` is changed in place)."""
        drop = ~(keep & ok)
        self.W[drop] = 0.0
        self.G[drop] = self.I1
        self.restarts += drop
        if keep.all():
            self.up, self.fp, self.rlim = un, fn, self._limit(rn)
            return
        rej = ~keep
        out[rej] = self.up[rej] + beta * self.fp[rej]
        k1 = keep[:, None]
        self.up, self.fp = np.where(k1, un, self.up), np.where(k1, fn, self.fp)
        self.rlim = np.where(keep, self._limit(rn), self.big)  # the fall-back point is accepted


class MaskedBatch(MaskedCounters):
    """Per-sample Anderson state in torch operations without host syncs; the same iteration as
    :class:`HostBatch` (here with unit-scaled pairs, so the ridge Gram matrices have the diagonal 1 + λ;
    the same matrices as ``HostBatch``'s up to the column scaling), every
    decision a mask (see the module docstring)."""

    def __init__(self, acc: Anderson, u: Tensor, B: int) -> None:
        n = u.numel() // B if B else 0
        self.shape, self.B, self.n, self.steps = u.shape, B, n, 0
        self.m = m = min(acc.history_size, max(n, 1))
        self.probe = torch.tensor(_probe(m), dtype=u.dtype, device=u.device).expand(B, m)
        self.lim2 = (acc.restart_cond * math.sqrt(sum(p * p for p in _probe(m))) / m) ** 2
        self.lam1 = 1.0 + acc.regularization
        self.I1 = torch.eye(m, dtype=u.dtype, device=u.device) * self.lam1  # the Gram matrix of no history
        self.tiny, self.big = torch.finfo(u.dtype).tiny, torch.finfo(u.dtype).max
        self.sg = acc.safeguard if math.isfinite(acc.safeguard) else None
        # allocated at the first step, from the iterates (batched like them under vmap)
        self.W = self.G = self.up = self.fp = self.rlim = self.fresh = u.new_zeros(0)

    def step(self, acc: Anderson, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        B, n = self.B, self.n
        un, fn, r = u.reshape(B, n), f.reshape(B, n), r.reshape(B)
        mix = beta if acc.mixing is None else acc.mixing
        self.steps += 1
        if self.steps == 1:  # allocate the history, take the plain KM step
            z = torch.cat([un, fn], 1)
            self.W = torch.zeros_like(z).unsqueeze(1).repeat(1, self.m, 1)
            self.G = (self.I1 + torch.zeros_like(z[:, :1, None])).contiguous()
            self.up, self.fp, self.rlim = un, fn, self._limit(r)
            self.fresh = torch.zeros_like(r)
            return torch.add(un, fn, alpha=mix).reshape(self.shape)
        keep = r <= self.rlim  # 1. safeguard (NaN and Inf fail it)
        # 2. the new pair, scaled to a unit Δf, into slot i; its Gram row/column and D⁻¹ΔFᵀf
        i = (self.steps - 2) % self.m
        df = fn - self.fp
        nrm = df.square().sum(-1, keepdim=True)
        w = torch.cat([un - self.up, df], 1) * nrm.clamp_min(self.tiny).rsqrt()
        self.W[:, i] = w
        g = torch.bmm(self.W[:, :, n:], torch.stack([w[:, n:], fn], 2))  # (B, m, 2)
        self.G[:, i] = g[..., 0]
        self.G[:, :, i] = g[..., 0]
        self.G[:, i, i] = self.lam1
        # 3. the ridge least squares, the condition probe as a second right-hand side
        sol, fail = torch.linalg.solve_ex(self.G, torch.stack([g[..., 1], self.probe], -1))
        ok = (fail == 0) & (sol[..., 1].square().sum(-1) <= self.lim2)
        moved = (nrm > 0).squeeze(-1)  # a sample the loop keeps frozen did not move: γ = 0
        gamma = torch.where((ok & moved).unsqueeze(-1), sol[..., 0], 0.0)  # where: a failed solve may hold NaN
        # 4. the step, or the KM step of the last accepted point for a rejected sample
        z = torch.cat([un, fn], 1) - torch.bmm(gamma.unsqueeze(1), self.W).squeeze(1)
        k1 = keep.unsqueeze(-1)
        u_next = torch.where(k1, torch.add(z[:, :n], z[:, n:], alpha=mix), torch.add(self.up, self.fp, alpha=beta))
        # 5. rejected or ill-conditioned samples restart with an empty history
        fresh = keep & ok
        f3 = fresh.view(B, 1, 1)
        self.W.mul_(f3)
        self.G = torch.where(f3, self.G, self.I1)
        self.up, self.fp = torch.where(k1, un, self.up), torch.where(k1, fn, self.fp)
        self.rlim = torch.where(keep, self._limit(r), self.big)
        self.fresh = self.fresh + fresh
        return u_next.reshape(self.shape)
