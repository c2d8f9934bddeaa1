"""Each library ``benchmarks.compare`` measures, one module per library, each importing it lazily.

==========================  ========================================================================
module                      wrappers (quadratic problem (a)/(d); hyper-cleaning (b))
==========================  ========================================================================
``hodl``                    hodl_plugin: implicit, unrolled, ``gkm_implicit`` in a Betty Engine;
                            implicit / inexact / unrolled hyper-cleaning
``torchopt_peer``           TorchOpt 0.7.3: ``custom_root`` + ``solve_cg``/``solve_normal_cg``,
                            ``MetaSGD`` unrolled
``higher_peer``             higher 0.2.1: ``innerloop_ctx`` + SGD
``betty_peer``              Betty 0.2.1: its ``Engine``, lower node solved by Betty steps, ``darts`` /
                            ``sama`` / ``neumann`` / ``cg``
``boat_peer``               BOAT 1.1.1: ``NGD`` + ``CG`` / ``RAD``
``torchdeq_peer``           TorchDEQ 0.1.0: ``anderson_solver`` / ``broyden_solver``, a DEQ core with
                            the IFT backward (``benchmarks.deq``)
==========================  ========================================================================

A quadratic wrapper is a factory returning ``run(knob) -> hypergradient`` (a fresh forward + backward
each call; the knob is the adjoint iterations or K); a hyper-cleaning wrapper returns
``run() -> (times, validation losses, W)``. The problems are in ``benchmarks.problems``.
"""

from __future__ import annotations

from typing import Optional


def available(module: str) -> Optional[str]:
    """``None`` when ``module`` imports, else why not (shown in the benchmark's tables)."""
    try:
        __import__(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not installed ({type(e).__name__}: {e})"[:120]
