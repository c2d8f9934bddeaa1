"""Coupled nodes (docs/betty.rst): HODL's aggregation with the upper node's own objective, written once.

    python tests/compat/betty_coupled_example.py     # u ≈ [2.5, -0.5] (1e-3 after 200 steps: α_k = 1/(k+1))

The lower level u1 + u2 = b has a line of solutions; plain KM from 0 finds the minimum-norm one
(1, 1). With ``HODLConfig(alpha=...)`` the GKM node aggregates F = the upper's training_step
(½||u - y||², nothing written twice) and selects the solution closest to y. Run by
tests/betty/test_betty_coupling.py.
"""

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

import hodl_plugin as hp
import hodl_plugin.betty as hb

hb.set_log_level("WARNING")

a = torch.tensor([1.0, 1.0], dtype=torch.float64)
y = torch.tensor([3.0, 0.0], dtype=torch.float64)


class Lower(hb.GKMProblem):
    def operator(self, u, batch):  # a gradient step on ½(aᵀu - b)², b = the upper's x
        return u - 0.25 * a * (a @ u - self.upper.module.x)

    def initial_state(self, batch):
        return torch.zeros(2, dtype=torch.float64)


class Upper(ImplicitProblem):
    def get_batch(self):
        return None

    def training_step(self, batch):  # F(u), also the aggregation's objective
        return 0.5 * ((self.lower.u - y) ** 2).sum()


def main(alpha=hp.Harmonic(1.0)):
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    lower = Lower("lower", hb.HODLConfig(type="gkm_first_order", alpha=alpha, tol=0.0, max_steps=200))
    upper = Upper("upper", hb.HODLConfig(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
    engine = Engine([upper, lower], EngineConfig(train_iters=1, strategy="cpu"),
                    dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.run()
    return lower.u.detach()


if __name__ == "__main__":
    print("u", main(), "without aggregation", main(alpha=None))
