"""The GKM node: a Betty problem whose variable is a fixed point of ``T(·; x)`` solved by GKM."""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from typing import Any, Hashable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._autodiff import grad_u
from ..errors import ConvergenceWarning, HODLError
from ..gkm import SolverInfo
from ..schedules import Constant, Harmonic
from ..solver import GKMSolver
from ._betty import Config as _BettyConfig
from ._betty import ImplicitProblem as _ImplicitProblem
from .config import _cfg, _method_for, as_config
from .coupling import UpperLookahead, evaluate_upper, install_lookahead

__all__ = ["GKMProblem", "GKMState"]

_ACCEPTS_EXTRA_CONFIG = "extra_config" in inspect.signature(_ImplicitProblem.__init__).parameters


class GKMState(nn.Module):
    """Holds the lower variable ``u`` of a GKM node as a parameter (its shape follows the batch).

    The default ``module`` of a :class:`GKMProblem`; takes no arguments. Calling it returns ``u``.

    >>> state = GKMState()
    >>> tuple(state.u.shape), state() is state.u         # empty until the node's first solve
    ((0,), True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(0))

    def forward(self) -> Tensor:
        return self.u


class _NodeOperator(nn.Module):
    r""":math:`T(u; x)` of a GKM node as an ``nn.Module`` whose parameters are the upper variables ``x``.

    The node's ``operator(u, batch)`` reads ``x`` through Betty's attributes; holding the upper
    nodes' modules as submodules makes ``x`` the operator's own parameters, which the implicit and
    inexact modes differentiate (by ``torch.func.functional_call``), at any order.
    """

    def __init__(self, node: GKMProblem) -> None:
        super().__init__()
        object.__setattr__(self, "node", node)  # not a submodule: the node is not an nn.Module
        self.uppers = nn.ModuleList()
        self.symmetric_jacobian = bool(node.symmetric_jacobian) or node._gradient_form

    def forward(self, u: Tensor) -> Tensor:
        return self.node.operator(u, self.node._batch)

    # a node given as a loss (lower_objective, lower_step) is a gradient step: gkm_fd and gkm_iga read these
    @property
    def objective(self) -> Any:
        node = self.node
        if not node._gradient_form:
            return None
        return lambda u, *params: node.lower_objective(u, node._batch)

    @property
    def step_size(self) -> Any:
        node = self.node
        if not node._gradient_form:
            return None
        return lambda *params: node.lower_step


class GKMProblem(_ImplicitProblem):
    r"""A Betty node whose variable solves :math:`u^* \in \mathrm{Fix}\,T(\cdot; x)` by GKM.

    Subclass it and define

    - ``operator(self, u, batch) -> tensor like u``: :math:`T(u; x)`, reading the upper variables
      ``x`` through the engine's attributes (``self.<upper name>.module...``), as Betty users do in
      ``training_step``;
    - ``initial_state(self, batch) -> tensor``: :math:`u_0` for a batch (used when no warm start);
    - HODL's aggregation :math:`u_{k+1} = T(u_k - \alpha_k s \nabla_u F(u_k; x))` is on when
      ``config.alpha`` is set (a float or a schedule; ``s`` is ``config.upper_step``). By default
      :math:`F` is the upper node's own ``training_step``, evaluated on the batch of the upper's coming
      step with the candidate ``u`` in place of ``self.<node>.u`` (no optimizer step, no gradient in
      ``.grad``, no extra batch drawn, its buffers put back; see :mod:`hodl_plugin.betty.coupling`);
      with several upper nodes ``config.aggregate_upper`` names the one whose objective is :math:`F`.
      Optionally ``upper_objective(self, u, batch) -> scalar`` overrides it (on the node's own batch;
      ``alpha`` then defaults to ``Harmonic(1.0)``);
    - optionally ``sample_keys(self, batch) -> sequence of hashables``: one key per sample (the
      first dimension of ``u``) to warm-start every sample from its own last iterate across Betty
      steps; without it the whole previous iterate is the warm start when shapes match.

    A lower level given as a loss may define ``lower_objective(self, u, batch) -> scalar`` :math:`f(u; x)`
    and the class attribute ``lower_step`` (s) *instead of* ``operator``: the operator is then the
    gradient step :math:`T(u) = u - s\nabla_u f(u; x)` (with a symmetric Jacobian: CG for the implicit
    modes), and the methods that evaluate f itself are available: ``gkm_fd`` (DARTS's finite
    differences) and ``gkm_iga``. ``gkm_ptt`` (IAPTT-GM's truncation) compares the upper objective F
    along the trajectory: the node's ``upper_objective`` if it defines one, else the upper node's
    ``training_step`` (as the aggregation does); its ``alpha`` defaults to 0 (F for the truncation only).

    Each Betty step of the node runs one complete GKM solve (``config.max_steps``, ``config.tol``)
    with the hypergradient method named by ``config.type`` and stores the result as ``self.u``,
    which the upper node's ``training_step`` reads. (A node that must differentiate *through* the
    solution inside its own loss — e.g. the middle node of a three-level graph, whose Hessian the top
    node's implicit method needs — calls :meth:`solve` instead, which returns a fresh
    differentiable solution with its own autograd graph; ``gkm_implicit`` and ``gkm_inexact`` are
    exact at any order there, ``gkm_unrolled`` with ``warm_start=False``.) An upper node may also
    call the node like a Betty child, ``self.<node>(batch)`` (see :meth:`forward`). Diagnostics of the last solve and
    hypergradient are in ``stats`` (and are logged through Betty's logger every
    ``config.log_step`` steps): residual, steps, converged, hypergradient norm, adjoint iterations,
    and for the inexact mode ε_k, δ_k and the error bound. A solve that stops before its tolerance
    is reported (``config.on_nonconvergence``: ``"warn"``, ``"raise"`` or ``"ignore"``).

    Args:
        name: the node's name in the graph (upper nodes read ``self.<name>.u``).
        config: a :class:`~hodl_plugin.betty.HODLConfig`, a Betty ``Config`` or a dict
            (``{"type": "gkm_implicit", "tol": 1e-10}``); ``type`` names the hypergradient method.
        module: the module holding ``u`` (default: a :class:`GKMState`); the node has no optimizer —
            its variable is the fixed point, not a trained parameter.
        train_data_loader: the node's batches (Betty's loaders); ``None`` when the operator needs none.
        extra_config: passed to Betty where its version accepts it.

    Raises:
        TypeError: an unknown config key, or a config of the wrong type (naming the key).
        HODLError: a ``type`` that is not one of the ``gkm_*`` methods, or options the chosen method
            cannot use (raised at construction, where the solver is built and validated).

    Example (a complete graph: :doc:`/auto_examples/plot_03_betty_gkm_node`; the package docstring of
    :mod:`hodl_plugin.betty` runs a smaller one):

    >>> import torch, hodl_plugin.betty as hb
    >>> class Lower(hb.GKMProblem):
    ...     def operator(self, u, batch):
    ...         return 0.5 * u + 1.0                    # u* = 2
    ...     def initial_state(self, batch):
    ...         return torch.zeros(3, dtype=torch.float64)
    >>> node = Lower("lower", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    >>> node.symmetric_jacobian, node.solution is None   # solved at the engine's first step
    (False, True)
    """

    #: set True when ``operator`` is a gradient step (symmetric ``∂_u T``): the implicit and inexact
    #: modes then solve the adjoint system by CG instead of GMRES (unless ``config.linear_solver``)
    symmetric_jacobian: bool = False
    #: s of the gradient step ``u - s ∇_u lower_objective(u, batch)``, for a node that defines
    #: ``lower_objective`` instead of ``operator``
    lower_step: Optional[float] = None

    def __init__(
        self,
        name: str,
        config: Union[_BettyConfig, dict[str, Any], None] = None,
        module: Optional[nn.Module] = None,
        train_data_loader: Any = None,
        extra_config: Any = None,
    ) -> None:
        config = as_config(config, f"GKMProblem {name!r}")
        self._gradient_form = self._check_gradient_form(name)
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
        self._batch: Any = None
        self._busy = False  # inside a global step (see step()): a checkpoint now would be half-written
        self._fresh_served = False  # forward() returned a fresh solve this step (see gkm_vjp)
        # coupled aggregation (F = the upper node's training_step; see coupling.py)
        self._u_override: Optional[Tensor] = None  # the candidate u that self.u returns meanwhile
        self._u_reads = 0  # reads of self.u while substituted: an F that never reads it is refused
        self._aggregating = False  # inside the upper's training_step for F (a solve now would recurse)
        self._own_step = False  # inside this node's Betty step: F's batch is the upper's coming batch
        self._coupled_upper: Any = None  # the upper problem whose training_step is F (set in initialize)
        self._lookahead: Optional[UpperLookahead] = None
        self._solver: GKMSolver = self._build_solver()  # validates the options now, at construction

    # -- the user's side --------------------------------------------------------------------------
    def operator(self, u: Tensor, batch: Any) -> Tensor:
        """:math:`T(u; x)` for the current batch (define it in the subclass, or define
        ``lower_objective`` and ``lower_step``: then it is the gradient step on that loss)."""
        if self._gradient_form:
            s: float = self.lower_step  # type: ignore[assignment]
            return u - s * grad_u(lambda v: self.lower_objective(v, batch), u, [])
        raise NotImplementedError(
            f"GKM node {self.name!r}: define operator(self, u, batch), or lower_objective(self, u, batch) with the "
            "class attribute lower_step"
        )

    def lower_objective(self, u: Tensor, batch: Any) -> Tensor:  # pragma: no cover - optional hook
        r""":math:`f(u; x)`, the lower loss (optional; define it with ``lower_step`` instead of ``operator``)."""
        raise NotImplementedError

    def _check_gradient_form(self, name: str) -> bool:
        """Whether the node is given as a loss (``lower_objective`` + ``lower_step``), checked."""
        cls = type(self)
        has_objective = cls.lower_objective is not GKMProblem.lower_objective
        if not has_objective:
            return False
        if cls.operator is not GKMProblem.operator:
            raise HODLError(
                f"GKM node {name!r} defines both operator and lower_objective: define one (with lower_objective the "
                "operator is the gradient step u - lower_step * grad lower_objective(u, batch))"
            )
        s = cls.lower_step
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (float(s) > 0 and float(s) < float("inf")):
            raise HODLError(
                f"GKM node {name!r} defines lower_objective: set the class attribute lower_step to the step s of "
                f"the gradient step (a positive number, s < 2/L), got {s!r}"
            )
        return True

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
        """The lower variable, a parameter holding the last solution; the upper node reads it."""
        if self._u_override is not None:  # the aggregation evaluates the upper's objective at a candidate
            self._u_reads += 1
            return self._u_override
        mod = self.module.module if isinstance(self.module, nn.parallel.DistributedDataParallel) else self.module
        return mod.u

    @contextlib.contextmanager
    def _substituted(self, u: Tensor) -> Iterator[None]:
        """Within the block, :attr:`u` (and ``self.<node>()``) is ``u``; restored on exit, also on errors."""
        previous, self._u_override = self._u_override, u
        try:
            yield
        finally:
            self._u_override = previous

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``self.<node>(batch)`` in an upper node, as Betty users call a child: the solution for ``batch``.

        With no argument, or the node's own current batch (``self.<node>.cur_batch``), it is
        :attr:`u`, the solution of this step, whose hypergradient Betty computes along the edge by
        ``config.type``. With any other batch it is :meth:`solve` of that batch: a fresh solve whose
        autograd graph carries the hypergradient to the upper variables directly.
        """
        if kwargs or len(args) > 1:
            raise TypeError(
                f"GKM node {self.name!r} is called with one batch, self.{self.name}(batch), or none; "
                f"got {len(args)} positional and {sorted(kwargs)} keyword arguments. Its solution of the "
                f"current step is self.{self.name}.u"
            )
        if not args or args[0] is self.cur_batch:
            return self.u
        return self.solve(args[0])

    def solve(self, batch: Any = None) -> Tensor:
        """A fresh GKM solve with the current upper variables, differentiable by ``config.type``.

        Its autograd graph is its own (Betty frees the graphs of the losses it differentiates, so
        nodes that differentiate through this node's solution in their own ``training_step`` call
        this rather than sharing ``solution``). The node's state (``u``, warm starts) is left
        unchanged. A solve that stops before its tolerance is reported (``config.on_nonconvergence``).
        """
        if self._aggregating:
            raise HODLError(
                f"GKM node {self.name!r}: the training_step of upper node {self._coupled_upper.name!r} calls a "
                f"fresh solve (self.{self.name}(batch) or .solve()) while it serves as F of this node's "
                "aggregation, which would recurse: define upper_objective(self, u, batch) on the GKM node instead"
            )
        batch = self.cur_batch if batch is None else batch
        previous, self._batch = self._batch, batch
        self._fresh_served = True  # the caller differentiates through this solve (see gkm_vjp)
        try:
            return self._run_solver(self._start(batch), batch)
        finally:
            self._batch = previous

    # -- Betty's side ---------------------------------------------------------------------------------
    def get_batch(self) -> Any:
        """The next batch of ``train_data_loader``; ``None`` for a node without data."""
        if self.train_data_loader is None:
            return None
        return super().get_batch()

    def initialize(self, *args: Any) -> None:
        super().initialize(*args)
        if not self._parents:
            raise HODLError(
                f"GKM node {self.name!r} has no upper node: add it to the Engine's dependencies "
                "(u2l: {upper: [lower]}, l2u: {lower: [upper]}); a GKM node only exists to be "
                "differentiated by an upper level"
            )
        self._expose_upper_variables()
        if not any(self in path for node in _ancestors(self) for path in node._paths):
            ups = [p.name for p in self._parents]
            raise HODLError(
                f"GKM node {self.name!r} is in l2u (its upper nodes {ups} read it) but no upper node lists "
                f"it in u2l, so no hypergradient ever reaches them and their variables never move: add "
                f"u2l {{{ups[0]}: [{self.name}]}} to the Engine's dependencies"
            )
        if self._coupled:
            self._bind_coupled_upper()

    def _bind_coupled_upper(self) -> None:
        """The upper node whose ``training_step`` is F (``config.aggregate_upper`` among several)."""
        name = _cfg(self.config, "aggregate_upper", None)
        ups = [p.name for p in self._parents]
        if name is not None:
            match = [p for p in self._parents if p.name == name]
            if not match:
                raise HODLError(
                    f"GKM node {self.name!r}: HODLConfig(aggregate_upper={name!r}) is not one of its upper "
                    f"nodes {ups}"
                )
            upper = match[0]
        elif len(self._parents) == 1:
            upper = self._parents[0]
        else:
            raise HODLError(
                f"GKM node {self.name!r} evaluates its upper objective F (HODLConfig(alpha=...) or type='gkm_ptt') "
                f"and has several upper nodes {ups}: "
                f"name the one whose training_step is F with HODLConfig(aggregate_upper=...), or define "
                "upper_objective(self, u, batch) on the node (e.g. the sum of their objectives)"
            )
        self._coupled_upper = upper
        self._lookahead = install_lookahead(upper)

    def _coupled_objective(self, u: Tensor) -> Tensor:
        r""":math:`F(u; x)`: the coupled upper node's ``training_step`` with ``u`` in place of :attr:`u`."""
        upper = self._coupled_upper
        if upper is None or self._lookahead is None:
            raise HODLError(
                f"GKM node {self.name!r} aggregates with its upper node's training_step, but it is not in an "
                "Engine yet (no upper node): build the Engine first, or define upper_objective(self, u, batch)"
            )
        # this node's Betty step serves the upper's coming step: its batch, drawn once and handed over;
        # a fresh solve() (called in or after the upper's step) uses the upper's batch of that step
        if self._own_step:
            batch = self._lookahead.peek()
        elif upper.cur_batch is None and upper.train_data_loader is not None:
            raise HODLError(
                f"GKM node {self.name!r}: a fresh solve aggregates with the training_step of upper node "
                f"{upper.name!r} on its current batch, and it has none yet (it has not stepped): run the "
                "Engine first, or define upper_objective(self, u, batch) on the GKM node"
            )
        else:
            batch = upper.cur_batch
        reads = self._u_reads
        self._aggregating = True
        try:
            with self._substituted(u):
                F = evaluate_upper(upper, batch)
        finally:
            self._aggregating = False
        if self._u_reads == reads:
            raise HODLError(
                f"GKM node {self.name!r}: the training_step of upper node {upper.name!r} does not read "
                f"self.{self.name}.u (or self.{self.name}()), so it cannot serve as F of the aggregation "
                f"(it may read self.{self.name}.module.u or .solution): read self.{self.name}.u there, or "
                "define upper_objective(self, u, batch) on the GKM node"
            )
        return F

    def _expose_upper_variables(self) -> None:
        """Register the upper nodes' modules in the operator, so that the implicit/inexact primitive
        receives their parameters as inputs (the operator reads them through ``self.<upper>.module``).

        Only the direct upper nodes: their variables are what the edge differentiates (``gkm_vjp``);
        a grandparent's variables, were they inputs too, would put this solve on the path of the
        grandparent's own direct gradient, which Betty takes without ``retain_graph``."""
        op = self._solver.T
        op.uppers = nn.ModuleList([p.module for p in self._parents if isinstance(p.module, nn.Module)])

    def step(self, global_step: Optional[int] = None) -> None:
        """Betty's step (the solve, then the upper nodes it makes ready), marked as in progress."""
        self._busy = True
        super().step(global_step=global_step)
        self._busy = False

    def patch_optimizer(self) -> None:  # a GKM node has no optimizer: its step is the GKM solve
        if self.optimizer is not None:
            super().patch_optimizer()

    def patch_module(self) -> None:
        # the iterate is per-process data, not a replicated model: never wrap it in DDP/FSDP
        self.module.to(self.device)

    def _build_solver(self) -> GKMSolver:
        cfg = self.config
        has_upper = type(self).upper_objective is not GKMProblem.upper_objective
        alpha = _cfg(cfg, "alpha", None)
        ptt = self.method.name == "ptt"  # compares F along the trajectory: F without aggregation by default
        if ptt and alpha is None:
            alpha = 0.0
        self._coupled = not has_upper and alpha is not None and (ptt or not _is_zero(alpha))
        upper: Any = None
        if has_upper:
            upper = lambda u: self.upper_objective(u, self._batch)  # noqa: E731
            alpha = Harmonic(1.0) if alpha is None else alpha
        elif self._coupled:
            upper = self._coupled_objective
        else:
            alpha = None

        T = _NodeOperator(self)
        options: dict[str, Any] = {}
        acceleration = _cfg(cfg, "acceleration", None)
        if acceleration is not None:
            if "acceleration" not in inspect.signature(GKMSolver.__init__).parameters:
                raise HODLError(
                    f"GKM node {self.name!r}: HODLConfig(acceleration=...) needs GKMSolver(acceleration=...), "
                    "which this version of hodl_plugin does not have; leave acceleration=None"
                )
            options["acceleration"] = acceleration
        return GKMSolver(
            T,
            max_steps=_cfg(cfg, "max_steps", 1000),
            **self._tolerances(cfg),
            hypergrad=self.method,
            upper=upper,
            upper_step=_cfg(cfg, "upper_step", 1.0),
            alpha=alpha,
            aggregation=_cfg(cfg, "aggregation", "inside"),
            beta=_cfg(cfg, "beta", 1.0),
            check_every=_cfg(cfg, "check_every", 10),
            on_divergence=_cfg(cfg, "on_divergence", "raise"),
            **options,
        )

    def _tolerances(self, cfg: Any) -> dict[str, Any]:
        """``tol``/``atol`` of the config for the solver (``tol=None``: the core's dtype default); gkm_inexact
        stops at its own ε_k (``eps``) instead, so they are not passed to it (HODLConfig warns if given)."""
        if self.method.name == "inexact":
            return {}
        return {"tol": _cfg(cfg, "tol", None), "atol": _cfg(cfg, "atol", 0.0)}

    def _run_solver(self, u0: Tensor, batch: Any) -> Tensor:
        """One solve; its warnings are re-issued naming this node, a stop before the tolerance is reported."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                z = self._solver(u0, key=self._key(batch))
            except ValueError as e:
                if self._coupled and "does not depend on u" in str(e):
                    up = self._coupled_upper.name
                    raise HODLError(
                        f"GKM node {self.name!r}: the training_step of upper node {up!r} does not depend on "
                        f"self.{self.name}.u (it reads it detached?), so it cannot serve as F of the aggregation: "
                        f"read self.{self.name}.u there, or define upper_objective(self, u, batch) on the GKM node"
                    ) from e
                raise
        info = self._solver.info
        cfg = self.config
        tol = _cfg(cfg, "tol", None)
        asked = tol is None or tol > 0 or _cfg(cfg, "atol", 0.0) > 0
        mode = _cfg(cfg, "on_nonconvergence", "warn")
        stopped = asked and not info.exact_steps and not info.converged and not info.diverged
        for w in caught:
            if str(w.message).startswith("Inexact warm start:"):
                continue  # the node's u0 is its own warm start of the same samples: nothing is lost
            if stopped and mode == "ignore" and issubclass(w.category, ConvergenceWarning):
                continue  # the user silenced the report of stops before the tolerance
            warnings.warn(f"GKM node {self.name!r}: {w.message}", w.category, stacklevel=3)
        if stopped and mode != "ignore":
            reported = any(issubclass(w.category, ConvergenceWarning) for w in caught)
            msg = (
                f"GKM node {self.name!r}: the lower solve stopped after {info.steps} steps with residual "
                f"{info.residual:.3e} above its tolerance {info.tol:.3e}, so this step's hypergradient is not "
                "the fixed point's: raise HODLConfig(max_steps=...) or check that the operator is a "
                "contraction (on_nonconvergence='ignore' silences this)"
            )
            if mode == "raise":
                raise HODLError(msg)
            if not reported:
                warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return z

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
        self._fresh_served = False
        self._own_step = True
        try:
            z = self._run_solver(self._start(batch), batch)
        finally:
            self._own_step = False
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
            "method_type": type(self.method).__name__,
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


def _is_zero(alpha: Any) -> bool:
    """``alpha`` that switches the aggregation off (0, or ``Constant(0)``)."""
    if isinstance(alpha, Constant):
        return alpha.c == 0
    return isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and float(alpha) == 0.0


def _ancestors(node: Any) -> Iterator[Any]:
    """The upper nodes of ``node``, their upper nodes, and so on (each once)."""
    seen: set[int] = set()
    stack = list(node._parents)
    while stack:
        p = stack.pop()
        if id(p) not in seen:
            seen.add(id(p))
            yield p
            stack.extend(p._parents)
