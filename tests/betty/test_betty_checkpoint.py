"""Checkpoints of a Betty engine: a resumed run equals the uninterrupted one bit for bit, or is refused.

Fault tests: killed mid-save, corrupt / foreign file, wrong graph, Ctrl-C mid-step, resumed mid-epoch,
an engine that already ran, a checkpoint past train_iters, a failing apply (rolled back).
"""

from __future__ import annotations

import io
import os
import signal
import warnings

import pytest
import torch
from _oracles import DT

pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin as hp  # noqa: E402
import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")
TOTAL = 12


def _quad(n=8, m=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, n, generator=g, dtype=DT)
    Q = R @ R.T / n + torch.eye(n, dtype=DT)
    return Q, torch.randn(n, m, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


def build(total=TOTAL, loader="list", engine_cls=Engine, kind="gkm_inexact", on_call=None, names=("upper", "lower")):
    """Two levels with data (4 batches an epoch), an inexact GKM node (accuracy schedule, per-sample warm
    starts), Adam + a step LR schedule, and the global RNG inside the upper loss."""
    Q, B, y = _quad()
    s = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    g = torch.Generator().manual_seed(0)
    idx, c = torch.arange(8), torch.randn(8, 2, generator=g, dtype=DT)
    if loader == "list":
        data = [(idx[i:i + 2], c[i:i + 2]) for i in range(0, 8, 2)]
    else:
        gen = torch.Generator().manual_seed(5) if loader == "seeded" else None
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(idx, c), batch_size=2, shuffle=True,
                                           generator=gen)
    up_name, low_name = names
    calls = [0]

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            calls[0] += 1
            if on_call is not None:
                on_call(calls[0])
            x = getattr(self, up_name).module.x
            return u - s * (u @ Q.T - (batch[1] + x) @ B.T)

        def initial_state(self, batch):
            return torch.zeros(batch[0].shape[0], Q.shape[0], dtype=DT)

        def sample_keys(self, batch):
            return batch[0].tolist()

    class Up(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            noise = 1e-3 * torch.randn((), dtype=DT)  # the global RNG reaches the gradient: resuming restores it
            return 0.5 * ((getattr(self, low_name).u - y) ** 2).sum() * (1 + noise)

    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.zeros(2, dtype=DT))
    opt = torch.optim.Adam(xm.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    up = Up(up_name, hb.HODLConfig(type="darts"), module=xm, optimizer=opt, scheduler=sched)
    opts = {"eps": hp.Polynomial(1e-3, 0.5)} if kind == "gkm_inexact" else {"tol": 1e-10}
    low = Lower(low_name, hb.HODLConfig(type=kind, max_steps=5000, **opts), train_data_loader=data)
    eng = engine_cls([up, low], EngineConfig(train_iters=total, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    return eng, xm, low


def final(eng, xm, low):
    return xm.x.detach().clone(), low.u.detach().clone(), low.method.state_dict().get("k")


def straight(loader="list"):
    torch.manual_seed(123)
    eng, xm, low = build(loader=loader)
    eng.run()
    return final(eng, xm, low)


def first_part(tmp_path, steps=5, loader="list"):
    """Run `steps` of TOTAL global steps (mid-epoch: 4 batches an epoch) and save."""
    torch.manual_seed(123)
    eng, _, _ = build(loader=loader)
    eng.train_iters = steps
    eng.run()
    path = tmp_path / "ckpt.pt"
    hb.save_checkpoint(eng, path)
    return path


def resume(path, **kw):
    torch.manual_seed(999)  # another process state: everything must come from the checkpoint
    eng, xm, low = build(**kw)
    hb.load_checkpoint(eng, path)
    eng.run()
    return final(eng, xm, low)


def same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def fresh_state(eng, xm, low):
    return eng.global_step == 0 and not torch.any(xm.x) and low._count == 0 and low.method.state_dict()["k"] == 0


def test_periodic_checkpoint_resumed_mid_epoch_is_bit_for_bit(tmp_path):
    ref = straight()
    got = resume(first_part(tmp_path, steps=5))
    assert same(got, ref)
    assert ref[2] == TOTAL and not torch.equal(ref[0], torch.zeros(2, dtype=DT))


def test_shuffled_loader_with_seeded_generator_resumes_mid_epoch_bit_for_bit(tmp_path):
    ref = straight("seeded")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hb.CheckpointWarning)
        got = resume(first_part(tmp_path, steps=6, loader="seeded"), loader="seeded")
    assert same(got, ref)


def test_shuffled_loader_without_generator_warns_on_save_and_resume(tmp_path):
    with pytest.warns(hb.CheckpointWarning, match="generator=torch.Generator"):
        path = first_part(tmp_path, loader="unseeded")
    with pytest.warns(hb.CheckpointWarning, match="shuffles without a seeded generator"):
        resume(path, loader="unseeded")


def test_ctrl_c_during_a_solve_finishes_the_step_in_hodl_engine_and_resumes_bit_for_bit(tmp_path):
    ref = straight()

    def ctrl_c(n):  # the signal arrives inside the 6th global step's solve
        if n == 6 * 10 + 3:
            os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(123)
    eng, _, _ = build(engine_cls=hb.HODLEngine, on_call=ctrl_c)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        try:
            eng.run()
        except KeyboardInterrupt:
            calls.append(eng.global_step)
            hb.save_checkpoint(eng, tmp_path / "ckpt.pt")  # as a user's `except KeyboardInterrupt:` does
            raise
    assert 0 < calls[0] < TOTAL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert same(resume(tmp_path / "ckpt.pt"), ref)


def test_ctrl_c_mid_step_in_a_plain_engine_is_refused(tmp_path):
    def interrupt(n):
        if n == 40:
            raise KeyboardInterrupt

    eng, _, _ = build(on_call=interrupt)
    with pytest.raises(KeyboardInterrupt):
        eng.run()
    with pytest.raises(hb.CheckpointError, match="inside global step"):
        hb.save_checkpoint(eng, tmp_path / "ckpt.pt")
    assert not os.listdir(tmp_path)  # nothing written


def test_load_into_an_engine_that_already_ran_is_refused(tmp_path):
    path = first_part(tmp_path)
    eng, _, _ = build()
    eng.train_iters = 2
    eng.run()
    with pytest.raises(hb.CheckpointError, match="freshly built engine"):
        hb.load_checkpoint(eng, path)
    assert eng.global_step == 2


def test_checkpoint_past_train_iters_is_refused(tmp_path):
    path = first_part(tmp_path, steps=5)
    eng, xm, low = build(total=4)
    with pytest.raises(hb.CheckpointError, match=r"global step 5, past this engine's EngineConfig\(train_iters=4\)"):
        hb.load_checkpoint(eng, path)
    assert fresh_state(eng, xm, low) and eng.train_iters == 4


def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = first_part(tmp_path, steps=5)
    before = path.read_bytes()
    eng, _, _ = build()
    eng.train_iters = 7
    eng.run()
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        if isinstance(f, io.BytesIO):  # (the state serialised in memory to be sealed: not the file)
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        hb.save_checkpoint(eng, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left
    assert same(resume(path), straight())  # the previous checkpoint still resumes exactly


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "empty"])
def test_corrupt_or_foreign_file_names_the_file(tmp_path, damage):
    path = first_part(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "foreign":
        torch.save({"problems": {}, "model": torch.zeros(3)}, path)
    else:
        path.write_bytes(b"")
    eng, xm, low = build()
    with pytest.raises(hb.CheckpointError, match="not a valid hodl_plugin checkpoint") as e:
        hb.load_checkpoint(eng, path)
    assert str(path) in str(e.value)
    assert fresh_state(eng, xm, low)


@pytest.mark.parametrize("other,match", [
    ({"names": ("top", "lower")}, "graph has problems"),
    ({"kind": "gkm_implicit"}, "Inexact hypergradient, this node uses Implicit"),
])
def test_wrong_graph_is_refused_and_the_engine_untouched(tmp_path, other, match):
    path = first_part(tmp_path)
    eng, xm, low = build(**other)
    with pytest.raises(hb.CheckpointError, match=match):
        hb.load_checkpoint(eng, path)
    assert eng.global_step == 0 and not torch.any(xm.x) and low._count == 0


@pytest.mark.parametrize("where", ["scheduler", "rng"])
def test_a_failing_apply_is_rolled_back(tmp_path, monkeypatch, where):
    """Validation passed but applying fails: early (the upper's scheduler) or last (the RNG, after the GKM
    node and the data replay). The engine is put back, and the same engine then loads the checkpoint and
    resumes exactly (so the data iterators were rewound too)."""
    import hodl_plugin.betty.checkpoint as ck

    path = first_part(tmp_path)
    torch.manual_seed(999)
    eng, xm, low = build()
    rng = torch.get_rng_state()
    up = eng.problems[0]
    owner, attr = (up.scheduler, "load_state_dict") if where == "scheduler" else (ck, "_set_rng_state")
    real, failures = getattr(owner, attr), [1]

    def broken_once(state):  # the first call fails; the roll-back's own call works
        if failures:
            failures.pop()
            raise RuntimeError("state from another torch")
        real(state)

    monkeypatch.setattr(owner, attr, broken_once)
    with pytest.raises(hb.CheckpointError, match="engine is unchanged"):
        hb.load_checkpoint(eng, path)
    assert fresh_state(eng, xm, low) and torch.equal(torch.get_rng_state(), rng)
    assert low.warm == {} and eng.train_iters == TOTAL and up.optimizer.state_dict()["state"] == {}
    hb.load_checkpoint(eng, path)
    eng.run()
    assert same(final(eng, xm, low), straight())


@pytest.mark.parametrize("where", ["upper parameter", "middle"])
def test_a_changed_byte_is_caught(tmp_path, where):
    """torch.load checks no checksum: one flipped byte in the stored upper parameter loaded as x[0] = 25669
    (was 0.39), one in the middle of the file changed the stored random state — both silently. The content
    is sealed with its SHA-256: refused, naming the file, the engine untouched."""
    path = first_part(tmp_path)
    raw = bytearray(path.read_bytes())
    if where == "middle":
        i = len(raw) // 2
    else:
        eng, xm, _ = build()
        eng.train_iters = 5
        torch.manual_seed(123)
        eng.run()  # the same run as first_part: its x is the one stored
        i = bytes(raw).find(xm.x.detach().numpy().tobytes())
        assert i > 0
    raw[i + 3] ^= 0x7F
    path.write_bytes(bytes(raw))
    eng, xm, low = build()
    with pytest.raises(hb.CheckpointError) as e:
        hb.load_checkpoint(eng, path)
    assert str(path) in str(e.value) and ("corrupt" in str(e.value) or "not a valid" in str(e.value))
    assert fresh_state(eng, xm, low)
