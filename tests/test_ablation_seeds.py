"""Pooling an ablation's training-seed replicates (resampling_forcing.ablation_seeds) on hand-made folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from resampling_forcing.ablation_eval import METRICS, extrapolation_mean, t_two_sided_p
from resampling_forcing.ablation_seeds import main, pool

EVAL = {"clips": 4, "frames": 36, "segment_frames": 12, "given_chunks": 1, "sampler": {"steps": 2}, "seed": 0}


def _folder(root, seed, arms: dict, eval_settings=EVAL):
    """An ablation --out folder: report.json and eval/<arm>.npz with [clips, 3 segments] arrays."""
    d = root / f"seed{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"train_seed": seed, "eval": eval_settings,
                                               "arms": {a: {} for a in ["warmup", *arms]}}))
    for arm, fid in arms.items():
        arrays = {m: np.zeros((4, 3)) for m in METRICS}
        arrays["object_fidelity"] = np.asarray(fid, dtype=float)
        np.savez(d / "eval" / f"{arm}.npz", seconds=1.0, key="k", **arrays)
    return d


def test_pooled_difference_is_the_per_clip_mean_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tf = [rng.uniform(0.4, 0.6, (4, 3)) for _ in range(3)]
    gain = [tf[s] + rng.uniform(0.0, 0.1, (4, 3)) for s in range(3)]
    loss = [tf[s] - 0.2 + rng.normal(0.0, 0.01, (4, 3)) for s in range(3)]
    folders = [_folder(tmp_path, s, {"tf": tf[s], "gain": gain[s], "loss": loss[s], "only_here": tf[s]} if s == 0
                       else {"tf": tf[s], "gain": gain[s], "loss": loss[s]}) for s in range(3)]
    r = pool(folders, ["object_fidelity"])
    assert list(r["arms"]) == ["gain", "loss"] and r["seeds"] == [0, 1, 2]  # only_here is not in every seed
    want = np.mean([extrapolation_mean(gain[s]) - extrapolation_mean(tf[s]) for s in range(3)], axis=0)  # [4 clips]
    got = r["arms"]["gain"]["object_fidelity"]["pooled"]
    assert got["mean"] == pytest.approx(want.mean(), abs=1e-5) and got["n"] == 4
    t = want.mean() / (want.std(ddof=1) / 2.0)
    assert got["p"] == pytest.approx(t_two_sided_p(t, 3), abs=1e-6)
    ps = {a: r["arms"][a]["object_fidelity"]["pooled"]["p"] for a in ("gain", "loss")}
    lo = min(ps, key=ps.get)  # Holm over the two arms: the smaller p doubled
    assert r["arms"][lo]["object_fidelity"]["pooled"]["p_holm"] == pytest.approx(min(1.0, 2 * ps[lo]), abs=1e-6)
    seed1 = r["arms"]["loss"]["object_fidelity"]["seeds"][1]
    assert seed1["mean"] == pytest.approx((extrapolation_mean(loss[1]) - extrapolation_mean(tf[1])).mean(), abs=1e-5)
    assert main([str(f) for f in folders] + ["--metrics", "object_fidelity", "--out", str(tmp_path / "p.json")]) == 0
    assert "| loss |" in capsys.readouterr().out and json.loads((tmp_path / "p.json").read_text())["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("case", ["other evaluation", "same seed", "no tf", "missing npz", "bad metric", "not a folder"])
def test_bad_folders_are_one_line_exit_2(tmp_path, capsys, case):
    a = _folder(tmp_path, 0, {"tf": np.ones((4, 3)), "x": np.ones((4, 3))})
    args = [str(a)]
    if case == "other evaluation":
        args.append(str(_folder(tmp_path, 1, {"tf": np.ones((4, 3)), "x": np.ones((4, 3))}, {**EVAL, "clips": 8})))
    elif case == "same seed":
        b = _folder(tmp_path / "b", 0, {"tf": np.ones((4, 3)), "x": np.ones((4, 3))})
        args.append(str(b))
    elif case == "no tf":
        args = [str(_folder(tmp_path / "c", 3, {"x": np.ones((4, 3))}))]
    elif case == "missing npz":
        (a / "eval" / "x.npz").unlink()
    elif case == "bad metric":
        args += ["--metrics", "fidelity"]
    elif case == "not a folder":
        args.append(str(tmp_path / "nowhere"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablation_seeds: error:"), err
