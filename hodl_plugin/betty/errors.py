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
    (e.g. a shuffling ``DataLoader`` without a seeded ``generator``)."""


class WiringWarning(UserWarning):
    """A Betty graph wired so that a hypergradient is lost (e.g. an upper node reading
    ``lower.u.detach()``: its variables never move)."""
