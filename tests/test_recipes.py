"""Each recipe's --quick run: it finishes, writes its JSON and plot, and the method beats its baseline."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("matplotlib")


def test_nonsingleton_quick(tmp_path):
    from recipes import nonsingleton

    res = nonsingleton.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    km = rows["plain KM (α≡0)"]
    hodl = rows["HODL α=1/(k+1)"]
    # plain KM cannot learn x through the lower level; HODL reaches the closed-form solution
    assert km["dist_x"] > 0.9 and km["dist_u"] > 0.5
    assert hodl["dist_u"] < 0.02 and hodl["dist_x"] < 0.01
    assert all(r["dist_u"] < km["dist_u"] / 10 for name, r in rows.items() if name.startswith("HODL"))
    saved = json.load(open(tmp_path / "nonsingleton.json"))
    assert saved["rows"][1]["dist_u"] == hodl["dist_u"]
    assert os.path.getsize(tmp_path / "nonsingleton.png") > 10_000


def test_sparse_coding_quick(tmp_path):
    from recipes import sparse_coding

    res = sparse_coding.main(["--quick", "--no-progress", "--out", str(tmp_path), "--settings", "noiseless"])
    K = res["K"]
    nm = {r["method"].split(" (")[0]: r[f"NMSE@{K} (dB)"] for r in res["rows"]}
    # at equal K the learned iterations beat ISTA
    assert nm["HODL"] < nm["ISTA"] - 0.5
    assert nm["LISTA"] < nm["ISTA"] - 0.5
    assert os.path.getsize(tmp_path / "sparse_coding.png") > 10_000


def test_hyper_cleaning_quick(tmp_path):
    from recipes import hyper_cleaning

    res = hyper_cleaning.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    noisy = rows["no cleaning (noisy labels)"]["test_acc"]
    modes = [r for r in res["rows"] if "F1_flags" in r]
    assert len(modes) == 6  # five core modes and the implicit mode in a Betty Engine
    betty, core = rows["implicit (cg), Betty Engine"], rows["implicit (cg)"]
    assert abs(betty["val_loss"] - core["val_loss"]) < 1e-6  # the same computation through Betty
    assert betty["F1_flags"] == core["F1_flags"]
    for r in modes:  # every hypergradient mode cleans: better than training on the noisy labels
        assert r["test_acc"] > noisy + 0.03, r["method"]
        assert r["F1_flags"] > 0.85, r["method"]
    assert os.path.getsize(tmp_path / "hyper_cleaning.png") > 10_000


def test_learned_regularizer_quick(tmp_path):
    from recipes import learned_regularizer

    res = learned_regularizer.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    rows = {r["method"].split(" (")[0]: r for r in res["rows"]}
    noisy = rows["observation y"]["test_psnr"]
    assert 19.5 < noisy < 20.5  # SPEC T6 sanity: σ = 25/255 gives ≈ 20.2 dB
    isgd = rows["ISGD"]
    assert isgd["test_psnr"] > noisy + 4  # the learned regulariser denoises
    assert isgd["test_psnr"] > rows["MAID-style"]["test_psnr"]  # at equal cost
    assert os.path.getsize(tmp_path / "learned_regularizer.png") > 10_000


def _rows(res):
    return {r["method"]: r for r in res["rows"]}


def _restoration_checks(res, K):
    rows = _rows(res)
    hodl, hodl_long = rows[f"HODL α_k=(k+1)^-½, K={K}"], rows[f"HODL α_k=(k+1)^-½, {4 * K} steps"]
    unrolled_long = rows[f"unrolled α≡1, {4 * K} steps"]
    # at the trained K the learned GKM beats the task model run as many steps from the same u_0,
    # the tuned Tikhonov solution (its u_0) and the observation
    assert hodl["PSNR"] > rows[f"TV, {K} steps from u_0"]["PSNR"] + 0.2
    assert hodl["PSNR"] > rows["Tikhonov (tuned)"]["PSNR"] + 0.2
    assert hodl["PSNR"] > rows["observation b"]["PSNR"] + 1.0
    # beyond K, HODL is still a convergent iteration: no collapse, and above the unrolled network there
    assert hodl_long["PSNR"] > hodl["PSNR"] - 0.5
    assert hodl_long["PSNR"] > unrolled_long["PSNR"]
    assert 0 < hodl["SSIM"] <= 1


def test_deconvolution_quick(tmp_path):
    from recipes import deconvolution

    res = deconvolution.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    _restoration_checks(res, res["K"])
    assert os.path.getsize(tmp_path / "deconvolution.png") > 10_000


def test_derain_quick(tmp_path):
    from recipes import derain

    res = derain.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    _restoration_checks(res, res["K"])
    assert os.path.getsize(tmp_path / "derain.png") > 10_000


def test_few_shot_quick(tmp_path):
    from recipes import few_shot

    res = few_shot.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    rows = {r["method"].split(" (")[0]: r for r in res["rows"]}
    plain, hodl = rows["plain unrolled inner loop"], rows["HODL-aggregated inner loop"]
    assert 0.2 < plain["test_acc"] < 1  # better than chance (5-way)
    # the aggregated inner loop beats the plain one by more than the two confidence intervals
    assert hodl["test_acc"] > plain["test_acc"] + plain["ci95"] + hodl["ci95"]
    assert os.path.getsize(tmp_path / "few_shot.png") > 10_000
