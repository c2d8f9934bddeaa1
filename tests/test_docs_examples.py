"""The documentation's code blocks run as a reader copies them: each in a fresh namespace, with its own imports.

Every ``.. code-block:: python``, ``.. doctest::`` and ``.. testcode::`` block of the pages under
``docs/`` is extracted; the blocks of one page run in one fresh interpreter (a subprocess), each block
in an empty namespace — so a block that relies on an earlier block's names, or on the doctest
builder's global setup, fails with the ``NameError`` a reader would get. Doctest blocks also compare
their printed output. A block that imports a peer library that is not installed (jax, jaxopt) is
skipped and named.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts and "auto_examples" not in p.parts
               and "generated" not in p.parts and "_templates" not in p.parts)
DIRECTIVE = re.compile(
    r"^(?P<indent> *)\.\. (?P<kind>code-block|code|sourcecode|doctest|testcode)::\s*(?P<lang>\S*)\s*$")


def blocks(page: pathlib.Path) -> list[dict]:
    """The runnable blocks of a page: ``{"line", "kind", "code"}``, code dedented, options dropped."""
    lines = page.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = DIRECTIVE.match(lines[i])
        if not m or (m["kind"] in ("code-block", "code", "sourcecode") and m["lang"] not in ("python", "py")):
            i += 1
            continue
        indent = len(m["indent"])
        start, i = i + 1, i + 1
        while i < len(lines) and re.match(rf"^ {{{indent + 1},}}:\S.*:", lines[i]):  # options
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        found.append({"line": start, "kind": "doctest" if m["kind"] in ("doctest",) else "script", "code": code})
    return found


RUNNER = r'''
import doctest, importlib.util, json, re, sys, traceback, warnings
warnings.simplefilter("ignore")
PEERS = ("jax", "jaxopt", "torchdeq")
results = []
for b in json.load(sys.stdin):
    src = b["code"]
    plain = src
    if b["kind"] == "doctest":
        plain = "\n".join(l[4:] for l in src.splitlines() if l.startswith((">>> ", "... ")))
    missing = [m for m in PEERS
               if re.search(rf"^\s*(import|from) {m}\b", plain, re.M) and importlib.util.find_spec(m) is None]
    if missing:
        results.append({"line": b["line"], "status": "skipped", "why": "not installed: " + ", ".join(missing)})
        continue
    try:
        if b["kind"] == "doctest":
            test = doctest.DocTestParser().get_doctest(src, {"__name__": "__main__"}, "block", "page", b["line"])
            out = []
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, out=out.append)
            if runner.failures:
                raise AssertionError("".join(out))
        else:
            exec(compile(src, f"block at line {b['line']}", "exec"), {"__name__": "__main__"})
        results.append({"line": b["line"], "status": "ok"})
    except BaseException:
        results.append({"line": b["line"], "status": "failed", "why": traceback.format_exc()[-3000:]})
print("@@RESULTS@@" + json.dumps(results))
'''


def first_statement(block: dict) -> str:
    code = block["code"]
    if block["kind"] == "doctest":
        code = "\n".join(line[4:] for line in code.splitlines() if line.startswith((">>> ", "... ")))
    for line in code.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    return ""


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_blocks_start_with_their_imports(page):
    for b in blocks(page):
        first = first_statement(b)
        assert first.startswith(("import ", "from ")), (
            f"{page.relative_to(ROOT)}:{b['line']}: a block a reader copies must start with its imports, "
            f"starts with {first!r}")


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)],
                         ids=[str(p.relative_to(DOCS)) for p in PAGES if blocks(p)])
def test_blocks_run_in_a_fresh_interpreter(page):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks(page)), text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=600)
    assert "@@RESULTS@@" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("@@RESULTS@@")[-1])
    failed = [f"{page.relative_to(ROOT)}:{r['line']}\n{r['why']}" for r in results if r["status"] == "failed"]
    assert not failed, "\n\n".join(failed)
    assert any(r["status"] == "ok" for r in results)


def test_extraction_sees_every_block_kind(tmp_path):
    page = tmp_path / "p.rst"
    page.write_text(textwrap.dedent("""\
        Title
        =====

        .. code-block:: python
           :caption: x

           import math
           print(math.pi)

        .. doctest::

           >>> import math
           >>> math.floor(2.5)
           2

        .. code-block:: bash

           make test
        """))
    found = blocks(page)
    assert [b["kind"] for b in found] == ["script", "doctest"]
    assert found[0]["code"] == "import math\nprint(math.pi)"


def test_a_block_without_its_imports_fails(tmp_path):
    """The runner really uses a fresh namespace per block (a block using the previous one's names fails)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bs = [{"line": 1, "kind": "script", "code": "import math\nx = 1"},
          {"line": 5, "kind": "script", "code": "print(x)"},
          {"line": 9, "kind": "doctest", "code": ">>> import math\n>>> math.floor(2.5)\n3"}]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(bs), text=True, capture_output=True,
                          env=env, timeout=60)
    results = json.loads(proc.stdout.split("@@RESULTS@@")[-1])
    assert [r["status"] for r in results] == ["ok", "failed", "failed"]
    assert "NameError" in results[1]["why"]


# -- the API reference ---------------------------------------------------------------------------
def _public_modules() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)  # also writes docs/api/*.rst, as the build does
    return conf.public_modules()


def test_every_public_module_is_in_the_api_reference():
    """docs/conf.py writes the API toctree from the package itself (a new module gets its page)."""
    modules = _public_modules()
    assert ".. include:: api/toctree.inc" in (DOCS / "api.rst").read_text()
    listed = re.findall(r"^   api/(hodl_plugin[\w.]*)$", (DOCS / "api" / "toctree.inc").read_text(), re.M)
    assert sorted(listed) == sorted(modules)
    assert {"hodl_plugin.acceleration", "hodl_plugin.implicit", "hodl_plugin.betty"} <= set(listed)
    for m in modules:
        assert (DOCS / "api" / f"{m}.rst").exists(), m


def test_public_objects_have_args_returns_and_an_example():
    """Each public class and function (in its module's ``__all__``) says what it takes (Args), what it
    returns (Returns, for functions) and shows its use (a ``>>>`` example or a pointer to one)."""
    import importlib
    import inspect

    gaps, checked = [], set()
    for m in _public_modules():  # every public module: a new one is held to the same rule
        mod = importlib.import_module(m)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            full = f"{m}.{name}"
            if inspect.ismodule(obj) or getattr(obj, "__module__", m) != m:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            checked.add(full)
            doc = inspect.getdoc(obj) or ""
            need = []
            is_exception = inspect.isclass(obj) and issubclass(obj, (Exception, Warning))
            target = obj.__init__ if inspect.isclass(obj) else obj
            try:
                takes = [p for p in inspect.signature(target).parameters if p not in ("self", "cls", "args", "kwargs")]
            except (TypeError, ValueError):
                takes = []
            if takes and not is_exception and not re.search(r"^(Args|Attributes):", doc, re.M):
                need.append("Args")
            if inspect.isfunction(obj) and not re.search(r"^Returns:", doc, re.M):
                need.append("Returns")
            if ">>>" not in doc and not re.search(r"Example", doc):
                need.append("an example")
            if need:
                gaps.append(f"{full}: {', '.join(need)}")
    assert {"hodl_plugin.solver.GKMSolver", "hodl_plugin.implicit.implicit_vjp", "hodl_plugin.linear_solve.cg",
            "hodl_plugin.betty.nodes.GKMProblem", "hodl_plugin.baselines.bome.BOME"} <= checked
    assert not gaps, "docstrings without these sections:\n" + "\n".join(gaps)
