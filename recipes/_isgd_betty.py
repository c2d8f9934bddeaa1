r"""ISGD as a Betty graph: the learned FoE regulariser of :mod:`recipes.learned_regularizer` in Betty
(the model and task of :mod:`recipes._foe`, shared with the core recipe).

Two nodes, the same mathematics as ``run_isgd`` of the core recipe:

- ``regulariser`` (a Betty ``ImplicitProblem``): the FoE parameters θ, Adam with steps
  α₀(k+1)^{-q} (a ``LambdaLR`` Betty steps after each update), the zero-mean projection of the
  filters in ``param_callback``; its loss is the squared error of the lower solution to the clean
  patches of Betty's current mini-batch;
- ``denoiser`` (a :class:`hodl_plugin.betty.GKMProblem`): per patch the GKM gradient step
  :math:`T(u) = u - \tau\nabla_u h(u; y, \theta)`, :math:`\tau = 1/(1 + L(\theta))` set at the start of
  each step, solved by ``gkm_inexact`` with ISGD's absolute decaying accuracies
  :math:`\varepsilon_k = \delta_k = \varepsilon_0 (k+1)^{-p}` (the method object in
  ``HODLConfig(method=...)``) and per-sample warm starts (``sample_keys``: the patch indices).

Betty's data loaders give the mini-batches (the same fixed order as the core loop: batch
:math:`b = k \bmod (N/B)`), one loader per node holding the same batches. Cost is counted as in the
core recipe: (lower steps + adjoint CG iterations) × patches.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

import hodl_plugin as hp
import hodl_plugin.betty as hb

from ._foe import FoE, Task, adam_with_decay, upper_loss

__all__ = ["run_isgd_betty"]


class Denoiser(hb.GKMProblem):
    """The lower level: a batch of patches ``(y, keys)`` solved by the task's gradient step."""

    symmetric_jacobian = True  # a gradient step: CG for the adjoint

    def operator(self, u: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.T(u, batch[0])

    def initial_state(self, batch: Any) -> torch.Tensor:
        return batch[0].clone()  # u₀ = y for a patch never solved before

    def sample_keys(self, batch: Any) -> Any:
        return batch[1]  # the patch indices: each patch warm-starts from its own last iterate

    def one_step_descent(self, batch: Any = None) -> dict[str, float]:
        self.task.set_step(self.T, self.regulariser.module)  # τ = 1/(1 + L(θ)) for this solve
        return super().one_step_descent(batch)


class Regulariser(ImplicitProblem):
    """The upper level: θ, trained on the squared error of the lower solution to the clean patches."""

    def training_step(self, batch: Any) -> torch.Tensor:
        return upper_loss(self.denoiser.u, batch[0])

    def param_callback(self) -> None:
        self.module.project()  # filters kept zero-mean, as after each core step
        info = self.denoiser.info
        self.cost += self.batch_size * (info.steps + info.adjoint.iterations)
        self.steps += 1
        done = self.cost >= self.budget or self.steps >= self.max_steps
        if self.steps % self.eval_every == 0 or done:
            t1 = time.perf_counter()
            self.curve_cost.append(self.cost)
            self.curve_time.append(t1 - self.t0 - self.t_eval)  # training seconds, evaluations excluded
            self.curve_psnr.append(self.task.test_psnr(self.module))
            self.t_eval += time.perf_counter() - t1
        self.done = done


class _BudgetEngine(Engine):
    """Betty's Engine whose global steps do nothing once the upper node's budget is spent."""

    def train_step(self) -> None:
        if not self.regulariser.done:
            super().train_step()


def run_isgd_betty(task: Task, args: Any, budget: float, label: str,
                   max_steps: Optional[int] = None) -> dict[str, Any]:
    """ISGD in a Betty graph (see the module docstring); the same result dict as ``run_isgd``."""
    hb.set_log_level("WARNING")
    foe = FoE(args.filters, args.ksize, args.seed)
    T = task.operator(foe)
    B, N = args.batch, len(task.y_train)
    idx = torch.arange(N)
    lower_data = [(task.y_train[b * B:(b + 1) * B], idx[b * B:(b + 1) * B]) for b in range(N // B)]
    upper_data = [(task.x_train[b * B:(b + 1) * B],) for b in range(N // B)]
    eps = hp.Polynomial(args.eps0, args.p)
    method = hp.Inexact(eps=eps, delta=eps, solver="cg", constants=None, relative=False)
    lower = Denoiser("denoiser", hb.HODLConfig(type="gkm_inexact", method=method, max_steps=args.max_lower,
                                               check_every=5, on_nonconvergence="ignore",
                                               acceleration=getattr(task, "acc", None)),
                     train_data_loader=lower_data)
    lower.task, lower.T = task, T
    opt, sched = adam_with_decay(foe, args.lr, args.q)
    upper = Regulariser("regulariser", hb.HODLConfig(), module=foe, optimizer=opt, scheduler=sched,
                        train_data_loader=upper_data)
    upper.task, upper.batch_size, upper.budget, upper.eval_every = task, B, budget, args.eval_every
    upper.max_steps = max_steps if max_steps is not None else math.inf
    upper.cost, upper.steps, upper.done = 0.0, 0, False
    upper.curve_cost, upper.curve_psnr = [0.0], [task.test_psnr(foe)]
    iters = max_steps if max_steps is not None else int(math.ceil(budget / (2 * B))) + 1  # a step costs ≥ 2B
    engine = _BudgetEngine([upper, lower], EngineConfig(train_iters=iters, strategy="cpu", valid_step=10**9),
                           dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    upper.curve_time, upper.t_eval, upper.t0 = [0.0], 0.0, time.perf_counter()
    engine.run()
    return {"method": label, "test_psnr": upper.curve_psnr[-1], "cost": upper.cost, "steps": upper.steps,
            "curve_cost": upper.curve_cost, "curve_psnr": upper.curve_psnr, "curve_time": upper.curve_time,
            "foe": foe}
