"""The two-level Betty example of docs/betty.rst, complete and runnable (betty-ml 0.2.1).

    python tests/compat/betty_example.py     # prints x = A y = [1.5, -0.5]

Run by tests/test_betty_nodes.py. (betty-ml 0.1.1 is refused at import, with the install command.)
"""

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

import hodl_plugin.betty as hb

hb.set_log_level("WARNING")

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


def main():
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    lower = Lower("lower", hb.HODLConfig(type="gkm_implicit", tol=1e-12, max_steps=2000))
    upper = Upper("upper", hb.HODLConfig(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=1.0))
    engine = Engine([upper, lower], EngineConfig(train_iters=300, strategy="cpu"),
                    dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.run()
    return xm.x.detach()


if __name__ == "__main__":
    x = main()
    print("x", x, "expected", A @ y)  # x* = A y
