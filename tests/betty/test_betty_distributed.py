"""A HODL graph run data-parallel on CPU (:mod:`hodl_plugin.betty.distributed`): 2 gloo processes on loopback
(:mod:`ddp_case`) learn the same upper variable as the single-process full-batch run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("betty")


def test_data_parallel_on_cpu_with_gloo_equals_full_batch(tmp_path):
    """2 processes on loopback (gloo): the learned upper variable equals the single-process full-batch run."""
    import socket

    import ddp_case
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(ddp_case.worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    x0, x1 = (torch.load(tmp_path / f"x{r}.pt") for r in (0, 1))
    ref = ddp_case.single_process()
    assert torch.equal(x0, x1)
    assert float((x0 - ref).abs().max()) < 1e-6
    assert float(ref.abs().max()) > 1e-2  # it moved
