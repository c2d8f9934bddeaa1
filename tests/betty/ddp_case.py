"""A HODL graph run data-parallel on CPU (2 gloo processes) and its single-process full-batch twin."""

from __future__ import annotations

import os

import torch
from betty.configs import EngineConfig
from betty.problems import ImplicitProblem

import hodl_plugin.betty as hb

DT = torch.float64
N, n, m = 8, 6, 2


def data():
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(N)
    c = torch.randn(N, m, generator=g, dtype=DT)
    y = torch.randn(N, n, generator=g, dtype=DT)
    R = torch.randn(n, n, generator=g, dtype=DT)
    Q = R @ R.T / n + torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=g, dtype=DT)
    return torch.utils.data.TensorDataset(idx, c, y), Q, B


def build(batch_size, strategy):
    ds, Q, B = data()
    s = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=True)

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            _, c, _ = batch
            return u - s * (u @ Q.T - (c + hb.unwrap(self.upper.module).x) @ B.T)

        def initial_state(self, batch):
            return torch.zeros(batch[0].shape[0], n, dtype=DT)

        def sample_keys(self, batch):
            return batch[0].tolist()

    class Upper(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            y = self.lower.cur_batch[2]
            return 0.5 * ((self.lower.u - y) ** 2).sum(dim=1).mean()

    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.zeros(m, dtype=DT))
    G = torch.linalg.solve(Q, B)
    lr = 1.0 / float(torch.linalg.eigvalsh(G.T @ G).max())  # the upper Hessian is GᵀG: a stable step
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=lr))
    low = Lower("lower", hb.HODLConfig(type="gkm_implicit", tol=1e-11, max_steps=5000), train_data_loader=loader)
    eng = hb.HODLEngine([up, low], EngineConfig(train_iters=12, strategy=strategy, backend="gloo"),
                        dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    return eng, xm


def single_process():
    hb.set_log_level("WARNING")
    eng, xm = build(batch_size=N, strategy="cpu")
    eng.run()
    return xm.x.detach().clone()


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    hb.set_log_level("WARNING")
    eng, xm = build(batch_size=N // world, strategy="distributed")
    eng.run()  # Betty's run() destroys the process group at the end
    torch.save(xm.x.detach().clone(), os.path.join(out, f"x{rank}.pt"))
