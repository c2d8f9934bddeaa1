"""The DEQ example of docs/contractive.rst, complete and runnable: a learned weight kept contractive.

    python tests/compat/contractive_deq.py

A deep equilibrium layer u* = tanh(W u* + U x + c) is trained with Adam at lr 0.05 to saturated
targets, which pull ||W||_2 past 1, where tanh(W u + ...) stops being a contraction. Four ways to
train it, each printing the largest ||W||_2 it reached and the final loss:

- ``free``: W unconstrained; the solve raises hp.DivergenceError once W leaves the contraction region;
- ``exact``: W = 0.9 V / max(1, ||V||_2), the exact spectral norm (an SVD per step): ||W||_2 <= 0.9;
- ``spectral_norm``: torch.nn.utils.parametrizations.spectral_norm (a power-iteration estimate of
  ||V||_2, a lower bound that lags fast-moving weights), times 0.9;
- ``jacobian``: W free, plus a Hutchinson estimate of ||dT/du||_F^2 at the fixed point in the loss.

Run by tests/test_contractive_docs.py.
"""

import warnings

import torch

import hodl_plugin as hp

D = torch.float64
d, m, N = 16, 8, 32


class DEQ(torch.nn.Module):
    """u* = tanh(W u* + U x + c), solved by GKM (one problem per sample), implicit gradients."""

    def __init__(self, mode: str, gamma: float = 0.9, power_iterations: int = 10) -> None:
        super().__init__()
        self.mode, self.gamma = mode, gamma
        self.V = torch.nn.Linear(d, d, bias=False, dtype=D)
        torch.nn.init.normal_(self.V.weight, std=0.3 / d**0.5)
        if mode == "spectral_norm":
            torch.nn.utils.parametrizations.spectral_norm(self.V, n_power_iterations=power_iterations)
        self.U = torch.nn.Linear(m, d, dtype=D)
        self.solver = hp.GKMSolver(self.T, max_steps=500, batch_dims=1)

    @staticmethod
    def T(u, z, W):  # z = U x + c; W is passed explicitly: it is read once per training step
        return torch.tanh(u @ W.T + z)

    def weight(self) -> torch.Tensor:
        if self.mode == "exact":
            V = self.V.weight
            return self.gamma * V / torch.clamp(torch.linalg.matrix_norm(V, 2), min=1.0)
        if self.mode == "spectral_norm":  # V.weight is already V / sigma_estimate
            return self.gamma * self.V.weight
        return self.V.weight

    def forward(self, x):
        W, z = self.weight(), self.U(x)
        u = self.solver(torch.zeros(x.shape[0], d, dtype=D), z, W)
        return u, z, W


def jacobian_penalty(T, u, z, W):
    """Hutchinson: E ||eps^T dT/du||^2 = ||dT/du||_F^2, one random eps, differentiable w.r.t. W and z."""
    u = u.detach().requires_grad_(True)
    eps = torch.randn_like(u)
    (vjp,) = torch.autograd.grad(T(u, z, W), u, eps, create_graph=True)
    return (vjp**2).sum(-1).mean()


def train(mode: str, steps: int = 100, lr: float = 0.05, seed: int = 0, power_iterations: int = 10) -> dict:
    torch.manual_seed(seed)
    X = torch.randn(N, m, dtype=D)
    Y = 0.9 * torch.sign(torch.randn(N, d, dtype=D))  # saturated targets: they ask for a large gain
    model = DEQ(mode, power_iterations=power_iterations)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out = {"mode": mode, "max_norm": 0.0, "max_local": 0.0, "losses": [], "error": None, "unconverged": 0}
    for step in range(steps):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", hp.ConvergenceWarning)
                u, z, W = model(X)
        except hp.DivergenceError as e:
            out["error"] = f"step {step}: {type(e).__name__}: {e}"
            break
        out["unconverged"] += any(issubclass(w.category, hp.ConvergenceWarning) for w in caught)
        out["max_norm"] = max(out["max_norm"], float(torch.linalg.matrix_norm(W.detach(), 2)))
        # the local contraction factor: ||dT/du||_2 = ||diag(1 - u*^2) W||_2 at each sample's fixed point
        J = (1 - u.detach() ** 2).unsqueeze(-1) * W.detach()
        out["max_local"] = max(out["max_local"], float(torch.linalg.matrix_norm(J, 2).max()))
        loss = 0.5 * ((u - Y) ** 2).sum(-1).mean()
        out["losses"].append(float(loss.detach()))
        if mode == "jacobian":
            loss = loss + 1.0 * jacobian_penalty(model.T, u, z, W)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def main() -> dict:
    results = {}
    for mode in ("free", "exact", "spectral_norm", "jacobian"):
        r = results[mode] = train(mode)
        losses = r["losses"]
        line = (f"{mode:14s} max ||W||_2 = {r['max_norm']:.3f}, max ||dT/du||_2 = {r['max_local']:.3f}   "
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}   {len(losses)} steps, "
                f"{r['unconverged']} unconverged solves")
        print(line + (f"   {r['error'][:90]}..." if r["error"] else ""))
    return results


if __name__ == "__main__":
    main()
