"""Every private torch API hodl_plugin uses lives in ``hodl_plugin._torch_compat``; this test fails,
naming the torch version, when one of them disappears (each has a fallback that is slower or less
precise, so a missing one is a regression to look at before it reaches users)."""

from __future__ import annotations

import pathlib
import re

import torch

import hodl_plugin
from hodl_plugin import _torch_compat

PACKAGE = pathlib.Path(hodl_plugin.__file__).parent
PRIVATE = re.compile(r"torch\._C\b|_execution_engine|forward_ad\._current_level|torch\._functorch|"
                     r"torch\.utils\._pytree|\._version\b")


def test_every_private_torch_api_is_available():
    missing = _torch_compat.missing()
    assert not missing, f"torch {torch.__version__} lacks {missing}: update hodl_plugin/_torch_compat.py"


def test_no_module_but_torch_compat_reaches_into_torch_internals():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_torch_compat.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not offenders, "private torch APIs outside _torch_compat.py:\n" + "\n".join(offenders)


def test_the_compat_functions_answer_as_torch_does():
    x = torch.ones(2)
    assert not _torch_compat.transforms_active() and _torch_compat.current_functorch_level() == 0

    def probe(t):
        assert _torch_compat.transforms_active() and _torch_compat.is_functorch_wrapped(t)
        assert _torch_compat.functorch_level(t) == _torch_compat.current_functorch_level() >= 1
        return t.sum()

    torch.func.grad(probe)(x)
    torch.func.vmap(lambda t: probe(t) * 0 + t)(torch.ones(3, 2))
    assert _torch_compat.functorch_level(x) == -1 and not _torch_compat.is_functorch_wrapped(x)
    v = _torch_compat.version(x)
    x.add_(1)
    assert _torch_compat.version(x) == v + 1
    with torch.autograd.forward_ad.dual_level():
        assert _torch_compat.forward_ad_active()
    assert not _torch_compat.forward_ad_active()
    a = torch.ones(2, requires_grad=True)
    out = (a * 3).sum()
    (g,) = _torch_compat.engine_backward((out,), (torch.ones(()),), (a,))
    assert torch.equal(g, torch.full((2,), 3.0))
