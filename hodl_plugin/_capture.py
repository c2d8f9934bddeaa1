r"""What an operator reads: its parameters as flat tensors, and the tensors it captures.

The implicit derivative of :math:`u^*(\theta)` needs every tensor :math:`\theta` that ``T`` depends
on as an *input* of the autograd primitive — not only the ``params`` passed to the solver, but also
the tensors ``T`` reads from its closure, from module attributes, or through
``torch.func.functional_call(net, p, ...)`` with a captured dict ``p``. Under ``torch.func``
transforms those tensors are wrapped (GradTrackingTensor, BatchedTensor); a primitive that did not
receive them would see a constant and return a zero derivative.

So :func:`bind` runs ``T`` once under a recording ``TorchFunctionMode`` and collects the tensors
that enter a torch operation without being produced inside ``T`` (its *leaves*) and that carry a
derivative (they require grad, are wrapped by a transform, or hold a forward-mode tangent). The
:class:`BoundOperator` then evaluates ``T`` on any replacement tensors: a second mode substitutes
each captured tensor, by identity, with its replacement in every torch operation ``T`` performs
(what ``functional_call`` does for module parameters, for any tensor).

>>> import torch
>>> W = torch.tensor([[0.5, 0.0], [0.1, 0.2]], requires_grad=True)
>>> T = lambda u, x: W @ u + x
>>> op = bind(T, torch.zeros(2), (torch.ones(2),))
>>> len(op.captured), op.captured[0] is W
(1, True)
>>> op(torch.ones(2), [torch.zeros(2), torch.eye(2)])      # T with x = 0 and W = I
tensor([1., 1.])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._torch_compat import (
    current_functorch_level,
    forward_ad_active,
    functorch_level,
    is_functorch_wrapped,
    transforms_active,
    unwrap_once,
    version,
)
from .errors import HODLError

__all__ = ["TreeSpec", "flatten", "unflatten", "bind", "BoundOperator", "refuse_leaks", "substitute", "detached"]


# ------------------------------------------------------------------------------------------------
# parameters as pytrees (tensors, and lists / tuples / dicts of them)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeSpec:
    """The structure of one parameter: ``kind`` ``"leaf"``, ``"list"``, ``"tuple"``, ``"namedtuple"``
    or ``"dict"``, with its children and (for dicts) keys."""

    kind: str
    children: tuple = ()
    keys: tuple = ()
    cls: Any = None
    value: Any = None  # a constant (kind "static")


_LEAF = TreeSpec("leaf")


def _flatten_one(obj: Any, out: list, where: str, static: bool) -> TreeSpec:
    if isinstance(obj, Tensor):
        out.append(obj)
        return _LEAF
    if isinstance(obj, dict):
        keys = tuple(obj)
        kids = tuple(_flatten_one(obj[k], out, f"{where}[{k!r}]", static) for k in keys)
        return TreeSpec("dict", kids, keys, type(obj))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        kids = tuple(_flatten_one(v, out, f"{where}.{f}", static) for f, v in zip(obj._fields, obj))
        return TreeSpec("namedtuple", kids, (), type(obj))
    if isinstance(obj, (list, tuple)):
        kids = tuple(_flatten_one(v, out, f"{where}[{i}]", static) for i, v in enumerate(obj))
        return TreeSpec("list" if isinstance(obj, list) else "tuple", kids)
    if static:
        return TreeSpec("static", value=obj)
    raise TypeError(
        f"{where} must be a torch.Tensor (or a list / tuple / dict of tensors), got {type(obj).__name__}; "
        "wrap numbers as tensors, e.g. torch.tensor([0.1], dtype=u0.dtype)"
    )


def flatten(params: Sequence[Any], static: bool = False) -> tuple[list[Tensor], tuple[TreeSpec, ...]]:
    """The tensors of ``params`` in order, and the structure to rebuild them; with ``static``,
    other leaves (numbers, strings, None) are kept in the structure as constants.

    >>> leaves, spec = flatten([torch.zeros(1), {"w": torch.ones(2)}])
    >>> len(leaves), unflatten(spec, leaves)[1]["w"]
    (2, tensor([1., 1.]))
    """
    out: list[Tensor] = []
    spec = tuple(_flatten_one(p, out, f"params[{i}]", static) for i, p in enumerate(params))
    return out, spec


def _unflatten_one(spec: TreeSpec, it: Any) -> Any:
    if spec.kind == "leaf":
        return next(it)
    if spec.kind == "static":
        return spec.value
    kids = [_unflatten_one(c, it) for c in spec.children]
    if spec.kind == "dict":
        return spec.cls(zip(spec.keys, kids)) if spec.cls is not dict else dict(zip(spec.keys, kids))
    if spec.kind == "namedtuple":
        return spec.cls(*kids)
    return kids if spec.kind == "list" else tuple(kids)


def detached(params: Sequence[Any]) -> list[Any]:
    """``params`` with every tensor leaf detached (the same nesting)."""
    leaves, spec = flatten(params)
    return unflatten(spec, [t.detach() for t in leaves])


def unflatten(spec: tuple[TreeSpec, ...], leaves: Sequence[Tensor]) -> list[Any]:
    """Inverse of :func:`flatten`."""
    if all(s is _LEAF for s in spec):
        return list(leaves[: len(spec)])
    it = iter(leaves)
    return [_unflatten_one(s, it) for s in spec]


# ------------------------------------------------------------------------------------------------
# the two torch-function modes
# ------------------------------------------------------------------------------------------------
class _Record(TorchFunctionMode):
    """Collects the tensors that enter torch operations without being produced by one of them."""

    def __init__(self, known: Sequence[Tensor]) -> None:
        super().__init__()
        self.known = {id(t) for t in known}
        self.produced: set[int] = set()
        self.keep: list[Tensor] = []  # produced tensors stay alive: their ids are not reused
        self.leaves: dict[int, Tensor] = {}

    def _scan(self, a: Any) -> None:
        if isinstance(a, Tensor):
            i = id(a)
            if i not in self.known and i not in self.produced and i not in self.leaves:
                self.leaves[i] = a
        elif isinstance(a, (list, tuple)):
            for x in a:
                self._scan(x)
        elif isinstance(a, dict):
            for x in a.values():
                self._scan(x)

    def _mark(self, out: Any) -> None:
        if isinstance(out, Tensor):
            self.produced.add(id(out))
            self.keep.append(out)
        elif isinstance(out, (list, tuple)):
            for x in out:
                self._mark(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # the common case inline (flat arguments, one tensor out): this runs for every operation of T
        known, produced, leaves = self.known, self.produced, self.leaves
        for a in args:
            if isinstance(a, Tensor):
                i = id(a)
                if i not in known and i not in produced and i not in leaves:
                    leaves[i] = a
            elif isinstance(a, (list, tuple, dict)):
                self._scan(a)
        if kwargs:
            self._scan(kwargs)
            out = func(*args, **kwargs)
        else:
            out = func(*args)
        if isinstance(out, Tensor):
            produced.add(id(out))
            self.keep.append(out)
        else:
            self._mark(out)
        return out


class substitute(TorchFunctionMode):
    """Within the block, every torch operation sees ``new[i]`` wherever it gets ``old[i]`` (by identity).

    >>> a, b = torch.ones(2), torch.zeros(2)
    >>> with substitute([a], [b]):
    ...     a + 1
    tensor([1., 1.])
    """

    def __init__(self, old: Sequence[Tensor], new: Sequence[Tensor]) -> None:
        super().__init__()
        self.map = {id(o): n for o, n in zip(old, new) if o is not n}

    def _swap(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            return self.map.get(id(a), a)
        if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
            swapped = [self._swap(x) for x in a]
            return a if all(x is y for x, y in zip(swapped, a)) else type(a)(swapped)
        if isinstance(a, dict):
            return {k: self._swap(v) for k, v in a.items()}
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return func(*self._swap(args), **(self._swap(kwargs) if kwargs else {}))


def _carries_derivative(t: Tensor, level: int) -> bool:
    """Whether a leaf is a tensor of the caller's that carries a derivative; a tensor wrapped at a
    deeper ``torch.func`` level than ``level`` was made inside T (by a transform T runs itself)."""
    if not (t.is_floating_point() or t.is_complex()):
        return False
    if functorch_level(t) > level:
        return False
    if t.requires_grad or is_functorch_wrapped(t):
        return True
    return forward_ad_active() and fwAD.unpack_dual(t).tangent is not None


# ------------------------------------------------------------------------------------------------
# the bound operator
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundOperator:
    r"""``T`` as a function of explicit tensors: ``op(u, tensors)`` is ``T(u, *params)`` with
    ``tensors = [*leaves of params, *captured]``; wherever ``T`` reads one of the original tensors (a
    parameter it also reads from its closure, or a captured one), it reads the replacement.

    Attributes:
        T: the operator ``T(u, *params)``.
        spec: the structure of ``params`` (:func:`flatten`).
        n_params: how many of ``tensors`` are leaves of ``params``.
        captured: the tensors ``T`` (and ``extra`` functions given to :func:`bind`) read that carry
            a derivative, in the order they are appended to ``tensors``.
        originals: the leaves of ``params`` as given (substituted too, where ``T`` reads them from its
            closure as well).
        first: ``(u, T(u))`` of the binding run, when it may serve as the solve's first evaluation.
        reads_originals: whether the binding run saw ``T`` read a leaf of ``params`` from its closure
            (it was called with aliases of them): if not, no substitution of ``originals`` is needed (a
            torch-function mode over a whole solve costs a Python call per operation).
    """

    T: Callable[..., Tensor]
    spec: tuple[TreeSpec, ...]
    n_params: int
    captured: tuple[Tensor, ...] = ()
    originals: tuple[Tensor, ...] = ()
    first: Any = None  # (u, T(u)) of the binding run, when it may serve as the solve's first evaluation
    reads_originals: bool = True  # whether T reads a leaf of params from its closure (not only as an argument)
    slots: tuple = ()  # (module, "_parameters" or "_buffers", name, tensor) of the modules T reads, as bound

    def params(self, tensors: Sequence[Tensor]) -> list[Any]:
        """The solver's ``params`` rebuilt from ``tensors``."""
        return unflatten(self.spec, tensors[: self.n_params])

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The tensors as bound: ``[*originals, *captured]``."""
        return (*self.originals, *self.captured)

    def context(self, tensors: Sequence[Tensor]) -> Any:
        """The substitution of the bound tensors by ``tensors`` (a no-op when they are the same)."""
        old = self.inputs if self.reads_originals else ()
        if len(old) != len(tensors) or all(a is b for a, b in zip(old, tensors)):
            if len(old) == len(tensors):
                return _NULL
            old = self.captured  # a lifted or rebuilt call: only the captured tensors are known
            tensors = tensors[self.n_params:]
            if all(a is b for a, b in zip(old, tensors)):
                return _NULL
        return substitute(old, tensors)

    def __call__(self, u: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        with self.context(tensors), _reinstalled(self.slots):
            return self.T(u, *self.params(tensors))

    def leaked(self) -> list[tuple[int, Tensor]]:
        """``(slot, tensor)`` of the bound tensors that require grad in plain autograd: where ``T``
        reaches one of them through a path a torch-function mode cannot re-route (a custom
        ``autograd.Function`` computing with it, ``torch.jit``, a ``torch.vmap`` inside T), its output
        still depends on the original, and the first-order pass adds that dependence."""
        return [(i, t) for i, t in enumerate(self.inputs) if t.requires_grad and not is_functorch_wrapped(t)]


def refuse_leaks(op: Any, u: Tensor, ts: Sequence[Tensor], what: str) -> None:
    """Higher orders need every path from a bound tensor to T's output routed through the primitive's
    inputs; a path the substitution cannot re-route (see :meth:`BoundOperator.leaked`) is refused."""
    if not isinstance(op, BoundOperator) or transforms_active():
        return
    leaks = op.leaked()
    if not leaks:
        return
    with torch.enable_grad():
        f = op(u.detach(), [t.detach() for t in ts])
        if not f.requires_grad:
            return
        probe = torch.randn(f.shape, generator=torch.Generator().manual_seed(7), dtype=f.dtype).to(f.device)
        reached = torch.autograd.grad(f, [t for _, t in leaks], probe, allow_unused=True)
    bad = [tuple(t.shape) for (_, t), r in zip(leaks, reached) if r is not None]
    if bad:
        raise HODLError(
            f"{what} through tensor(s) of shape {bad} that T reaches through a custom autograd.Function, "
            "torch.jit or a torch.vmap inside T is not supported (their first-order gradients are exact): "
            "pass them as parameters, solver(u0, ..., W) with T(u, ..., W), or use hypergrad='unrolled'"
        )


def _modules_of(T: Any, depth: int = 4) -> list[nn.Module]:
    """The modules ``T`` reads, found by following what it refers to (``depth`` links deep): a module
    itself and the callables among its attributes (a ``GradientStep``'s objective), the object and function
    of a bound method, the function and arguments of a ``functools.partial``, a function's closure cells
    and the module-level names its code reads, a callable object's attributes."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    todo = [(T, depth)]
    while todo:
        obj, d = todo.pop()
        if id(obj) in seen or d < 0:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.append(obj)
            todo += [(v, d - 1) for m in obj.modules() for v in vars(m).values() if _refers(v)]
        elif isinstance(obj, functools.partial):
            todo += [(v, d - 1) for v in (obj.func, *obj.args, *obj.keywords.values())]
        elif getattr(obj, "__self__", None) is not None and hasattr(obj, "__func__"):
            todo += [(obj.__self__, d - 1), (obj.__func__, d - 1)]
        elif hasattr(obj, "__code__"):
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    todo.append((cell.cell_contents, d - 1))
                except ValueError:  # an empty cell
                    pass
            env = getattr(obj, "__globals__", {})
            todo += [(env[n], d - 1) for n in obj.__code__.co_names if n in env and _refers(env[n])]
        elif callable(obj) and not isinstance(obj, type) and hasattr(obj, "__dict__"):
            todo += [(v, d - 1) for v in vars(obj).values() if _refers(v)]
    return found


def _refers(v: Any) -> bool:
    """Whether ``v`` may lead to a module T reads: a module, or a callable that is not a class and not
    from torch, numpy, hodl_plugin or the standard library's functional helpers (their references lead to
    no module of the user's)."""
    if isinstance(v, nn.Module):
        return True
    if not callable(v) or isinstance(v, type):
        return False
    return not (getattr(v, "__module__", None) or "builtins").startswith(_LIBRARIES)


_LIBRARIES = ("torch", "numpy", "hodl_plugin", "builtins", "functools", "math", "operator", "typing")


def _slots(T: Any) -> tuple:
    """``(module, kind, name, tensor)`` for every parameter and buffer of the modules ``T`` reads
    (:func:`_modules_of`, with their submodules), as they are now."""
    out, seen = [], set()
    for m in _modules_of(T):
        for sub in m.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for kind in ("_parameters", "_buffers"):
                out += [(sub, kind, name, t) for name, t in getattr(sub, kind).items() if t is not None]
    return tuple(out)


class _reinstalled:
    """Within the block, the modules' parameters and buffers are the tensors they were at binding: a
    replay of ``T`` after the caller's ``torch.func.functional_call`` (or another reparametrization) has
    ended reads the tensors the solve read — what ``functional_call`` itself does, for the modules T reads."""

    __slots__ = ("slots", "swapped")

    def __init__(self, slots: tuple) -> None:
        self.slots = slots
        self.swapped: list = []

    def __enter__(self) -> None:
        for sub, kind, name, t in self.slots:
            d = getattr(sub, kind)
            now = d.get(name)
            if now is not t:
                self.swapped.append((d, name, now))
                d[name] = t

    def __exit__(self, *exc: Any) -> None:
        for d, name, now in reversed(self.swapped):
            d[name] = now
        self.swapped.clear()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL = _Null()


def bind(T: Callable[..., Tensor], u: Tensor, params: Sequence[Any],
         extra: Sequence[Callable[[], Any]] = (), static: bool = False, keep: bool = False) -> BoundOperator:
    """Bind ``T`` to explicit tensors: the leaves of ``params`` and the tensors it captures.

    ``T(u, *params)`` runs once (without autograd) to find the captured tensors; ``extra`` are more
    callables (e.g. the upper objective's gradient) whose captured tensors are collected too;
    ``static``: non-tensor leaves of ``params`` are constants (:func:`flatten`). With ``keep`` (and
    outside ``torch.func`` transforms and forward-mode AD, where the value would be wrapped) that
    run is checked like a solve's first step (no write into ``u`` or ``params``, output shaped like
    ``u``) and kept as ``first = (u, T(u))``, so that the solve need not evaluate ``T(u)`` again.
    """
    from ._checks import check_operator_output, inplace_error

    leaves, spec = flatten(params, static)
    # T is called with aliases of the leaves: a leaf it still reads as itself comes from its closure
    aliases = [t.view_as(t) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) else t
               for t in leaves]
    called = unflatten(spec, aliases) if any(a is not t for a, t in zip(aliases, leaves)) else list(params)
    rec = _Record([u, *aliases])
    level = current_functorch_level()
    keep = keep and level == 0 and not forward_ad_active() and not any(t.is_inference() for t in (u, *leaves))
    versions = [version(t) for t in (u, *leaves)] if keep else []
    # in plain autograd the run keeps its graph, to find tensors T reaches unseen (see _hidden)
    graph = torch.is_grad_enabled() and not transforms_active()
    with torch.set_grad_enabled(graph), rec:
        out = T(u, *called)
        for fn in extra:
            fn()
    first = None
    if keep:
        changed = [i for i, (t, v) in enumerate(zip((u, *leaves), versions)) if version(t) != v]
        if changed:
            raise inplace_error(changed[0])
        check_operator_output(out, u)
        first = (u, out.detach() if isinstance(out, Tensor) else out)
    leaf_ids = {id(t) for t in leaves}
    reads = any(i in leaf_ids for i in rec.leaves)
    captured = tuple(t for t in rec.leaves.values() if id(t) not in leaf_ids and _carries_derivative(t, level))
    inner = [t for t in rec.leaves.values() if functorch_level(t) > level and (t.is_floating_point() or t.is_complex())]
    bases = [b for b in (_base(t, level) for t in inner)
             if b is not None and id(b) not in rec.produced and id(b) not in rec.known]
    reads = reads or any(id(b) in leaf_ids for b in bases)
    bases = [b for b in bases if id(b) not in leaf_ids]
    if bases and transforms_active():
        shapes = sorted({tuple(b.shape) for b in bases})
        raise HODLError(
            f"T reads tensor(s) of shape {shapes} from its closure through a torch.func transform it runs itself "
            "(e.g. torch.vmap inside T): under torch.func transforms their derivative cannot be routed through "
            "the implicit primitive. Pass them as parameters, solver(u0, ..., W) with T(u, ..., W), or use "
            "hypergrad='unrolled'"
        )
    captured += tuple(b for b in dict.fromkeys(bases) if b not in captured and _carries_derivative(b, level))
    if graph and isinstance(out, Tensor) and out.requires_grad:
        hidden = _hidden(out, [u, *leaves, *aliases, *captured, *rec.keep])
        if hidden:
            raise HODLError(
                f"T depends on tensor(s) of shape {sorted({tuple(t.shape) for t in hidden})} that require grad but "
                "never enter a torch operation hodl_plugin can see (read inside torch.jit code or a compiled "
                "extension): their implicit derivative would be lost. Pass them as parameters, solver(u0, ..., W) "
                "with T(u, ..., W), or use hypergrad='unrolled'"
            )
    return BoundOperator(T, spec, len(leaves), captured, tuple(leaves), first, reads, _slots(T))


def _hidden(out: Tensor, known: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that ``out``'s graph reaches, not through a ``known`` tensor (the
    walk stops at a known tensor's node: what lies behind it is the caller's own graph)."""
    stop = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    ids = {id(t) for t in known}
    seen, stack, found = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in ids:
            found.append(var)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _base(t: Tensor, level: int) -> Optional[Tensor]:
    """The tensor a transform inside T wrapped (``t`` unwrapped down to ``level``)."""
    while functorch_level(t) > level:
        t = unwrap_once(t)
        if t is None:
            return None
    return t
