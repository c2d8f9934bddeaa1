"""hodl_plugin — Hierarchical Optimization-Derived Learning for the PyTorch bilevel ecosystem.

The public API in one place:

- :class:`GKMSolver` — the lower-level GKM fixed-point solver with HODL aggregation
  (:mod:`hodl_plugin.solver`, iteration in :mod:`hodl_plugin.gkm`);
- hypergradient methods :class:`Unrolled`, :class:`Truncated`, :class:`FirstOrder`
  (:mod:`hodl_plugin.hypergrad`), :class:`Implicit` (:mod:`hodl_plugin.implicit`),
  :class:`Inexact` (:mod:`hodl_plugin.inexact`), and the baselines :class:`PTT` (:mod:`hodl_plugin.ptt`),
  :class:`FiniteDifference` (:mod:`hodl_plugin.finite_difference`), :class:`IGA` (:mod:`hodl_plugin.iga`),
  with :class:`LearnedInit` (:mod:`hodl_plugin.learned_init`) for a learned starting point;
- the implicit derivative of *any* solver: :func:`custom_fixed_point`, :func:`custom_root`
  (:mod:`hodl_plugin.custom`);
- forward acceleration :class:`Anderson` (:mod:`hodl_plugin.acceleration`);
- the operator library (:mod:`hodl_plugin.operators`) and proximal maps (:mod:`hodl_plugin.prox`);
- schedules (:mod:`hodl_plugin.schedules`), the "as in the papers" configuration
  :func:`paper_config` (:mod:`hodl_plugin.presets`) and adjoint linear solvers
  (:mod:`hodl_plugin.linear_solve`);
- the certified error bound of the inexact mode (:mod:`hodl_plugin.bound`);
- first-order bilevel baselines that move both levels, :class:`BOME`, :class:`PGDO`, :class:`MESO`,
  :class:`ALTO` (:mod:`hodl_plugin.baselines`; BOAT's ``fo_ol`` operations).

The Betty adapter lives in :mod:`hodl_plugin.betty` and is the only module that imports Betty.
"""

from . import (
    acceleration,
    baselines,
    bound,
    custom,
    errors,
    finite_difference,
    iga,
    implicit,
    inexact,
    krylov,
    learned_init,
    linear_solve,
    operators,
    presets,
    prox,
    ptt,
    schedules,
)
from .acceleration import Anderson, Broyden
from .baselines import ALTO, BOME, MESO, PGDO
from .bound import BoundConstants
from .custom import custom_fixed_point, custom_root
from .errors import (
    ConfigurationError,
    ConvergenceWarning,
    DivergenceError,
    HODLError,
    HypergradientError,
    LinearSolveError,
    NotAffineError,
    ScheduleError,
    SummableScheduleWarning,
    UnusedOptionWarning,
)
from .finite_difference import FiniteDifference
from .gkm import SolverInfo
from .hypergrad import FirstOrder, HypergradMethod, Truncated, Unrolled, get_method
from .iga import IGA
from .implicit import Implicit
from .inexact import Inexact
from .learned_init import LearnedInit
from .operators import GradientStep, KMAveraged, LearnedResidual, ProximalGradient, functional_operator
from .presets import paper_config
from .ptt import PTT
from .schedules import Constant, Geometric, Harmonic, Log, Polynomial
from .solver import GKMSolver

__version__ = "0.1.0"

__all__ = [
    "GKMSolver",
    "SolverInfo",
    "Anderson",
    "Broyden",
    "HypergradMethod",
    "Unrolled",
    "Truncated",
    "Implicit",
    "Inexact",
    "FirstOrder",
    "PTT",
    "FiniteDifference",
    "IGA",
    "LearnedInit",
    "get_method",
    "custom_fixed_point",
    "custom_root",
    "paper_config",
    "GradientStep",
    "ProximalGradient",
    "LearnedResidual",
    "KMAveraged",
    "functional_operator",
    "Constant",
    "Polynomial",
    "Harmonic",
    "Log",
    "Geometric",
    "BoundConstants",
    "HODLError",
    "ScheduleError",
    "ConfigurationError",
    "DivergenceError",
    "LinearSolveError",
    "HypergradientError",
    "NotAffineError",
    "ConvergenceWarning",
    "SummableScheduleWarning",
    "UnusedOptionWarning",
    "BOME",
    "PGDO",
    "MESO",
    "ALTO",
    "acceleration",
    "baselines",
    "bound",
    "custom",
    "errors",
    "finite_difference",
    "iga",
    "implicit",
    "inexact",
    "learned_init",
    "krylov",
    "linear_solve",
    "operators",
    "presets",
    "prox",
    "ptt",
    "schedules",
]
