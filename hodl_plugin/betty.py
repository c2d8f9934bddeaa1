r"""Betty adapter: HODL's GKM lower level as a node of a Betty multilevel graph.

The only module of hodl_plugin that imports Betty (``betty-ml``; tested with 0.2.1). Importing it
registers these hypergradient methods in Betty's registry, so that a user picks them with
``Config(type=...)`` as Betty's own ``darts``/``neumann``/``cg``:

==========================  ====================================================================
``type``                    for the edge from a ... node to its upper node
==========================  ====================================================================
``"gkm_implicit"``          :class:`GKMProblem`: implicit differentiation of ``u = T(u; x)``
``"gkm_unrolled"``          :class:`GKMProblem`: back-propagation through the K GKM steps
``"gkm_truncated"``         :class:`GKMProblem`: through the last ``truncate`` steps
``"gkm_inexact"``           :class:`GKMProblem`: ISGD/MAID inexact mode (ε_k, δ_k, warm starts)
``"gkm_first_order"``       :class:`GKMProblem`: Jacobian-free
``"implicit_cg"``           Betty's argmin ``ImplicitProblem``: a *correct* CG on the Hessian
                            system, with a tolerance (Betty's own ``cg`` is wrong in every
                            release: its direction update uses the old residual)
``"implicit_gmres"``        the same with GMRES (indefinite Hessians of nonconvex lower levels)
==========================  ====================================================================

Unlike Betty's ``cg``/``neumann``, these accept any path of the graph (no two-level assertion) and
both calling conventions, ``fn(vector, curr, prev, sync)`` (0.2) and ``fn(vector, curr, prev)``
(0.1).

A GKM node runs all K GKM steps of one lower solve inside *one* Betty step (Betty's per-step
overhead — a ``loss.item()`` and the bookkeeping — is paid once per solve, not once per step) and
exposes its solution as the parameter ``u`` that the upper node's ``training_step`` reads.

Example (a two-level quadratic; the upper learns ``x`` so that ``u*(x) = A⁻¹x`` fits ``y``):

    >>> import torch
    >>> import hodl_plugin.betty as hb
    >>> hb.set_log_level("WARNING")                  # Betty logs every step at INFO on stdout
    >>> from betty.engine import Engine
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> class Lower(hb.GKMProblem):
    ...     def operator(self, u, batch):
    ...         return u - 0.4 * (A @ u - self.upper.module.x)      # T(u; x)
    ...     def initial_state(self, batch):
    ...         return torch.zeros(2, dtype=torch.float64)
    >>> class Upper(ImplicitProblem):
    ...     def get_batch(self):                                   # no data: one "batch" per step
    ...         return None
    ...     def training_step(self, batch):
    ...         return 0.5 * ((self.lower.u - y) ** 2).sum()       # F(u*(x))
    >>> xmod = torch.nn.Module(); xmod.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> lower = Lower("lower", hb.HODLConfig(type="gkm_implicit", tol=1e-12, max_steps=2000))
    >>> upper = Upper("upper", hb.HODLConfig(), module=xmod,
    ...               optimizer=torch.optim.SGD(xmod.parameters(), lr=1.0))
    >>> engine = Engine([upper, lower], EngineConfig(train_iters=300, strategy="cpu"),
    ...                 dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    >>> engine.run()
    >>> bool(torch.allclose(A @ y, xmod.x.detach(), atol=1e-6))       # x* = A y
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

try:
    import betty.hypergradient as _betty_hypergradient
    from betty.configs import Config as _BettyConfig
    from betty.engine import Engine as _BettyEngine
    from betty.problems import ImplicitProblem as _ImplicitProblem
except ImportError as exc:  # pragma: no cover - betty is a declared dependency
    raise ImportError(
        "hodl_plugin.betty needs Betty: pip install --ignore-requires-python 'betty-ml==0.2.1' 'numpy<2.3'"
    ) from exc

from . import linear_solve as ls
from .errors import ConvergenceWarning, HODLError, LinearSolveError
from .gkm import SolverInfo
from .hypergrad import FirstOrder, HypergradMethod, Implicit, Inexact, Truncated, Unrolled
from .schedules import Harmonic, Schedule
from .solver import GKMSolver

__all__ = [
    "HODLConfig",
    "GKMProblem",
    "GKM_METHODS",
    "IMPLICIT_METHODS",
    "register",
    "set_log_level",
    "HODLEngine",
    "unwrap",
    "engine_state_dict",
    "load_engine_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "gkm_vjp",
    "implicit_vjp",
]

_ACCEPTS_EXTRA_CONFIG = "extra_config" in inspect.signature(_ImplicitProblem.__init__).parameters

#: Config types of GKM nodes and the core method each selects
GKM_METHODS = ("gkm_implicit", "gkm_unrolled", "gkm_truncated", "gkm_inexact", "gkm_first_order")
#: Config types of our methods for Betty's argmin ``ImplicitProblem`` nodes
IMPLICIT_METHODS = ("implicit_cg", "implicit_gmres")


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
    # the lower GKM solve (see hodl_plugin.GKMSolver)
    max_steps: int = 1000
    tol: float = 1e-8
    rtol: float = 0.0
    beta: Union[float, Schedule] = 1.0
    alpha: Union[float, Schedule, None] = None  # HODL aggregation when upper_objective is defined
    upper_step: float = 1.0
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


def _cfg(config: Any, name: str, default: Any) -> Any:
    return getattr(config, name, default)


def _method_for(config: Any) -> HypergradMethod:
    kind = config.type
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


class GKMState(nn.Module):
    """Holds the lower variable ``u`` of a GKM node as a parameter (its shape follows the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(0))

    def forward(self) -> Tensor:
        return self.u


class GKMProblem(_ImplicitProblem):
    r"""A Betty node whose variable solves :math:`u^* \in \mathrm{Fix}\,T(\cdot; x)` by GKM.

    Subclass it and define

    - ``operator(self, u, batch) -> tensor like u``: :math:`T(u; x)`, reading the upper variables
      ``x`` through the engine's attributes (``self.<upper name>.module...``), as Betty users do in
      ``training_step``;
    - ``initial_state(self, batch) -> tensor``: :math:`u_0` for a batch (used when no warm start);
    - optionally ``upper_objective(self, u, batch) -> scalar``: :math:`F` for HODL's aggregation
      (with ``config.alpha``, default ``Harmonic(1.0)``, and ``config.upper_step``);
    - optionally ``sample_keys(self, batch) -> sequence of hashables``: one key per sample (the
      first dimension of ``u``) to warm-start every sample from its own last iterate across Betty
      steps; without it the whole previous iterate is the warm start when shapes match.

    Each Betty step of the node runs one complete GKM solve (``config.max_steps``, ``config.tol``)
    with the hypergradient method named by ``config.type`` and stores the result as ``self.u``,
    which the upper node's ``training_step`` reads. (A node that must differentiate *through* the
    solution inside its own loss — e.g. the middle node of a three-level graph, whose Hessian the top
    node's implicit method needs — calls :meth:`solve` instead, which returns a fresh
    differentiable solution with its own autograd graph; use ``gkm_unrolled`` with
    ``warm_start=False`` there, whose graph is twice differentiable.) Diagnostics of the last solve and
    hypergradient are in :attr:`stats` (and are logged through Betty's logger every
    ``config.log_step`` steps): residual, steps, converged, hypergradient norm, adjoint iterations,
    and for the inexact mode ε_k, δ_k and the error bound.
    """

    #: set True when ``operator`` is a gradient step (symmetric ``∂_u T``): the implicit and inexact
    #: modes then solve the adjoint system by CG instead of GMRES (unless ``config.linear_solver``)
    symmetric_jacobian: bool = False

    def __init__(
        self,
        name: str,
        config: Optional[_BettyConfig] = None,
        module: Optional[nn.Module] = None,
        train_data_loader: Any = None,
        extra_config: Any = None,
    ) -> None:
        config = config if config is not None else HODLConfig()
        self.method = _method_for(config)
        kwargs: dict[str, Any] = {"extra_config": extra_config} if _ACCEPTS_EXTRA_CONFIG else {}
        super().__init__(
            name,
            config,
            module=module if module is not None else GKMState(),
            optimizer=None,
            scheduler=None,
            train_data_loader=train_data_loader,
            **kwargs,
        )
        self.solution: Optional[Tensor] = None
        self.info: Optional[SolverInfo] = None
        self.stats: dict[str, float] = {}
        self.warm: dict[Hashable, Tensor] = {}
        self._solver: Optional[GKMSolver] = None
        self._batch: Any = None

    # -- the user's side --------------------------------------------------------------------------
    def operator(self, u: Tensor, batch: Any) -> Tensor:
        """:math:`T(u; x)` for the current batch (define it in the subclass)."""
        raise NotImplementedError(f"GKM node {self.name!r}: define operator(self, u, batch)")

    def initial_state(self, batch: Any) -> Tensor:
        """:math:`u_0` for a batch (define it in the subclass)."""
        raise NotImplementedError(f"GKM node {self.name!r}: define initial_state(self, batch)")

    def training_step(self, batch: Any) -> Tensor:
        """The fixed-point residual of the current iterate (Betty requires a ``training_step``)."""
        with torch.no_grad():
            u = self.u.detach()
            return torch.linalg.vector_norm(self.operator(u, batch) - u)

    @property
    def u(self) -> Tensor:
        """The lower variable (a parameter holding the last solution): read it in the upper node."""
        mod = self.module.module if isinstance(self.module, nn.parallel.DistributedDataParallel) else self.module
        return mod.u

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.u

    def solve(self, batch: Any = None) -> Tensor:
        """A fresh GKM solve with the current upper variables, differentiable by ``config.type``.

        Its autograd graph is its own (Betty frees the graphs of the losses it differentiates, so
        nodes that differentiate through this node's solution in their own ``training_step`` call
        this rather than sharing :attr:`solution`). The node's state (``u``, warm starts) is left
        unchanged.
        """
        batch = self.cur_batch if batch is None else batch
        self._batch = batch
        if self._solver is None:
            self._solver = self._build_solver()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._solver(self._start(batch), key=self._key(batch))

    # -- Betty's side ---------------------------------------------------------------------------------
    def get_batch(self) -> Any:
        """The next batch of ``train_data_loader``; ``None`` for a node without data."""
        if self.train_data_loader is None:
            return None
        return super().get_batch()

    def initialize(self, *args: Any) -> None:  # Betty 0.1.1 passes the engine config
        super().initialize(*args)
        if not self._parents:
            raise HODLError(
                f"GKM node {self.name!r} has no upper node: add it to the Engine's dependencies "
                "(u2l: {upper: [lower]}, l2u: {lower: [upper]}); a GKM node only exists to be "
                "differentiated by an upper level"
            )

    def patch_optimizer(self) -> None:  # a GKM node has no optimizer: its step is the GKM solve
        if self.optimizer is not None:
            super().patch_optimizer()

    def patch_module(self) -> None:
        # the iterate is per-process data, not a replicated model: never wrap it in DDP/FSDP
        self.module.to(self.device)

    def _build_solver(self) -> GKMSolver:
        cfg = self.config
        has_upper = type(self).upper_objective is not GKMProblem.upper_objective
        upper = (lambda u: self.upper_objective(u, self._batch)) if has_upper else None
        alpha = _cfg(cfg, "alpha", None)

        def T(u: Tensor) -> Tensor:
            return self.operator(u, self._batch)

        T.symmetric_jacobian = self.symmetric_jacobian  # type: ignore[attr-defined]
        return GKMSolver(
            T,
            max_steps=_cfg(cfg, "max_steps", 1000),
            tol=_cfg(cfg, "tol", 1e-8),
            rtol=_cfg(cfg, "rtol", 0.0),
            hypergrad=self.method,
            upper=upper,
            upper_step=_cfg(cfg, "upper_step", 1.0),
            alpha=(Harmonic(1.0) if alpha is None else alpha) if has_upper else None,
            beta=_cfg(cfg, "beta", 1.0),
            check_every=_cfg(cfg, "check_every", 10),
            on_divergence=_cfg(cfg, "on_divergence", "raise"),
        )

    def upper_objective(self, u: Tensor, batch: Any) -> Tensor:  # pragma: no cover - optional hook
        """:math:`F(u; x)` for HODL's aggregation (optional; define it to aggregate)."""
        raise NotImplementedError

    def sample_keys(self, batch: Any) -> Optional[Sequence[Hashable]]:
        """One key per sample of ``u``'s first dimension, for per-sample warm starts (optional)."""
        return None

    def _key(self, batch: Any) -> Optional[Hashable]:
        """The solver's warm-start key of a batch (its sample keys), so that the inexact mode's own
        caches of u and v never carry one batch's iterate over to another."""
        keys = self.sample_keys(batch)
        return None if keys is None else tuple(int(k) if isinstance(k, Tensor) else k for k in keys)

    def _start(self, batch: Any) -> Tensor:
        u0 = self.initial_state(batch)
        if not isinstance(u0, Tensor):
            raise TypeError(f"GKM node {self.name!r}: initial_state must return a tensor")
        if not _cfg(self.config, "warm_start", True):
            return u0
        keys = self.sample_keys(batch)
        if keys is None:
            prev = self.warm.get(None)
            return prev.clone() if prev is not None and prev.shape == u0.shape else u0
        keys = [int(k) if isinstance(k, Tensor) else k for k in keys]
        if len(keys) != u0.shape[0]:
            raise ValueError(
                f"GKM node {self.name!r}: sample_keys gave {len(keys)} keys for u of shape {tuple(u0.shape)}"
            )
        rows = [self.warm.get(k) for k in keys]
        if all(r is None for r in rows):
            return u0
        return torch.stack([u0[i] if r is None else r for i, r in enumerate(rows)])

    def _remember(self, batch: Any, u: Tensor) -> None:
        keys = self.sample_keys(batch)
        if keys is None:
            self.warm[None] = u.detach().clone()
            return
        for i, k in enumerate(keys):
            self.warm[int(k) if isinstance(k, Tensor) else k] = u[i].detach().clone()

    def one_step_descent(self, batch: Any = None) -> dict[str, float]:
        if batch is None:
            self.cur_batch = self.get_batch()
            batch = self.cur_batch
        self._batch = batch
        if self._solver is None:
            self._solver = self._build_solver()
        u0 = self._start(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported through stats/logs instead
            z = self._solver(u0, key=self._key(batch))
        info = self._solver.info
        self.info = info
        self.solution = z
        state = self.module.module if isinstance(self.module, nn.parallel.DistributedDataParallel) else self.module
        state.u.data = z.detach().clone()
        self._remember(batch, z)
        self.stats.update(
            residual=info.residual, steps=float(info.steps), converged=float(info.converged)
        )
        if info.eps is not None:
            self.stats.update(eps=info.eps, delta=float(info.delta))
        return {"loss": info.residual, **self.stats}

    # the roll-back hooks of ImplicitProblem assume an optimizer
    def cache_states(self) -> None:
        self.module_state_dict_cache = {k: v.clone() for k, v in self.module.state_dict().items()}

    def recover_states(self, clean: bool = True) -> None:
        if self.module_state_dict_cache is not None:
            self.module.load_state_dict(self.module_state_dict_cache, strict=False)
        if clean:
            self.module_state_dict_cache = None

    # -- state for checkpoints ---------------------------------------------------------------------
    def hodl_state_dict(self) -> dict[str, Any]:
        """Warm starts, the solver method's counters/caches and the last iterate."""
        return {
            "warm": {k: v.clone() for k, v in self.warm.items()},
            "method": self.method.state_dict(),
            "u": self.u.detach().clone(),
            "count": self._count,
        }

    def load_hodl_state_dict(self, state: dict[str, Any]) -> None:
        self.warm = {k: v.clone() for k, v in state["warm"].items()}
        self.method.load_state_dict(state["method"])
        self.u.data = state["u"].clone()
        self._count = state["count"]


# ------------------------------------------------------------------------------ registered methods
def _zeros_for_none(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def gkm_vjp(vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False) -> Optional[list[Tensor]]:
    r"""Hypergradient of a GKM edge: :math:`(\partial u^*/\partial x)^\top` times ``vector``.

    ``vector`` is :math:`\partial L_{\text{upper}}/\partial u`; the GKM node's stored solution
    carries the chosen method in its autograd graph (the implicit adjoint hook, or the unrolled
    steps), so one backward through it gives :math:`(\partial u^*/\partial x)^\top` ``vector``
    w.r.t. the trainable parameters of ``prev``. With ``sync`` the result is accumulated into
    ``.grad`` (Betty's convention) and ``None`` returned. Betty calls it for ``type="gkm_*"``; the
    module example runs it.
    """
    if not isinstance(curr, GKMProblem):
        raise HODLError(
            f"Config(type={curr.config.type!r}) is a GKM hypergradient but node {curr.name!r} is a "
            f"{type(curr).__name__}; use it on a hodl_plugin.betty.GKMProblem, or use 'implicit_cg' "
            "for an argmin ImplicitProblem"
        )
    z = curr.solution
    if z is None:
        raise HODLError(f"GKM node {curr.name!r} has not been solved yet")
    params = list(prev.trainable_parameters())
    v = vector[0] if vector and vector[0] is not None else torch.zeros_like(z)
    if v.shape != z.shape:
        raise HODLError(
            f"the upper node {prev.name!r} read a {tuple(v.shape)} tensor from {curr.name!r} whose solution "
            f"has shape {tuple(z.shape)}"
        )
    if not z.requires_grad:
        raise HODLError(
            f"the operator of GKM node {curr.name!r} does not depend on any trainable parameter of its "
            f"upper node {prev.name!r}: read the upper variables inside operator(u, batch)"
        )
    grads = torch.autograd.grad(z, params, v, retain_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise HODLError(
            f"the operator of GKM node {curr.name!r} does not depend on the trainable parameters of "
            f"{prev.name!r}: the edge {curr.name!r} -> {prev.name!r} carries no hypergradient"
        )
    grads = _zeros_for_none(grads, params)
    curr.stats["hypergrad_norm"] = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    info = curr.info
    if info is not None and info.adjoint is not None:
        curr.stats["adjoint_iterations"] = float(info.adjoint.iterations)
        curr.stats["adjoint_residual"] = info.adjoint.residual
    if info is not None and info.error_bound is not None:
        curr.stats["error_bound"] = info.error_bound
    if sync:
        _accumulate(params, grads)
        _average_grads_across_ranks(params)
        return None
    return grads


def _average_grads_across_ranks(params: Sequence[Tensor]) -> None:
    """Data parallel: average the full gradient (direct + implicit) of ``params`` over the ranks.

    Betty relies on DDP's reducer hooks, which the implicit part of a hypergradient never triggers
    (it is computed by ``autograd.grad``); averaging here makes every rank step with the full-batch
    hypergradient. Idempotent if a reducer already averaged (the ranks then hold equal values).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _make_implicit(solver_name: str) -> Callable[..., Optional[list[Tensor]]]:
    def implicit_vjp_named(
        vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False
    ) -> Optional[list[Tensor]]:
        return implicit_vjp(vector, curr, prev, sync, solver=solver_name)

    implicit_vjp_named.__name__ = f"implicit_{solver_name}"
    return implicit_vjp_named


def implicit_vjp(
    vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False, solver: str = "cg"
) -> Optional[list[Tensor]]:
    r"""Implicit hypergradient of an argmin node :math:`\theta^*(\lambda) = \arg\min_\theta L(\theta, \lambda)`.

    Solves :math:`\nabla^2_{\theta\theta} L\, q = v` (``vector``) to the tolerance
    ``config.adjoint_rtol`` (default 1e-10) with ``solver`` (``"cg"`` or ``"gmres"``), then returns
    :math:`-\nabla^2_{\lambda\theta} L\, q`. Correct where Betty's ``cg`` is not (its direction
    update uses the old residual), stops on a tolerance instead of a fixed count, and works on any
    path of the graph. Betty calls it for ``type="implicit_cg"`` / ``"implicit_gmres"``
    (``tests/test_betty.py`` checks it against the closed form).
    """
    if isinstance(curr, GKMProblem):
        raise HODLError(
            f"Config(type={curr.config.type!r}) is for argmin ImplicitProblem nodes; the GKM node "
            f"{curr.name!r} needs one of {list(GKM_METHODS)}"
        )
    cfg = curr.config
    params = list(curr.trainable_parameters())
    loss = curr.training_step_exec(curr.cur_batch)
    if isinstance(loss, dict):
        loss = loss["loss"]
    in_grad = torch.autograd.grad(loss, params, create_graph=True)
    b = _flat(_zeros_for_none(vector, params)).detach()

    def matvec(p: Tensor) -> Tensor:
        hvp = torch.autograd.grad(in_grad, params, _unflat(p, params), retain_graph=True, allow_unused=True)
        return _flat(_zeros_for_none(hvp, params))

    solve = ls.get(
        solver,
        rtol=_cfg(cfg, "adjoint_rtol", 1e-10),
        atol=_cfg(cfg, "adjoint_atol", 0.0),
        maxiter=_cfg(cfg, "adjoint_maxiter", 1000),
    )
    q, info = solve(matvec, b)
    curr.hodl_adjoint_info = info
    if not info.converged:
        msg = (
            f"node {curr.name!r}: the Hessian system of the implicit hypergradient was not solved "
            f"({info.method}: residual {info.residual:.3e} > {info.threshold:.3e} after {info.iterations} "
            "products); is the lower level solved to optimality and its Hessian nonsingular?"
        )
        if _cfg(cfg, "on_fail", "raise") == "raise":
            raise LinearSolveError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    prev_params = list(prev.trainable_parameters())
    grads = torch.autograd.grad(in_grad, prev_params, _unflat(q, params), allow_unused=True)
    grads = [-g for g in _zeros_for_none(grads, prev_params)]
    if sync:
        _accumulate(prev_params, grads)
        _average_grads_across_ranks(prev_params)
        return None
    return grads


_REGISTRY: dict[str, Callable[..., Any]] = {
    **{name: gkm_vjp for name in GKM_METHODS},
    "implicit_cg": _make_implicit("cg"),
    "implicit_gmres": _make_implicit("gmres"),
}


def set_log_level(level: Union[int, str]) -> None:
    """Set the level of Betty's logger (it prints every logged step at INFO on stdout).

    >>> set_log_level("WARNING")
    """
    from betty.logging import get_logger

    get_logger().setLevel(level)


def register() -> None:
    """Add our methods to Betty's hypergradient registry (done on import; idempotent).

    >>> import betty.hypergradient
    >>> register()
    >>> sorted(k for k in betty.hypergradient.jvp_fn_mapping if k.startswith(("gkm", "implicit")))
    ['gkm_first_order', 'gkm_implicit', 'gkm_inexact', 'gkm_truncated', 'gkm_unrolled', 'implicit_cg', 'implicit_gmres']
    """
    _betty_hypergradient.jvp_fn_mapping.update(_REGISTRY)


register()



# ------------------------------------------------------------------------------ data parallel on CPU
def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (Betty wraps modules for ``strategy="distributed"``).

    >>> lin = torch.nn.Linear(2, 2)
    >>> unwrap(lin) is lin
    True
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class HODLEngine(_BettyEngine):
    """Betty's ``Engine``, plus data parallelism on CPU processes with the gloo backend.

    Betty 0.2.1's ``distributed`` strategy assumes CUDA (``rank % torch.cuda.device_count()``,
    ``torch.cuda.set_device``). With ``EngineConfig(strategy="distributed", backend="gloo")`` on a
    machine without CUDA, this engine joins the process group (``torchrun`` or any launcher that sets
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, or a group the caller initialised),
    places every rank on the CPU and leaves the rest to Betty: data loaders split by rank, modules
    wrapped in DDP. GKM edges average the full hypergradient over the ranks. Where CUDA is present,
    Betty's own path runs unchanged. With any other strategy it is Betty's ``Engine`` (example in
    :func:`save_checkpoint`; the 2-process run is ``tests/ddp_case.py``).
    """

    def configure_systems(self) -> dict[str, Any]:
        import torch.distributed as dist

        cpu_parallel = self._strategy in ("distributed", "zero") and (
            not torch.cuda.is_available() or self._backend == "gloo"
        )
        if not cpu_parallel:
            return super().configure_systems()
        if self._backend != "gloo":
            raise HODLError(f"data parallel on CPU needs EngineConfig(backend='gloo'), got {self._backend!r}")
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        self._world_size = dist.get_world_size()
        if self._world_size < 2:
            raise HODLError("strategy='distributed' needs at least 2 processes")
        self._rank = dist.get_rank()
        self._local_rank = self._rank
        self.device = "cpu"
        return {
            "strategy": self._strategy,
            "backend": self._backend,
            "world_size": self._world_size,
            "rank": self._rank,
            "local_rank": self._local_rank,
        }


# ------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def engine_state_dict(engine: Any) -> dict[str, Any]:
    """Everything needed to resume a Betty ``Engine`` of HODL nodes exactly (Betty has no checkpoints).

    Per problem: module, optimizer, scheduler, step counter, data-loader epochs and, for
    :class:`GKMProblem` nodes, the iterate, the warm starts and the hypergradient method's state
    (inexact counters, warm-started adjoints, estimated bound constants); plus the engine's global
    step and the torch / python / numpy RNG states. Take it between global steps (after ``run()``
    or in a callback), not inside a step.
    """
    problems = {}
    for p in engine.problems:
        st: dict[str, Any] = {
            "module": p.module.state_dict(),
            "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
            "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
            "count": p._count,
            "epoch_counter": list(p.epoch_counter) if p.epoch_counter is not None else None,
        }
        if isinstance(p, GKMProblem):
            st["hodl"] = p.hodl_state_dict()
        problems[p.name] = st
    return {"global_step": engine.global_step, "problems": problems, "rng": _rng_state()}


def load_engine_state_dict(engine: Any, state: dict[str, Any]) -> None:
    """Restore :func:`engine_state_dict` into an engine built the same way (same problems, loaders,
    ``train_iters`` = the total): ``engine.run()`` then runs the remaining iterations and the result
    equals an uninterrupted run bit for bit on CPU (for deterministic data loaders: no shuffling, or
    a seeded ``generator``, which the replay below reproduces).
    """
    by_name = {p.name: p for p in engine.problems}
    missing = set(state["problems"]) ^ set(by_name)
    if missing:
        raise HODLError(f"checkpoint and engine have different problems: {sorted(missing)}")
    for name, st in state["problems"].items():
        p = by_name[name]
        if isinstance(p, GKMProblem):
            p.load_hodl_state_dict(st["hodl"])  # first: it sets u's shape
        p.module.load_state_dict(st["module"])
        if st["optimizer"] is not None:
            p.optimizer.load_state_dict(st["optimizer"])
        if st["scheduler"] is not None:
            p.scheduler.load_state_dict(st["scheduler"])
        # replay the data loaders to the same position (one batch per local step)
        if p.train_data_loader is not None:
            for _ in range(st["count"]):
                for idx in range(len(p.train_data_loader)):
                    p.get_batch_single_loader(idx)
        p._count = st["count"]
    engine.global_step = state["global_step"]
    engine.train_iters = engine.config.train_iters - state["global_step"]
    _set_rng_state(state["rng"])


def save_checkpoint(engine: Any, path: str) -> None:
    """``torch.save(engine_state_dict(engine), path)``.

    Example — interrupt after 5 of 10 steps, resume in a fresh engine, get the uninterrupted result:

    >>> import tempfile, os, torch
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> set_log_level("WARNING")
    >>> class Low(GKMProblem):
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build():
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", HODLConfig(), module=m, optimizer=torch.optim.Adam(m.parameters(), lr=0.1))
    ...     low = Low("low", HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     eng = HODLEngine([up, low], EngineConfig(train_iters=10, strategy="cpu"),
    ...                      dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    ...     return eng, m
    >>> straight, m0 = build(); straight.run()
    >>> first, _ = build(); first.train_iters = 5; first.run()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> save_checkpoint(first, path)
    >>> resumed, m1 = build(); load_checkpoint(resumed, path); resumed.run()
    >>> torch.equal(m0.x, m1.x)
    True
    """
    torch.save(engine_state_dict(engine), path)


def load_checkpoint(engine: Any, path: str) -> None:
    """Load a file written by :func:`save_checkpoint` into a freshly built engine."""
    load_engine_state_dict(engine, torch.load(path, weights_only=False))
