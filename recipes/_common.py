"""Helpers shared by the recipes: command line, seeding, results (JSON, PNG, a printed table).

Every recipe is ``python -m recipes.<name> [--quick] [--seed S] [--device D] [--out DIR]
[--data-dir DIR]``; it writes ``<name>.json`` and PNG plots into ``--out`` and prints a summary table.
Recipes whose lower solves run to a tolerance also take ``--anderson M`` (:func:`add_anderson`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

import hodl_plugin as hp


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The common command line of a recipe."""
    ap = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=description)
    ap.add_argument("--quick", action="store_true", help="a small run that finishes in < 60 s on 2 CPU cores")
    ap.add_argument("--seed", type=int, default=0, help="random seed (torch, numpy, python)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--out", default=f"out/{name}", help="folder for the JSON of results and the plots")
    ap.add_argument("--data-dir", default=None, help="folder of the paper's data set, in its usual on-disk format")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return ap


def add_anderson(ap: argparse.ArgumentParser, default: int) -> None:
    """``--anderson M``: Anderson acceleration (history M) of the lower forward solves; 0 = plain KM."""
    ap.add_argument("--anderson", type=int, default=default, metavar="M",
                    help="Anderson acceleration of the lower forward solves to a tolerance, history M "
                         f"(0: plain KM iteration; default {default}); unrolled/truncated runs stay plain")


def acceleration(args: argparse.Namespace) -> Optional[hp.Anderson]:
    """The ``acceleration=`` of ``--anderson M``: ``hp.Anderson(M)``, or ``None`` for M = 0.

    >>> acceleration(argparse.Namespace(anderson=5)), acceleration(argparse.Namespace(anderson=0))
    (Anderson(history_size=5, mixing=None, regularization=1e-10, restart_cond=1e+08, safeguard=10.0), None)
    """
    m = getattr(args, "anderson", 0)
    if m < 0:
        raise SystemExit(f"--anderson must be >= 0 (0: no acceleration), got {m}")
    return hp.Anderson(history_size=m) if m else None


def parse_list(ap: argparse.ArgumentParser, flag: str, text: str, parse: Any) -> list[Any]:
    """``parse`` applied to each item of a comma list typed as ``flag``; a bad item is a usage error
    (exit 2, the flag and the reason named) before any work, not a traceback mid-run.

    >>> parse_list(argparse.ArgumentParser(), "--shots", "1,5", int)
    [1, 5]
    """
    out = []
    for item in (w.strip() for w in text.split(",")):
        try:
            out.append(parse(item))
        except (ValueError, KeyError, TypeError) as e:
            msg = str(e).strip("'\"")
            ap.error(msg if msg.startswith(flag) else f"{flag}: {item!r}: {msg}")
    return out


def choice(options: Iterable[str]) -> Any:
    """A ``parse`` for :func:`parse_list` that accepts one of ``options``."""
    options = list(options)

    def parse(item: str) -> str:
        if item not in options:
            raise ValueError(f"choose from {', '.join(options)}")
        return item

    return parse


def _checked_type(convert: Any, ok: Any, what: str) -> Any:
    """An argparse ``type``: ``convert(text)`` where ``ok`` holds, else a usage error saying ``what``."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


#: an integer >= 1 (``--K 0`` was taken for "the default"); a number in [0, 1)
positive_int = _checked_type(int, lambda v: v >= 1, "an integer >= 1")
fraction = _checked_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def load_xy(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels: ``X.npy`` / ``y.npy`` of ``--data-dir``, else scikit-learn's digits in [0, 1]."""
    if getattr(args, "data_dir", None):
        return np.load(os.path.join(args.data_dir, "X.npy")), np.load(os.path.join(args.data_dir, "y.npy"))
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data / 16.0, d.target


def setup(args: argparse.Namespace) -> torch.device:
    """Seed every generator, make the output folder, return the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA device is available")
    return device


def progress(iterable: Iterable[Any], args: argparse.Namespace, **kwargs: Any) -> Iterable[Any]:
    """tqdm over ``iterable`` unless ``--no-progress`` (tqdm writes to stderr)."""
    if getattr(args, "no_progress", False):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)


def save_json(args: argparse.Namespace, name: str, results: dict[str, Any]) -> str:
    """Write ``results`` (plus the command line and a timestamp) to ``<out>/<name>.json``."""
    path = os.path.join(args.out, f"{name}.json")
    payload = {"recipe": name, "args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    return path


def plot_curves(
    path: str,
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = True,
    ax_pairs: Optional[list[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]]] = None,
    xlabels: Optional[Sequence[str]] = None,
    linestyles: Sequence[str] = ("-",),
) -> str:
    """Line plot(s) of named curves ``name -> (x, y)`` into a PNG; several panels with ``ax_pairs`` (one
    x label each with ``xlabels``); the curves of a panel cycle through ``linestyles``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ax_pairs or [(ylabel, curves)]
    ncols = min(len(panels), 2)  # at most two panels a row: legible at the documentation's page width
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for i, (ax, (label, cs)) in enumerate(zip(axes.flat, panels)):
        for j, (name, (x, y)) in enumerate(cs.items()):
            ax.plot(list(x), list(y), label=name, lw=1.6, ls=linestyles[j % len(linestyles)])
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabels[i] if xlabels is not None else xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> str:
    """Print (and return) a plain-text table of ``rows`` (dicts) with the given columns."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
