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
``"gkm_ptt"``               :class:`GKMProblem`: IAPTT-GM's pessimistic trajectory truncation (F: the
                            node's ``upper_objective`` or the upper node's ``training_step``)
``"gkm_fd"``                :class:`GKMProblem` with ``lower_objective``: DARTS's finite differences
                            (``fd_radius``)
``"gkm_iga"``               :class:`GKMProblem` with ``lower_objective``: implicit gradient
                            approximation (Gauss–Newton multiplier)
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

from . import _betty  # noqa: F401  (first: without Betty, the ImportError names the install command)
from .checkpoint import engine_state_dict, load_checkpoint, load_engine_state_dict, save_checkpoint
from .config import GKM_METHODS, IMPLICIT_METHODS, HODLConfig
from .distributed import unwrap
from .engine import HODLEngine
from .errors import CheckpointError, CheckpointWarning, WiringWarning
from .hypergradients import gkm_vjp, implicit_vjp, register, set_log_level
from .nodes import GKMProblem

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
    "CheckpointError",
    "CheckpointWarning",
    "WiringWarning",
]
