"""Type and range checks of :class:`~hodl_plugin.betty.HODLConfig`'s fields, run at construction.

Each check takes the field's name and value and returns the value to store (an integral float such
as ``1e4`` becomes ``10000``, as the core's ``GKMSolver(max_steps=1e4)`` accepts it) or raises a
``TypeError`` (wrong Python type) / ``ValueError`` (right type, out of range) whose message names
the field as the user wrote it, ``HODLConfig(<field>=...)``.

>>> count(1)("max_steps", 1e3)
1000
>>> count(1)("max_steps", "1000")
Traceback (most recent call last):
...
TypeError: HODLConfig(max_steps=...) must be an int >= 1, got '1000' (str)
>>> real(minimum=0.0)("tol", -1e-8)
Traceback (most recent call last):
...
ValueError: HODLConfig(tol=...) must be a finite number >= 0.0, got -1e-08
>>> choice("raise", "warn")("on_fail", "rasie")
Traceback (most recent call last):
...
ValueError: HODLConfig(on_fail=...) must be one of ['raise', 'warn'], got 'rasie'
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

from ..schedules import Schedule

Check = Callable[[str, Any], Any]


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def count(minimum: Optional[int]) -> Check:
    """An int ``>= minimum`` (any int when ``minimum`` is None; an integral float is accepted and stored as
    an int; ``bool`` is not)."""
    what = "an int" + ("" if minimum is None else f" >= {minimum}")

    def check(name: str, value: Any) -> int:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            integral = True
        if not integral:
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                raise ValueError(f"HODLConfig({name}=...) must be {what}, got {value!r}")
            raise TypeError(f"HODLConfig({name}=...) must be {what}, got {_got(value)}")
        if minimum is not None and int(value) < minimum:
            raise ValueError(f"HODLConfig({name}=...) must be {what}, got {value!r}")
        return int(value)

    return check


def real(minimum: Optional[float] = None, positive: bool = False, optional: bool = False) -> Check:
    """A finite real number (``int`` or ``float``, not ``bool``, not a string), ``>= minimum`` or ``> 0``;
    ``None`` too when ``optional``."""
    bound = "> 0" if positive else (f">= {minimum}" if minimum is not None else "")
    what = f"a finite number {bound}".rstrip() + (" or None" if optional else "")

    def check(name: str, value: Any) -> Optional[float]:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"HODLConfig({name}=...) must be {what}, got {_got(value)}")
        v = float(value)
        if not math.isfinite(v) or (positive and not v > 0) or (minimum is not None and v < minimum):
            raise ValueError(f"HODLConfig({name}=...) must be {what}, got {value!r}")
        return value

    return check


def schedule(optional: bool = False) -> Check:
    """A number or a :class:`~hodl_plugin.schedules.Schedule` (``None`` too when ``optional``)."""
    what = "a number or a hodl_plugin schedule (e.g. hp.Harmonic(1.0))" + (" or None" if optional else "")

    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, Schedule):
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"HODLConfig({name}=...) must be {what}, got {_got(value)}")
        if not math.isfinite(float(value)):
            raise ValueError(f"HODLConfig({name}=...) must be finite, got {value!r}")
        return value

    return check


def flag(name: str, value: Any) -> bool:
    """A ``bool`` (``0``/``1`` or ``"true"`` are refused: a YAML typo should not pass as a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"HODLConfig({name}=...) must be True or False, got {_got(value)}")
    return value


def choice(*allowed: str, optional: bool = False) -> Check:
    """One of the strings ``allowed`` (``None`` too when ``optional``)."""

    def check(name: str, value: Any) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise TypeError(f"HODLConfig({name}=...) must be one of {list(allowed)}, got {_got(value)}")
        if value not in allowed:
            raise ValueError(f"HODLConfig({name}=...) must be one of {list(allowed)}, got {value!r}")
        return value

    return check


def name_or_none(name: str, value: Any) -> Optional[str]:
    """``None`` or a string (a node's name)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"HODLConfig({name}=...) must be None or the name of a node (a str), got {_got(value)}")
    return value


def linear_solver(name: str, value: Any) -> Any:
    """``None``, a linear solver's name (``hodl_plugin.linear_solve.get``) or a factory
    ``f(rtol=, atol=, maxiter=)``."""
    if value is None or (callable(value) and not isinstance(value, str)):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"HODLConfig({name}=...) must be None, a linear solver's name (e.g. 'cg', 'gmres') or a factory "
            f"f(rtol=, atol=, maxiter=), got {_got(value)}"
        )
    from .. import linear_solve as ls

    try:
        ls.get(value)
    except (ValueError, KeyError) as e:
        raise ValueError(f"HODLConfig({name}=...): {e}") from None
    return value


def instance_of(cls: type, what: str) -> Check:
    """``None`` or an instance of ``cls`` (``what`` describes it in the message)."""

    def check(name: str, value: Any) -> Any:
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"HODLConfig({name}=...) must be None or {what}, got {type(value).__name__}")
        return value

    return check
