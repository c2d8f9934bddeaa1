"""Checkpoints of a Betty engine of HODL nodes (Betty has none): save, validate, restore, resume.

A checkpoint is taken *between* global steps. It holds, per problem, the module, optimizer,
scheduler, local step counter and data-loader epochs, and for :class:`GKMProblem` nodes the
iterate, the warm starts and the hypergradient method's state; plus the engine's global step and the
torch / python / numpy RNG states. Loading it into a freshly built engine and calling ``run()``
gives the uninterrupted run bit for bit on CPU. What cannot resume that way is refused with a
:class:`CheckpointError` that says why (a step interrupted midway, an engine that already ran, a
checkpoint past ``train_iters``, another graph, a file that is not a checkpoint) or, for a
shuffling ``DataLoader`` without a seeded ``generator``, warned about (:class:`CheckpointWarning`).
Saves are atomic (a temporary file renamed over the target); loads validate everything before
changing the engine, and restore it if applying fails anyway.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import random
import tempfile
import warnings
from typing import Any, Union

import numpy as np
import torch

from .errors import CheckpointError, CheckpointWarning
from .nodes import GKMProblem

__all__ = ["engine_state_dict", "load_engine_state_dict", "save_checkpoint", "load_checkpoint"]

#: marks a file as ours (and its layout version)
FORMAT = "hodl_plugin.betty checkpoint"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------ RNG
def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, keys, pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ what can be saved
def _loaders(p: Any) -> list[Any]:
    return list(p.train_data_loader) if p.train_data_loader is not None else []


def _warn_unseeded_shuffle(engine: Any, when: str) -> None:
    for p in engine.problems:
        for loader in _loaders(p):
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
                warnings.warn(
                    f"problem {p.name!r}: its DataLoader shuffles without a seeded generator, so the run "
                    f"{when} this checkpoint will see other batches than an uninterrupted one. Pass "
                    "DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(seed)) to resume "
                    "exactly",
                    CheckpointWarning,
                    stacklevel=3,
                )


def _check_between_steps(engine: Any) -> None:
    """Refuse an engine stopped inside a global step (e.g. by Ctrl-C during a solve)."""
    busy = [p.name for p in engine.problems if getattr(p, "_busy", False) or any(getattr(p, "ready", []) or [])]
    if getattr(engine, "_hodl_in_step", False) or busy:
        raise CheckpointError(
            f"the engine stopped inside global step {engine.global_step} (problems {busy} are half-way "
            "through it, e.g. after a Ctrl-C during a solve), so a checkpoint now would not resume like an "
            "uninterrupted run. Save between steps: run a hodl_plugin.betty.HODLEngine, whose run() "
            "finishes the current step on Ctrl-C before raising KeyboardInterrupt, or save periodically"
        )


def engine_state_dict(engine: Any) -> dict[str, Any]:
    """Everything needed to resume a Betty ``Engine`` of HODL nodes exactly (see the module docstring).

    Take it between global steps (after ``run()``, after a :class:`HODLEngine` raised
    ``KeyboardInterrupt``, or in a callback); inside a step it raises :class:`CheckpointError`.

    Args:
        engine: a Betty ``Engine`` (or :class:`HODLEngine`) built with hodl_plugin nodes.

    Returns:
        dict: modules, optimizers, schedulers, counters, GKM iterates and warm starts, the inexact
        mode's state and the random generators, all tensors (``torch.save``-able).

    Raises:
        CheckpointError: called inside a global step.

    Example — the state after 3 steps (:func:`save_checkpoint` writes it to a file):

    >>> import torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):                        # u*(x) = 2x
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):                       # F = ||u* - 1||^2, minimised at x = 1/2
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build(steps):
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     return hb.HODLEngine([up, low], EngineConfig(train_iters=steps, strategy="cpu"),
    ...                          dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}), m, up, low
    >>> engine, m, up, low = build(3); engine.run()
    >>> state = hb.engine_state_dict(engine)
    >>> state["global_step"], sorted(state["problems"]), state["problems"]["low"]["count"]
    (3, ['low', 'up'], 3)
    """
    _check_between_steps(engine)
    _warn_unseeded_shuffle(engine, "resumed from")
    problems = {}
    for p in engine.problems:
        st: dict[str, Any] = {
            "module": p.module.state_dict(),
            "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
            "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
            "count": p._count,
            "inner_loop_start": bool(getattr(p, "_inner_loop_start", True)),
            "epoch_counter": list(p.epoch_counter) if p.epoch_counter is not None else None,
        }
        if isinstance(p, GKMProblem):
            st["hodl"] = p.hodl_state_dict()
        problems[p.name] = st
    return {
        "format": FORMAT,
        "version": VERSION,
        "global_step": engine.global_step,
        "problems": copy.deepcopy(problems),
        "rng": _rng_state(),
    }


# ------------------------------------------------------------------------------ validate, then apply
def _fail(source: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {why}")


def _validate(engine: Any, state: Any, source: str) -> None:
    """Every check that can be made without changing the engine."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _fail(source, "not a valid hodl_plugin checkpoint (no hodl_plugin.betty checkpoint marker); "
                    "write checkpoints with hodl_plugin.betty.save_checkpoint")
    if state.get("version") != VERSION:
        raise _fail(source, f"checkpoint layout version {state.get('version')!r}, this hodl_plugin reads {VERSION}")
    for key in ("global_step", "problems", "rng"):
        if key not in state:
            raise _fail(source, f"not a valid hodl_plugin checkpoint (no {key!r})")
    ran = {p.name: p._count for p in engine.problems if p._count}
    if engine.global_step or ran:
        raise _fail(source, f"load into a freshly built engine: this one already ran {engine.global_step} global "
                    f"steps (local steps {ran}), its data iterators and optimizer states have moved. Build the "
                    "engine again and load before run()")
    total, step = engine.config.train_iters, state["global_step"]
    if step > total:
        raise _fail(source, f"the checkpoint is at global step {step}, past this engine's "
                    f"EngineConfig(train_iters={total}); build the engine with train_iters = the total number of "
                    f"steps (>= {step}), as for the run that wrote it")
    by_name = {p.name: p for p in engine.problems}
    if set(state["problems"]) != set(by_name):
        raise _fail(source, f"the checkpoint's graph has problems {sorted(state['problems'])}, this engine "
                    f"{sorted(by_name)}: load it into an engine built like the one that wrote it")
    for name, st in state["problems"].items():
        p = by_name[name]
        mine = p.module.state_dict()
        if set(st["module"]) != set(mine):
            raise _fail(source, f"problem {name!r}: module parameters {sorted(st['module'])} in the checkpoint, "
                        f"{sorted(mine)} in this engine")
        if not isinstance(p, GKMProblem):
            for k, v in st["module"].items():
                if isinstance(v, torch.Tensor) and v.shape != mine[k].shape:
                    raise _fail(source, f"problem {name!r}: {k} has shape {tuple(v.shape)} in the checkpoint, "
                                f"{tuple(mine[k].shape)} in this engine")
        for what, obj in (("optimizer", p.optimizer), ("scheduler", p.scheduler)):
            if (st[what] is None) != (obj is None):
                raise _fail(source, f"problem {name!r}: the checkpoint has {'no ' if st[what] is None else 'a '}"
                            f"{what}, this engine {'has one' if obj is not None else 'none'}")
        if p.optimizer is not None:
            saved = [len(g["params"]) for g in st["optimizer"]["param_groups"]]
            here = [len(g["params"]) for g in p.optimizer.param_groups]
            if saved != here:
                raise _fail(source, f"problem {name!r}: optimizer parameter groups of sizes {saved} in the "
                            f"checkpoint, {here} in this engine")
        if isinstance(p, GKMProblem):
            hodl = st.get("hodl")
            if hodl is None:
                raise _fail(source, f"problem {name!r} is a GKM node here but not in the checkpoint")
            saved_type, here_type = hodl.get("method_type"), type(p.method).__name__
            if saved_type != here_type:
                raise _fail(source, f"GKM node {name!r}: the checkpoint holds the state of a {saved_type} "
                            f"hypergradient, this node uses {here_type} (config.type={p.config.type!r})")
        elif "hodl" in st:
            raise _fail(source, f"problem {name!r} is a GKM node in the checkpoint but not in this engine")
        n_loaders = len(_loaders(p))
        if st["epoch_counter"] is not None and len(st["epoch_counter"]) != n_loaders:
            raise _fail(source, f"problem {name!r}: {len(st['epoch_counter'])} data loaders in the checkpoint, "
                        f"{n_loaders} in this engine")


def _snapshot(engine: Any) -> dict[str, Any]:
    """The parts of a fresh engine that applying a checkpoint changes (to roll back a failed apply)."""
    return {
        "rng": _rng_state(),
        "train_iters": engine.train_iters,
        "problems": {
            p.name: copy.deepcopy({
                "module": p.module.state_dict(),
                "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
                "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
                "epoch_counter": list(p.epoch_counter) if p.epoch_counter is not None else None,
                "inner_loop_start": getattr(p, "_inner_loop_start", True),
                "hodl": p.hodl_state_dict() if isinstance(p, GKMProblem) else None,
            })
            for p in engine.problems
        },
    }


def _load_module_states(p: Any, st: dict[str, Any]) -> None:
    """The node's module, optimizer and scheduler from its saved entry."""
    p.module.load_state_dict(st["module"])
    if st["optimizer"] is not None:
        p.optimizer.load_state_dict(st["optimizer"])
    if st["scheduler"] is not None:
        p.scheduler.load_state_dict(st["scheduler"])


def _restore(engine: Any, snap: dict[str, Any]) -> None:
    for p in engine.problems:
        st = snap["problems"][p.name]
        if st["hodl"] is not None:
            p.load_hodl_state_dict(st["hodl"])
        _load_module_states(p, st)
        if p.train_data_loader is not None:
            p.train_data_iterator = [iter(loader) for loader in p.train_data_loader]
            p.epoch_counter = list(st["epoch_counter"])
        p._inner_loop_start = st["inner_loop_start"]
        p._count = 0
    engine.global_step = 0
    engine.train_iters = snap["train_iters"]
    _set_rng_state(snap["rng"])


def _apply(engine: Any, state: dict[str, Any]) -> None:
    by_name = {p.name: p for p in engine.problems}
    for name, st in state["problems"].items():
        p = by_name[name]
        if isinstance(p, GKMProblem):
            p.load_hodl_state_dict(st["hodl"])  # first: it sets u's shape
        _load_module_states(p, st)
        # replay the data loaders to the same position (one batch per local step)
        if p.train_data_loader is not None:
            for _ in range(st["count"]):
                for idx in range(len(p.train_data_loader)):
                    p.get_batch_single_loader(idx)
        p._count = st["count"]
        p._inner_loop_start = st.get("inner_loop_start", True)
    engine.global_step = state["global_step"]
    engine.train_iters = engine.config.train_iters - state["global_step"]
    _set_rng_state(state["rng"])


def load_engine_state_dict(engine: Any, state: dict[str, Any], source: str = "checkpoint") -> None:
    r"""Restore :func:`engine_state_dict` into a freshly built engine (same problems, loaders and
    ``train_iters`` = the total): ``engine.run()`` then runs the remaining iterations and equals an
    uninterrupted run bit for bit on CPU (for data loaders that do not shuffle, or shuffle with a
    seeded ``generator``, which the replay reproduces).

    Everything is validated first (:class:`CheckpointError`, naming ``source``); if applying still
    fails, the engine is put back as it was before the call.

    Args:
        engine: a freshly built engine of the same graph.
        state: a dictionary from :func:`engine_state_dict`.
        source: how to name the state in error messages (a file name).

    Returns:
        None: the engine is in the saved state.

    Raises:
        CheckpointError: the engine already ran steps, its ``train_iters`` is below the saved global
            step, or the state belongs to another graph (other problems, method or optimizer groups).

    Example — 3 of 6 steps, resumed in a fresh engine: the result of 6 uninterrupted steps
    (:func:`save_checkpoint` does the same through a file). Each SGD step on
    :math:`F(x) = \|2x - 1\|^2` maps :math:`x \mapsto x - 0.1(8x - 4)`, so :math:`x_6 = \tfrac12(1 - 0.2^6)`:

    >>> import torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):                        # u*(x) = 2x
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):                       # F = ||u* - 1||^2, minimised at x = 1/2
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build(steps):
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     return hb.HODLEngine([up, low], EngineConfig(train_iters=steps, strategy="cpu"),
    ...                          dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}), m, up, low
    >>> first, _, _, _ = build(6); first.train_iters = 3; first.run()
    >>> resumed, m, _, _ = build(6)
    >>> hb.load_engine_state_dict(resumed, hb.engine_state_dict(first)); resumed.run()
    >>> [round(v, 12) for v in m.x.tolist()]
    [0.499968, 0.499968]
    >>> hb.load_engine_state_dict(resumed, hb.engine_state_dict(first))   # it ran already
    Traceback (most recent call last):
    ...
    hodl_plugin.betty.errors.CheckpointError: ...
    """
    _validate(engine, state, source)
    _warn_unseeded_shuffle(engine, "resumed from")
    snap = _snapshot(engine)
    try:
        _apply(engine, state)
    except BaseException as exc:
        _restore(engine, snap)
        if isinstance(exc, Exception):
            raise _fail(source, f"applying the checkpoint failed ({type(exc).__name__}: {exc}); the engine is "
                        "unchanged") from exc
        raise


# ------------------------------------------------------------------------------ files
def save_checkpoint(engine: Any, path: PathLike) -> None:
    """Write :func:`engine_state_dict` to ``path`` atomically (a temporary file in the same directory,
    then ``os.replace``): if the save fails, the previous checkpoint at ``path`` is intact.

    Args:
        engine: the engine to save, between global steps.
        path: the file to write.

    Returns:
        None.

    Raises:
        CheckpointError: called inside a global step.
        OSError: the file cannot be written (the temporary file is removed, the old one kept).

    Example — interrupt after 5 of 10 steps, resume in a fresh engine, get the uninterrupted result:

    >>> import tempfile, os, torch
    >>> import hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build():
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.Adam(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     eng = hb.HODLEngine([up, low], EngineConfig(train_iters=10, strategy="cpu"),
    ...                      dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    ...     return eng, m
    >>> straight, m0 = build(); straight.run()
    >>> first, _ = build(); first.train_iters = 5; first.run()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> hb.save_checkpoint(first, path)
    >>> resumed, m1 = build(); hb.load_checkpoint(resumed, path); resumed.run()
    >>> torch.equal(m0.x, m1.x)
    True
    """
    state = _sealed(engine_state_dict(engine))
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(engine: Any, path: PathLike) -> None:
    """Load a file written by :func:`save_checkpoint` into a freshly built engine.

    A file that is not one (corrupt, truncated, foreign) raises :class:`CheckpointError` naming it; the
    content is sealed with its SHA-256 when saved, so a changed byte anywhere is caught.
    The file is read with ``torch.load(weights_only=True)``: loading runs no pickled code.

    Args:
        engine: a freshly built engine of the same graph.
        path: a file written by :func:`save_checkpoint`.

    Returns:
        None: ``engine.run()`` then continues where the saved run stopped.

    Raises:
        CheckpointError: as :func:`load_engine_state_dict`, or the file is not a checkpoint.
        FileNotFoundError: there is no file at ``path``.

    Example — the example of :func:`save_checkpoint` loads its file with this function; a file that
    is not a checkpoint is refused before the engine is touched:

    >>> import torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):                        # u*(x) = 2x
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):                       # F = ||u* - 1||^2, minimised at x = 1/2
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build(steps):
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     return hb.HODLEngine([up, low], EngineConfig(train_iters=steps, strategy="cpu"),
    ...                          dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}), m, up, low
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.pt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("not a checkpoint")
    >>> engine, m, up, low = build(3)
    >>> hb.load_checkpoint(engine, path)
    Traceback (most recent call last):
    ...
    hodl_plugin.betty.errors.CheckpointError: ...notes.pt: not a valid hodl_plugin checkpoint: torch.load failed ...
    >>> engine.global_step
    0
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise _fail(path, f"not a valid hodl_plugin checkpoint: torch.load failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    load_engine_state_dict(engine, _opened(state, path), source=path)


def _sealed(state: dict) -> dict:
    """The state serialised and sealed with its SHA-256: a changed byte anywhere in it is caught on load
    (``torch.load`` checks no checksum: a flipped byte in a tensor loaded as another number)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return {"format": FORMAT, "sealed": 1, "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}


def _opened(state: Any, source: str) -> Any:
    """The state inside a sealed file, its checksum verified (an unsealed state, as files written before
    the seal, is passed through)."""
    if not (isinstance(state, dict) and state.get("sealed") is not None):
        return state
    payload = state.get("payload")
    digest = state.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or not isinstance(digest, str):
        raise _fail(source, "not a valid hodl_plugin checkpoint (a damaged seal)")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise _fail(source, "the checkpoint is corrupt: its content does not match the SHA-256 it was saved with "
                    "(a changed byte); restore it from a copy")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # (cannot happen with a matching checksum unless the writer was broken)
        raise _fail(source, f"not a valid hodl_plugin checkpoint: its content does not load ({type(exc).__name__})"
                    ) from exc
