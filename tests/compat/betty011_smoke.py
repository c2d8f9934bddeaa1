"""Smoke check of the Betty adapter on betty-ml 0.1.1 (what a plain pip gives on Python 3.11).

Not collected by pytest (the suite targets 0.2.1). Run in a venv with betty-ml==0.1.1:
    python tests/compat/betty011_smoke.py     # prints x = A y = [1.5, -0.5]
"""

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

import hodl_plugin.betty as hb

A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
y = torch.tensor([1.0, -1.0], dtype=torch.float64)


class Lower(hb.GKMProblem):
    def operator(self, u, batch):
        return u - 0.4 * (A @ u - self.upper.module.x)

    def initial_state(self, batch):
        return torch.zeros(2, dtype=torch.float64)


class Upper(ImplicitProblem):
    def get_batch(self):
        return None

    def training_step(self, batch):
        return 0.5 * ((self.lower.u - y) ** 2).sum()


xm = torch.nn.Module()
xm.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
lower = Lower("lower", hb.HODLConfig(type="gkm_implicit", tol=1e-12, max_steps=2000))
upper = Upper("upper", hb.HODLConfig(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=1.0))
engine = Engine([upper, lower], EngineConfig(train_iters=300),
                dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
engine.run()
print("x", xm.x.detach(), "expected", A @ y)
assert torch.allclose(xm.x.detach(), A @ y, atol=1e-6)
