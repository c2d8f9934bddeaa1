"""Build the intersphinx inventories of Python and PyTorch that the documentation ships.

The documentation builds without network access, so Sphinx cannot download ``objects.inv`` from
docs.python.org and the PyTorch site. This script writes two small inventories with ``sphobjinv``
holding the objects our pages and docstrings link to, with the addresses of those sites' pages::

    python docs/_intersphinx/build_inventories.py      # writes python.inv and torch.inv beside it

Add a line below when a page links a Python or torch object that is not listed yet (the nitpicky
build names it).
"""

from __future__ import annotations

import os

import sphobjinv as soi

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, role, uri relative to the site's root; "$" stands for the name, as in Sphinx inventories)
PYTHON = [
    *[(n, "class", "library/functions.html#$") for n in ("int", "float", "bool", "str", "tuple", "list", "dict",
                                                          "object", "type", "slice", "bytes", "set")],
    *[(n, "function", "library/functions.html#$") for n in ("callable", "isinstance", "print", "len")],
    *[(n, "data", "library/constants.html#$") for n in ("None", "True", "False", "Ellipsis", "NotImplemented")],
    *[(n, "exception", "library/exceptions.html#$") for n in (
        "Exception", "ValueError", "TypeError", "RuntimeError", "ImportError", "KeyError", "UserWarning",
        "Warning", "DeprecationWarning", "KeyboardInterrupt", "FloatingPointError", "ArithmeticError",
        "NotImplementedError", "OSError", "AttributeError", "IndexError")],
    *[(f"typing.{n}", "data", "library/typing.html#$") for n in (
        "Any", "Callable", "Optional", "Union", "Literal", "Sequence", "Iterable", "Mapping", "Hashable",
        "Iterator", "Protocol", "ClassVar")],
    *[(f"collections.abc.{n}", "class", "library/collections.abc.html#$") for n in (
        "Callable", "Sequence", "Iterable", "Mapping", "Hashable", "Iterator", "MutableMapping")],
    ("os.PathLike", "class", "library/os.html#$"),
    ("pathlib.Path", "class", "library/pathlib.html#$"),
    ("warnings.warn", "function", "library/warnings.html#$"),
    ("warnings.catch_warnings", "class", "library/warnings.html#$"),
    ("warnings.filterwarnings", "function", "library/warnings.html#$"),
    ("dataclasses.dataclass", "function", "library/dataclasses.html#$"),
    ("dataclasses.replace", "function", "library/dataclasses.html#$"),
    ("functools.partial", "class", "library/functools.html#$"),
    ("random.Random", "class", "library/random.html#$"),
    ("doctest", "module", "library/doctest.html#module-$"),
    ("logging", "module", "library/logging.html#module-$"),
    ("typing", "module", "library/typing.html#module-$"),
]

_GEN = "generated/$.html#$"
TORCH = [
    ("torch", "module", "torch.html#module-$"),
    ("torch.Tensor", "class", "tensors.html#$"),
    ("torch.dtype", "class", "tensor_attributes.html#$"),
    ("torch.device", "class", "tensor_attributes.html#$"),
    ("torch.float64", "attribute", "tensor_attributes.html#torch.dtype"),
    ("torch.float32", "attribute", "tensor_attributes.html#torch.dtype"),
    ("torch.Generator", "class", "generated/torch.Generator.html#$"),
    ("torch.Size", "class", "size.html#$"),
    ("torch.nn.Module", "class", _GEN),
    ("torch.nn.Parameter", "class", "generated/torch.nn.parameter.Parameter.html#$"),
    ("torch.nn.Conv2d", "class", _GEN),
    ("torch.nn.Linear", "class", _GEN),
    ("torch.nn.utils.parametrizations.spectral_norm", "function", _GEN),
    ("torch.optim.Optimizer", "class", "optim.html#$"),
    ("torch.optim.Adam", "class", _GEN),
    ("torch.optim.SGD", "class", _GEN),
    ("torch.autograd", "module", "autograd.html#module-$"),
    ("torch.autograd.Function", "class", "autograd.html#$"),
    ("torch.autograd.function.Function", "class", "autograd.html#torch.autograd.Function"),
    ("torch.autograd.grad", "function", _GEN),
    ("torch.autograd.backward", "function", _GEN),
    ("torch.autograd.gradcheck", "function", "generated/torch.autograd.gradcheck.gradcheck.html#$"),
    ("torch.autograd.gradgradcheck", "function", "generated/torch.autograd.gradcheck.gradgradcheck.html#$"),
    ("torch.autograd.forward_ad.dual_level", "class", _GEN),
    ("torch.Tensor.backward", "method", _GEN),
    ("torch.no_grad", "class", _GEN),
    ("torch.func", "module", "func.html#module-$"),
    *[(f"torch.func.{n}", "function", _GEN) for n in (
        "grad", "vmap", "jacrev", "jacfwd", "hessian", "jvp", "vjp", "functional_call", "grad_and_value",
        "stack_module_state")],
    ("torch.linalg.solve", "function", _GEN),
    ("torch.linalg.cholesky", "function", _GEN),
    ("torch.cholesky_solve", "function", _GEN),
    ("torch.manual_seed", "function", _GEN),
    ("torch.compile", "function", _GEN),
    ("torch.utils.data.DataLoader", "class", "data.html#$"),
    ("torch.distributed", "module", "distributed.html#module-$"),
    ("torch.nn.parallel.DistributedDataParallel", "class", _GEN),
    ("torch.load", "function", _GEN),
    ("torch.save", "function", _GEN),
]


def write(entries: list[tuple[str, str, str]], project: str, version: str, path: str) -> None:
    inv = soi.Inventory()
    inv.project, inv.version = project, version
    for name, role, uri in entries:
        uri = uri.replace("$", name) if uri.count("$") > 1 else uri
        inv.objects.append(soi.DataObjStr(name=name, domain="py", role=role, priority="1", uri=uri, dispname="-"))
    soi.writebytes(path, soi.compress(inv.data_file(contract=True)))


if __name__ == "__main__":
    write(PYTHON, "Python", "3", os.path.join(HERE, "python.inv"))
    write(TORCH, "PyTorch", "2", os.path.join(HERE, "torch.inv"))
    print("wrote", os.path.join(HERE, "python.inv"), "and torch.inv")
