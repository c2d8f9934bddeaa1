"""``benchmarks.deq``: its reference gradients against finite differences, the TorchDEQ wrappers and ours
against that reference (so its tables compare right numbers), and its README block."""

from __future__ import annotations

import pytest
import torch

from benchmarks import deq


@pytest.fixture(scope="module")
def small():
    return deq.problem(0.9, B=4, n=8, seed=1)


def test_newton_reference_is_an_equilibrium_and_its_gradient_matches_finite_differences(small):
    z = deq.newton(small.x, small.W)
    assert deq.residual(small, z) < 1e-14
    assert deq.fd_error(small, deq.reference_gradients(small), directions=3) < 1e-7


def test_the_two_spectra():
    r = deq.problem(0.9, B=2, n=16, spectrum="radius").W
    q = deq.problem(0.9, B=2, n=16, spectrum="orthogonal").W
    assert abs(float(torch.linalg.eigvals(r).abs().max()) - 0.9) < 1e-12
    assert abs(float(torch.linalg.matrix_norm(q, 2)) - 0.9) < 1e-12
    assert float(torch.linalg.matrix_norm(r, 2)) > 1.2  # not a contraction in the 2-norm: only ρ(W) = c
    with pytest.raises(ValueError, match="spectrum"):
        deq.problem(0.9, spectrum="disk")


def test_the_whole_batch_to_the_same_residual_reaches_it_where_the_same_tolerance_does_not():
    P = deq.problem(0.9, spectrum="orthogonal")  # the whole batch at tol 1e-9 leaves a sample at 3e-9
    z, _ = deq.ours(lambda: deq.hp.Anderson(6), 0)(P)
    assert deq.residual(P, z) > deq.TOL
    tol = deq.same_residual_tol(P, lambda: deq.hp.Anderson(6))
    z, _ = deq.ours(lambda: deq.hp.Anderson(6), 0, tol)(P)
    assert tol < deq.TOL and deq.residual(P, z) <= deq.TOL
    z, _ = deq.ours(lambda: deq.hp.Anderson(6), 0, 2 * tol)(P)  # the largest such tolerance of the ladder
    assert deq.residual(P, z) > deq.TOL


def test_our_forward_and_implicit_gradients(small):
    z, steps = deq.ours(lambda: deq.hp.Anderson(6), 1)(small)
    assert deq.residual(small, z) <= deq.TOL and steps > 0
    _, _, (gx, gW) = deq.ours_implicit(lambda: deq.hp.Broyden())(small)
    rx, rW = deq.reference_gradients(small)
    assert torch.allclose(gx, rx, rtol=1e-7, atol=1e-10) and torch.allclose(gW, rW, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_torchdeq_wrappers(small, kind):
    pytest.importorskip("torchdeq")
    z, steps = deq.torchdeq(kind)(small)
    assert deq.residual(small, z) < 1e-8 and 0 < steps <= deq.MAX_ITER
    _, _, (gx, gW) = deq.torchdeq_implicit(kind)(small)
    rx, rW = deq.reference_gradients(small)
    assert torch.allclose(gx, rx, rtol=1e-6, atol=1e-9) and torch.allclose(gW, rW, rtol=1e-6, atol=1e-9)


def test_readme_block(tmp_path):
    fwd = [dict(W="radius", c=0.9, method="plain, per sample", steps=10, time_ms=1.0, vs_plain=1.0, vs_batch=0.5,
                vs_same=None, vs_peer=None, cpu_vs_plain=1.0, residual=1e-10),
           dict(W="radius", c=0.9, method="Broyden(6), per sample", steps=10, time_ms=1.0, vs_plain=1.0, vs_batch=0.5,
                vs_same=0.4, vs_peer=0.25, cpu_vs_plain=1.0, residual=1e-10)]
    bwd = [dict(c=0.9, method="ours", forward_ms=1.0, backward_ms=2.0, total_ms=3.0, vs_first=1.0, grad_error=1e-9,
                fd_error=1e-10),
           dict(c=0.9, method="dense reference (Newton)", forward_ms=None, backward_ms=None, total_ms=None,
                vs_first=None, grad_error=0.0, fd_error=1e-10)]
    costs = [dict(method="plain", path="-", us_per_step=27.0, accelerator_share=0.0, aten_ops_per_step=9.5,
                  syncs_per_step=0.1)]
    block = deq.markdown(fwd, bwd, costs, 5, 64, 32)
    assert "| radius | 0.9 | plain, per sample | 10 | 1.0 ms | 1.00 | 0.50 | — | — | 1.00 | 1.0e-10 |" in block
    assert ("| radius | 0.9 | Broyden(6), per sample | 10 | 1.0 ms | 1.00 | 0.50 | 0.40 | 0.25 | 1.00 | 1.0e-10 |"
            in block)
    assert deq._peer_of("Anderson(6), per sample") == "TorchDEQ anderson (m = 6)" and deq._peer_of("plain") is None
    assert deq._peer_of(deq.SAME) is None
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{deq.BEGIN}\nold\n{deq.END}\n")
    deq.write_readme(str(readme), block, deq.BEGIN, deq.END)
    assert readme.read_text() == f"# x\n{deq.BEGIN}\n{block}\n{deq.END}\n"
