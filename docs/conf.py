"""Sphinx configuration of the hodl_plugin documentation.

Built with ``-W`` (warnings are errors) and ``nitpicky = True`` (every cross-reference must resolve).
No network at build time: MathJax is bundled (``_static/mathjax``) and the intersphinx inventories of
Python and PyTorch are shipped in ``_intersphinx/`` (built by ``_intersphinx/build_inventories.py``).
The example gallery (``../examples``) is executed by sphinx-gallery during the build.
"""

import os
import sys
import warnings

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))

import hodl_plugin  # noqa: E402

project = "hodl_plugin"
author = "hodl_plugin developers"
copyright = "2026, hodl_plugin developers"
release = hodl_plugin.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx_copybutton",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "sg_execution_times.rst", "_intersphinx", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.md5", "auto_examples/*.codeobj.json"]

# --- API reference -------------------------------------------------------------------------------
templates_path = ["_templates"]
autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False  # a module's tables list exactly its __all__
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_inherit_docstrings = False  # torch.autograd.Function's own docstrings are torch's, not ours
autodoc_class_signature = "separated"
autodoc_default_options = {"members": True, "show-inheritance": True, "exclude-members": "__init__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# every cross-reference must resolve; the names below are type aliases and private bases that Sphinx
# cannot link (they are explained in the text where they appear)
nitpicky = True
nitpick_ignore = [
    ("py:class", "optional"),
    ("py:class", "callable"),
    ("py:class", "Tensor"),
    ("py:class", "Module"),
    ("py:class", "nn.Module"),
    ("py:class", "torch.nn.modules.module.Module"),
    ("py:class", "Schedule"),
    ("py:class", "ScheduleLike"),
    ("py:class", "SolverSpec"),
    ("py:class", "LinearSolver"),
    ("py:class", "MatVec"),
    ("py:class", "Hashable"),
    ("py:class", "hodl_plugin.linear_solve.LinearSolver"),
    ("py:class", "ls.LinearSolver"),
    ("py:class", "Op"),
    ("py:class", "AfterHook"),
    ("py:class", "_vmap.Batch"),
]
nitpick_ignore_regex = [
    (r"py:.*", r"betty\..*"),          # Betty publishes no Sphinx inventory
    (r"py:.*", r"torchopt\..*"),       # nor does TorchOpt's documentation for these names
    (r"py:class", r"hodl_plugin\..*\._.*"),  # private helpers named in signatures
    (r"py:(mod|class|func|obj)", r"hodl_plugin(\.\w+)*\._\w+.*"),  # the core's private modules, cited
    (r"py:func", r"(certifies|bind_iteration)"),  # internal helpers a docstring names
    # a bare method or attribute name in a class docstring's first line: it resolves on the class's
    # page, not in the module page's summary table that repeats that line
    (r"py:(meth|attr)", r"_?[a-z][a-z_]*"),
    (r"py:class", r"(typing\.)?(Any|Callable|Optional|Union|Sequence|Iterable|Mapping|Literal)\b.*"),
]

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", os.path.join(DOCS, "_intersphinx", "python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", os.path.join(DOCS, "_intersphinx", "torch.inv")),
}
intersphinx_timeout = 1

# --- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"hodl_plugin {release}"  # the version on every page (sidebar, and the header on a phone)
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "source_repository": "",
    "navigation_with_keys": True,
}
html_show_sourcelink = False
# MathJax bundled (docs/_static/mathjax, Apache-2.0): formulas render without network access
mathjax_path = "mathjax/tex-chtml.js"
pygments_style = "default"
pygments_dark_style = "monokai"

# copy buttons copy the code without ">>> ", "... " and "$ " prompts, and without the printed output
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
copybutton_exclude = ".linenos, .gp, .go"

def _scraper_with_alt(block, block_vars, gallery_conf, **kwargs):
    """matplotlib's scraper, with the figure's alt text from the block's ``# sphinx_gallery_alt = "..."``
    lines (joined; the build removes them from the rendered code) instead of the axes titles."""
    import re

    from sphinx_gallery.scrapers import matplotlib_scraper

    rst = matplotlib_scraper(block, block_vars, gallery_conf, **kwargs)
    content = block[1] if isinstance(block, tuple) else getattr(block, "content", "")
    parts = re.findall(r"^\s*#\s*sphinx_gallery_alt\s*=\s*(['\"])(.*?)\1\s*$", content, re.M)
    if parts and rst:
        alt = " ".join(p[1].strip() for p in parts)
        rst = re.sub(r"(:alt: ).*", lambda m: m.group(1) + alt, rst)
    return rst


# --- example gallery ------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(DOCS, "..", "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",          # every plot_*.py is executed at build time
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 0,
    "matplotlib_animations": False,
    "image_scrapers": (_scraper_with_alt,),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "show_signature": False,
    "plot_gallery": os.environ.get("HODL_DOCS_GALLERY", "True"),  # "False": a quick build without running
    "doc_module": ("hodl_plugin",),
    "backreferences_dir": None,
    "first_notebook_cell": None,
    "copyfile_regex": "",
    "write_computation_times": False,
}


warnings.filterwarnings("ignore", message="Matplotlib is currently using agg")

# --- doctest builder -------------------------------------------------------------------------------
# no global setup: every block on these pages starts with its own imports, as a reader copies it
# (tests/test_docs_examples.py runs each block in a fresh interpreter as well)
doctest_global_setup = ""
doctest_test_doctest_blocks = ""
suppress_warnings = ["config.cache"]


# --- `hodl_plugin.GKMSolver` and the other re-exported names link to their module's page ----------
def _resolve_reexport(app, env, node, contnode):
    """A reference to a name re-exported by a package (``hodl_plugin.GKMSolver``, ``hodl_plugin.betty.GKMProblem``)
    resolves to the object's own page (``hodl_plugin.solver.GKMSolver``)."""
    import importlib

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py":
        return None
    if "." not in target and target in _short_names():  # a bare public name: GKMSolver, CheckpointError
        target = _short_names()[target]
        node = node.deepcopy()
        node["reftarget"] = target
        resolved = env.get_domain("py").resolve_xref(env, node.get("refdoc"), app.builder, node["reftype"], target,
                                                     node, contnode)
        if resolved is not None:
            return resolved
    if not target.startswith("hodl_plugin."):
        return None
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        head = getattr(obj, "__module__", None) if not hasattr(obj, "__path__") else None
        name = getattr(obj, "__qualname__", None)
        if head is None or name is None or f"{head}.{name}" == target:
            return None
        domain = env.get_domain("py")
        node = node.deepcopy()
        node["reftarget"] = f"{head}.{name}"
        return domain.resolve_xref(env, node.get("refdoc"), app.builder, node["reftype"], node["reftarget"],
                                   node, contnode)
    return None


def _short_names() -> dict[str, str]:
    """Each public name defined once in the package's modules (``GKMProblem``) → its full name."""
    global _SHORT
    if _SHORT is None:
        import importlib

        seen: dict[str, set] = {}
        for m in public_modules():
            mod = importlib.import_module(m)
            for name in getattr(mod, "__all__", []):
                obj = getattr(mod, name)
                home = getattr(obj, "__module__", m) if not isinstance(obj, (str, tuple, frozenset)) else m
                seen.setdefault(name, set()).add(f"{home}.{name}" if home.startswith("hodl_plugin") else f"{m}.{name}")
        _SHORT = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}
    return _SHORT


_SHORT = None


# --- one API page per public module, its tables listing exactly the module's ``__all__`` --------------
def public_modules() -> list[str]:
    """Every public module of the package (no ``_private`` part), the Betty adapter included."""
    import pkgutil

    names = []
    for info in pkgutil.walk_packages(hodl_plugin.__path__, "hodl_plugin."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _write_api_pages(app) -> None:
    """``docs/api/<module>.rst`` for each public module (generated at every build, not committed): the
    module docstring, then autosummary tables of its classes, functions, errors and warnings, and its
    constants. (autosummary's own ``:recursive:`` mode cannot be used: it resolves a submodule that
    the package imports as an attribute of the package.)"""
    import importlib
    import inspect

    out = os.path.join(DOCS, "api")
    os.makedirs(out, exist_ok=True)
    modules = public_modules()
    for name in modules:
        mod = importlib.import_module(name)
        # a package re-exports its submodules' names: those are documented on the submodule's page
        children = [importlib.import_module(m) for m in modules
                    if m.startswith(name + ".") and hasattr(mod, "__path__")]
        groups: dict[str, list[str]] = {"Classes": [], "Functions": [], "Errors and warnings": [], "data": []}
        reexported = []
        for member in getattr(mod, "__all__", []):
            obj = getattr(mod, member)
            if inspect.ismodule(obj):
                continue
            home = next((c for c in children
                         if member in getattr(c, "__all__", ()) and getattr(c, member) is obj), None)
            if home is not None:
                reexported.append(f":obj:`~{home.__name__}.{member}`")
                continue
            if inspect.isclass(obj) and issubclass(obj, (Exception, Warning)):
                groups["Errors and warnings"].append(member)
            elif inspect.isclass(obj):
                groups["Classes"].append(member)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                groups["Functions"].append(member)
            else:
                groups["data"].append(member)
        lines = [name, "=" * len(name), "", f".. automodule:: {name}", "   :no-members:", ""]
        if reexported:
            lines += [f"Importable from ``{name}``: " + ", ".join(reexported) + ".", ""]
        for title, members in groups.items():
            if not members:
                continue
            if title == "data":
                lines += [".. rubric:: Constants", ""]
                lines += [x for m in members for x in (f".. autodata:: {name}.{m}", "   :no-value:", "")]
                continue
            template = "function.rst" if title == "Functions" else "class.rst"
            lines += [f".. rubric:: {title}", "", ".. autosummary::", "   :toctree: ../generated",
                      f"   :template: {template}", "   :nosignatures:", ""]
            lines += [f"   {m}" for m in members] + [""]
        text = "\n".join(lines)
        path = os.path.join(out, f"{name}.rst")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)


# the API pages in the order of concerns a reader meets them; a public module not named here (a new
# one) follows, alphabetically, so every public module is in the reference without editing this list
API_ORDER = ["solver", "gkm", "hypergrad", "implicit", "custom", "inexact", "bound", "acceleration", "linear_solve",
             "schedules", "presets", "operators", "prox", "baselines", "errors", "betty", "betty.config", "betty.nodes",
             "betty.hypergradients", "betty.coupling", "betty.engine", "betty.distributed", "betty.checkpoint",
             "betty.errors"]


def _write_api_toctree() -> None:
    """``docs/api/toctree.inc``, the toctree that ``api.rst`` includes: every public module."""
    modules = public_modules()
    ordered = [f"hodl_plugin.{m}" for m in API_ORDER if f"hodl_plugin.{m}" in modules]
    ordered += [m for m in modules if m not in ordered]
    text = ".. toctree::\n   :maxdepth: 1\n\n" + "".join(f"   api/{m}\n" for m in ordered)
    path = os.path.join(DOCS, "api", "toctree.inc")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


_write_api_pages(None)  # before autosummary scans the sources
_write_api_toctree()


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
