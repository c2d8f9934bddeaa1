"""The functions of hodl_plugin that one ``GKMSolver(T)(u0, x).sum().backward()`` runs, by file.

    python -m benchmarks.call_path           # counts per file (a second; --quick is the same run)
    python -m benchmarks.call_path -v        # every function, in call order, with its number of calls

Comprehensions, lambdas and generator expressions are not counted as functions (they are lines of the
function they are in). The "reading path" is the chain a newcomer follows for the mathematics: the
solver's call, the implicit method, the forward loop, the primitive's rules and the linear solve; the
rest are helpers with one concern each (binding the tensors T reads, the stop rule, input checks, the
torch internals).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

import hodl_plugin as hp

READING_PATH = [
    ("solver.py", "GKMSolver.forward"), ("solver.py", "GKMSolver.solve"),
    ("implicit.py", "Implicit.run"), ("implicit.py", "fixed_point_solve"),
    ("implicit.py", "FixedPoint.forward"), ("implicit.py", "FixedPoint.backward"),
    ("implicit.py", "_lean_backward"), ("implicit.py", "implicit_vjp_lean"),
    ("gkm.py", "GKMIteration.run"), ("gkm.py", "GKMIteration._run_once"), ("gkm.py", "GKMIteration._plain_step"),
    ("linear_solve.py", "LinearSolver._solve_checked"), ("linear_solve.py", "GMRES._solve"),
]


def trace() -> collections.OrderedDict[tuple[str, str], int]:
    D = torch.float64
    W = torch.tensor([[0.3, 0.1], [0.0, 0.2]], dtype=D)
    solver = hp.GKMSolver(lambda u, x: W @ u + x)
    x = torch.ones(2, dtype=D, requires_grad=True)
    solver(torch.zeros(2, dtype=D), x).sum().backward()  # warm-up (imports, caches)
    root = os.path.dirname(hp.__file__)
    seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(root) and not code.co_name.startswith("<"):
            key = (os.path.relpath(code.co_filename, root), code.co_qualname)
            seen[key] = seen.get(key, 0) + 1
        return None

    x = torch.ones(2, dtype=D, requires_grad=True)
    sys.settrace(tracer)
    try:
        solver(torch.zeros(2, dtype=D), x).sum().backward()
    finally:
        sys.settrace(None)
    return seen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same run (it takes about a second)")
    ap.add_argument("-v", "--verbose", action="store_true", help="every function, in call order")
    args = ap.parse_args(argv)
    seen = trace()
    files = collections.Counter(f for f, _ in seen)
    print(f"GKMSolver(T)(u0, x).sum().backward(): {len(seen)} functions of hodl_plugin in {len(files)} files")
    for f, n in files.most_common():
        print(f"  {f:<20s} {n}")
    missing = [k for k in READING_PATH if k not in seen]
    path_files = sorted({f for f, _ in READING_PATH})
    print(f"reading path: {len(READING_PATH)} functions in {len(path_files)} files ({', '.join(path_files)})"
          + (f"; not run: {missing}" if missing else ""))
    if args.verbose:
        for (f, name), n in seen.items():
            print(f"  {f}: {name} ({n})")


if __name__ == "__main__":
    main()
