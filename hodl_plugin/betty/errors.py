"""The errors and warnings of the Betty adapter (on top of :mod:`hodl_plugin.errors`)."""

from __future__ import annotations

from ..errors import HODLError

__all__ = ["CheckpointError", "CheckpointWarning", "WiringWarning"]


class CheckpointError(HODLError, ValueError):
    """A checkpoint cannot be written, read or applied: the message names the file or the engine state.

    Raised before anything is changed: a failed save keeps the previous file, a failed load leaves
    the engine as it was. Also a ``ValueError`` and a :class:`~hodl_plugin.errors.HODLError`.

    >>> import hodl_plugin as hp, hodl_plugin.betty as hb
    >>> issubclass(hb.CheckpointError, hp.HODLError), issubclass(hb.CheckpointError, ValueError)
    (True, True)
    """


class CheckpointWarning(UserWarning):
    """A checkpoint that will load but whose resumed run may differ from an uninterrupted one
    (e.g. a shuffling ``DataLoader`` without a seeded ``generator``).

    >>> import warnings, torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):
    ...     def training_step(self, batch): return ((self.low.u - batch[0].sum()) ** 2).sum()
    >>> data = torch.utils.data.TensorDataset(torch.ones(4, 1, dtype=torch.float64))
    >>> m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
    ...         train_data_loader=torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
    >>> low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    >>> engine = hb.HODLEngine([up, low], EngineConfig(train_iters=2, strategy="cpu"),
    ...                        dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    >>> engine.run()
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = hb.engine_state_dict(engine)
    >>> w[0].category is hb.CheckpointWarning, "generator=torch.Generator().manual_seed(seed)" in str(w[0].message)
    (True, True)
    """


class WiringWarning(UserWarning):
    """A Betty graph wired so that a hypergradient is lost (e.g. an upper node reading
    ``lower.u.detach()``: its variables never move).

    Said by :func:`~hodl_plugin.betty.gkm_vjp` when the gradient reaching a GKM node's solution is
    exactly zero; here it is given by hand:

    >>> import warnings, torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    >>> low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    >>> engine = hb.HODLEngine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
    ...                        dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    >>> engine.run(); _ = low.one_step_descent()
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = hb.gkm_vjp([torch.zeros(2, dtype=torch.float64)], low, up)
    >>> w[0].category is hb.WiringWarning, "read self.low.u instead" in str(w[0].message)
    (True, True)
    """
