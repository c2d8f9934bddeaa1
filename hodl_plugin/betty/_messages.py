"""The core's error messages in a Betty user's words: ``HODLConfig`` fields instead of ``GKMSolver`` keywords.

A Betty user sets ``HODLConfig(linear_solver=..., type=...)``, not ``GKMSolver(solver=...,
hypergrad=...)``; a message that names the core's keywords sends them to options their config does
not have. :func:`in_config_terms` rewrites the keywords the core's adjoint messages name.

>>> in_config_terms("use hypergrad='unrolled', or the solver needs more iterations (adjoint_maxiter) / "
...                 "another method (solver='gmres')")
"use HODLConfig(type='gkm_unrolled'), or the solver needs more iterations (HODLConfig(adjoint_maxiter=...)) / \
another method (HODLConfig(linear_solver='gmres'))"
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..hypergrad import default_adjoint_rtol

#: (core keyword pattern, the HODLConfig spelling)
_NOT_DONE = r"(?<!HODLConfig\()(?<![\w.])"  # not inside a HODLConfig(...) already, not an attribute
_REWRITES = (
    (re.compile(_NOT_DONE + r"hypergrad='(unrolled|truncated|first_order|implicit|inexact)'"),
     r"HODLConfig(type='gkm_\1')"),
    (re.compile(_NOT_DONE + r"solver='(\w+)'"), r"HODLConfig(linear_solver='\1')"),
    (re.compile(_NOT_DONE + r"adjoint_maxiter(?![\w=])"), "HODLConfig(adjoint_maxiter=...)"),
    (re.compile(_NOT_DONE + r"adjoint_rtol(?![\w=])"), "HODLConfig(adjoint_rtol=...)"),
    (re.compile(_NOT_DONE + r"check_unique=False"), "HODLConfig(method=hp.Implicit(check_unique=False))"),
)

#: the advice to switch to the method that just failed, e.g. "/ another method (solver='gmres')" after GMRES
_SAME_METHOD = re.compile(r"\s*/\s*another method \(solver='(\w+)'\)")


def in_config_terms(message: str, method: Optional[str] = None) -> str:
    """``message`` with the core's keywords replaced by :class:`~hodl_plugin.betty.HODLConfig` fields; the
    advice to switch to ``method`` (the linear solver that just failed) is dropped."""
    if method is not None:
        message = _SAME_METHOD.sub(lambda m: "" if m.group(1) == method else m.group(0), message)
    for pattern, repl in _REWRITES:
        message = pattern.sub(repl, message)
    return message


def resolution_note(threshold: float, rhs_norm: float, dtype: torch.dtype, inexact: bool = False) -> str:
    """A sentence when the adjoint threshold relative to ``‖b‖`` is below what ``dtype`` resolves, else ``""``
    (its advice names ``delta`` for the inexact mode, whose adjoint stops at δ_k, else ``adjoint_rtol``).

    >>> resolution_note(1e-13, 1.0, torch.float32)[:60]
    'the adjoint threshold is 1.0e-13 relative to the right-hand '
    >>> resolution_note(1e-5, 1.0, torch.float32)
    ''
    """
    eps = torch.finfo(dtype).eps
    if not rhs_norm > 0 or threshold / rhs_norm >= 10 * eps:
        return ""
    fix = (
        f"raise HODLConfig(delta=...) to >= {100 * eps:.1e} (relative)" if inexact else
        f"leave HODLConfig(adjoint_rtol=None) (the dtype's default, {default_adjoint_rtol(dtype):.1e}) or set "
        f"one >= {100 * eps:.1e}"
    )
    return (
        f"the adjoint threshold is {threshold / rhs_norm:.1e} relative to the right-hand side, below what "
        f"{dtype} resolves (eps = {eps:.1e}): no solver reaches it, and this says nothing about singularity; {fix}."
    )
