"""Output of the benchmarks: ``benchmarks.compare``'s printed tables and error-vs-time plot, and the
README blocks every benchmark writes between its markers (:func:`write_readme`)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional


def write_readme(path: str, block: str, begin: str, end: str, heading: Optional[str] = None) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` by ``block``, atomically
    (a temporary file in the same folder, then ``os.replace``). Without the markers and with a ``heading``,
    add both (under that heading) at the end of the README's Performance section. ``ValueError`` if the
    markers are missing or unordered, and then the file is untouched."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    i, j = text.find(begin), text.find(end)
    if i < 0 and j < 0 and heading is not None:
        p = text.find("\n## Performance")
        nxt = text.find("\n## ", p + 1) if p >= 0 else -1
        at = nxt if nxt >= 0 else len(text)
        text = text[:at] + f"\n### {heading}\n\n{begin}\n{end}\n" + text[at:]
        i, j = text.find(begin), text.find(end)
    if i < 0 or j < i or text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{path} must hold exactly one {begin} followed by one {end}")
    new = text[: i + len(begin)] + "\n" + block + "\n" + text[j:]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".readme-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(path: str, results: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("a", "a2") if k in results]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, m in results[k]["methods"].items():
            if "points" not in m:
                continue
            pts = sorted(m["points"], key=lambda p: p["time_s"])
            ax.plot([p["time_s"] for p in pts], [max(p["rel_error"], 1e-16) for p in pts], "o-", ms=3, lw=1.3,
                    label=label, color="black" if label.startswith("hodl_plugin implicit") else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time of forward + hypergradient (s)")
        ax.set_ylabel("relative error of the hypergradient")
        sym = "symmetric" if results[k]["symmetric"] else "non-symmetric"
        ax.set_title(f"({k}) quadratic n={results[k]['n']}, cond 100, {sym} Jacobian", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]], title: str) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def f(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return str(v)

    cells = [[f(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    print("  ".join("-" * x for x in w))
    for x in cells:
        print("  ".join(v.ljust(y) for v, y in zip(x, w)))
