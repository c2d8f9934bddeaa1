r"""The one place that imports Betty: the version check and the Betty names the adapter uses.

``betty-ml`` 0.2.1 is required (it declares ``python<3.11`` but runs on 3.11, hence the
``--ignore-requires-python``); 0.1.1, what a plain ``pip install betty-ml`` gives on Python 3.11
with an old pip, lacks ``EngineConfig(strategy=...)`` and the problem hooks the adapter relies on,
so importing the adapter under it is refused with the command that installs the right one.

>>> check_version("0.2.1")
>>> try:
...     check_version("0.1.1")
... except ImportError as e:
...     print(str(e).replace("; ", "\n"))
hodl_plugin.betty needs betty-ml 0.2.1, found 0.1.1
install it with: pip install --ignore-requires-python "betty-ml==0.2.1" "numpy<2.3"
"""

from __future__ import annotations

import importlib.metadata
import re

#: the exact command that installs the Betty this adapter is tested with
INSTALL = 'pip install --ignore-requires-python "betty-ml==0.2.1" "numpy<2.3"'


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def check_version(version: str) -> None:
    """Raise ``ImportError`` (with :data:`INSTALL`) unless ``version`` is betty-ml 0.2 or newer."""
    if _release(version) < (0, 2):
        raise ImportError(f"hodl_plugin.betty needs betty-ml 0.2.1, found {version}; install it with: {INSTALL}")


def installed_version() -> str:
    """The version of the importable ``betty`` (its ``__version__``, else the betty-ml metadata)."""
    import betty

    version = getattr(betty, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("betty-ml")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
            return "unknown"
    return str(version)


try:
    import betty.hypergradient as hypergradient
    from betty.configs import Config
    from betty.engine import Engine
    from betty.logging import get_logger
    from betty.problems import ImplicitProblem
except ImportError as exc:
    raise ImportError(f"hodl_plugin.betty needs Betty (betty-ml 0.2.1); install it with: {INSTALL}") from exc
if installed_version() != "unknown":
    check_version(installed_version())

__all__ = [
    "INSTALL", "Config", "Engine", "ImplicitProblem", "check_version", "get_logger", "hypergradient",
    "installed_version",
]
