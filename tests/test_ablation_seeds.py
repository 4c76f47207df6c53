"""Pooling an ablation's training-seed replicates (resampling_forcing.ablation_seeds) on hand-made folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from resampling_forcing.ablation_eval import METRICS, extrapolation_mean, paired
from resampling_forcing.stats import interval
from resampling_forcing.ablation_seeds import main, pool, two_way_mean

EVAL = {"clips": 4, "frames": 36, "segment_frames": 12, "given_chunks": 1, "sampler": {"steps": 2}, "seed": 0}
KEY = {"metrics": 2, "clips": 4, "given": 1, "seed": 0, "seg": 12, "routing": None, "split": "eval"}


SLIDING = ["window", None, 0, 2]


def _folder(root, seed, arms: dict, eval_settings=EVAL, key=KEY, overrides=None, steps=300, sliding=None,
            sliding_routing=SLIDING):
    """An ablation --out folder: report.json and eval/<arm>.npz ([clips, 3 segments] arrays, a cache key);
    `sliding` {arm: fidelity}: also a sliding protocol (eval/<arm>_sliding.npz, routed by `sliding_routing`)."""
    d = root / f"seed{seed}"
    (d / "eval").mkdir(parents=True)
    entries = {a: {"overrides": (overrides or {}).get(a, [f"stage of {a}", "shift"])} for a in ["warmup", *arms]}
    report = {"train_seed": seed, "eval": eval_settings, "arms": entries, "steps_per_arm": steps, "warmup": "w",
              "config": "c", "data_seed": 0}
    if sliding is not None:
        report["protocols"] = {"sliding": {"routing": sliding_routing, "arms": {a: {} for a in ["warmup", *sliding]}}}
    (d / "report.json").write_text(json.dumps(report))
    for arm, fid in [*arms.items(), *((f"{a}_sliding", f) for a, f in (sliding or {}).items())]:
        arrays = {m: np.zeros((len(fid), 3)) for m in METRICS}
        arrays["object_fidelity"] = np.asarray(fid, dtype=float)
        k = {**key, "routing": sliding_routing} if arm.endswith("_sliding") else key
        np.savez(d / "eval" / f"{arm}.npz", seconds=1.0, key=json.dumps({"weights": [str(d), arm], **k}), **arrays)
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
    d = np.stack([extrapolation_mean(gain[s]) - extrapolation_mean(tf[s]) for s in range(3)], axis=1)  # [4, 3]
    got = r["arms"]["gain"]["object_fidelity"]["pooled"]
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-5) and got["n"] == 4 and got["seeds"] == 3
    assert got["p"] == pytest.approx(two_way_mean(d)["p"], rel=1e-2)
    ps = {a: two_way_mean(np.stack([extrapolation_mean(x[s]) - extrapolation_mean(tf[s]) for s in range(3)], 1))["p"]
          for a, x in (("gain", gain), ("loss", loss))}
    lo = min(ps, key=ps.get)  # Holm over the two arms: the smaller p doubled
    assert r["arms"][lo]["object_fidelity"]["pooled"]["p_holm"] == pytest.approx(min(1.0, 2 * ps[lo]), rel=1e-2)
    seed1 = r["arms"]["loss"]["object_fidelity"]["seeds"][1]
    assert seed1["mean"] == pytest.approx((extrapolation_mean(loss[1]) - extrapolation_mean(tf[1])).mean(), abs=1e-5)
    assert main([str(f) for f in folders] + ["--metrics", "object_fidelity", "--out", str(tmp_path / "p.json")]) == 0
    assert "| loss |" in capsys.readouterr().out and json.loads((tmp_path / "p.json").read_text())["seeds"] == [0, 1, 2]


def test_a_protocol_pools_its_own_evaluations(tmp_path, capsys):
    """--protocol sliding pools the sliding-window evaluations (eval/<arm>_sliding.npz), not the dense ones."""
    rng = np.random.default_rng(2)
    dense = [{a: rng.uniform(0.4, 0.6, (4, 3)) for a in ("tf", "x")} for _ in range(2)]
    slide = [{a: rng.uniform(0.1, 0.5, (4, 3)) for a in ("tf", "x")} for _ in range(2)]
    folders = [_folder(tmp_path, s, dense[s], sliding=slide[s]) for s in range(2)]
    d = {name: np.stack([extrapolation_mean(v[s]["x"]) - extrapolation_mean(v[s]["tf"]) for s in range(2)], axis=1).mean()
         for name, v in (("dense", dense), ("sliding", slide))}
    r = pool(folders, ["object_fidelity"], "sliding")
    assert r["protocol"] == "sliding" and r["routing"] == SLIDING
    assert r["arms"]["x"]["object_fidelity"]["pooled"]["mean"] == pytest.approx(d["sliding"], abs=1e-5)
    assert pool(folders, ["object_fidelity"])["arms"]["x"]["object_fidelity"]["pooled"]["mean"] == pytest.approx(
        d["dense"], abs=1e-5)
    assert main([str(f) for f in folders] + ["--metrics", "object_fidelity", "--protocol", "sliding"]) == 0
    assert "sliding attention" in capsys.readouterr().out


def test_another_reference_arm_and_a_chosen_family(tmp_path, capsys):
    """--reference pairs every arm with that arm instead of tf (autoregressive vs parallel resampling);
    --arms restricts the compared arms, and so Holm's family."""
    rng = np.random.default_rng(3)
    runs = [{a: rng.uniform(0.2, 0.8, (4, 3)) for a in ("tf", "ar", "par")} for _ in range(2)]
    folders = [_folder(tmp_path, s, runs[s]) for s in range(2)]
    r = pool(folders, ["object_fidelity"], reference="par")
    assert r["reference"] == "par" and list(r["arms"]) == ["tf", "ar"]
    d = np.stack([extrapolation_mean(runs[s]["ar"]) - extrapolation_mean(runs[s]["par"]) for s in range(2)], axis=1)
    got = r["arms"]["ar"]["object_fidelity"]["pooled"]
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-5) and got["p"] == pytest.approx(two_way_mean(d)["p"], rel=1e-2)
    one = pool(folders, ["object_fidelity"], reference="par", arms=["ar"])["arms"]
    alone = one["ar"]["object_fidelity"]["pooled"]
    assert list(one) == ["ar"] and alone["p_holm"] == alone["p"]  # a family of one: nothing to adjust
    assert main([str(f) for f in folders] + ["--metrics", "object_fidelity", "--reference", "par", "--arms", "ar"]) == 0
    out = capsys.readouterr().out
    assert "arm - par" in out and "| ar |" in out and "| tf |" not in out


def test_two_way_interval_counts_the_seed_variance():
    """Under no effect, with gains that vary between training seeds, the two-way test rejects at about its
    5% level; averaging the seeds per clip and testing over clips (treating the trained models as fixed)
    rejects far more often. Without seed variance it is the paired test over clips."""
    rng = np.random.default_rng(1)
    rej = naive = 0
    for _ in range(1000):
        d = rng.normal(0, 0.05, (32, 1)) + rng.normal(0, 0.04, (1, 3)) + rng.normal(0, 0.03, (32, 3))
        rej += two_way_mean(d)["p"] < 0.05
        naive += paired(d.mean(1)[:, None], np.zeros((32, 1)))["p"] < 0.05
    assert rej / 1000 < 0.09 and naive / 1000 > 0.3, (rej, naive)
    same = np.repeat(rng.normal(0.1, 0.05, (32, 1)), 3, axis=1)  # every seed alike: MS_seed = MS_resid = 0
    two, one = two_way_mean(same), interval(same[:, 0])
    assert two["ci95"] == pytest.approx(one["ci95"], abs=1e-5) and two["df"] == 31 and two["sd_seed"] == 0.0
    assert two_way_mean(same[:, :1])["p"] == pytest.approx(paired(same[:, :1], np.zeros((32, 1)))["p"])


@pytest.mark.parametrize("case", ["other evaluation", "same seed", "no tf", "missing npz", "bad metric", "not a folder",
                                  "other steps", "other overrides", "other metrics version", "other clip count",
                                  "routed evaluation", "no sliding evaluation", "other sliding window",
                                  "unknown protocol", "no such reference", "unknown arm", "reference in arms",
                                  "arm twice"])
def test_bad_folders_are_one_line_exit_2(tmp_path, capsys, case):
    ones = np.ones((4, 3))
    a = _folder(tmp_path, 0, {"tf": ones, "x": ones})
    args = [str(a)]
    other = {
        "other evaluation": dict(eval_settings={**EVAL, "clips": 8}),
        "other steps": dict(steps=200),
        "other overrides": dict(overrides={"x": ["stage of x", "diffusion.resample_shift=12.4"]}),
        "other metrics version": dict(key={**KEY, "metrics": 1}),
        "routed evaluation": dict(key={**KEY, "routing": ["topk", 1, 0, 0]}),
    }
    if case in other:
        args.append(str(_folder(tmp_path, 1, {"tf": ones, "x": ones}, **other[case])))
    elif case == "no sliding evaluation":
        args += [str(_folder(tmp_path, 1, {"tf": ones, "x": ones}, sliding={"tf": ones, "x": ones})), "--protocol", "sliding"]
    elif case == "other sliding window":
        b = _folder(tmp_path / "d", 0, {"tf": ones, "x": ones}, sliding={"tf": ones, "x": ones})
        args = [str(b), str(_folder(tmp_path / "d", 1, {"tf": ones, "x": ones}, sliding={"tf": ones, "x": ones},
                                    sliding_routing=["window", None, 0, 3])), "--protocol", "sliding"]
    elif case == "no such reference":
        args += ["--reference", "parallel_1step"]
    elif case == "unknown arm":
        args += ["--arms", "x,ar_9"]
    elif case == "arm twice":
        args += ["--arms", "x,x"]
    elif case == "reference in arms":
        args += ["--arms", "x,tf"]
    elif case == "unknown protocol":
        args += ["--protocol", "window5"]
    elif case == "other clip count":
        args.append(str(_folder(tmp_path, 1, {"tf": ones, "x": np.ones((6, 3))})))
    elif case == "same seed":
        args.append(str(_folder(tmp_path / "b", 0, {"tf": ones, "x": ones})))
    elif case == "no tf":
        args = [str(_folder(tmp_path / "c", 3, {"x": ones}))]
    elif case == "missing npz":
        (a / "eval" / "x.npz").unlink()
    elif case == "bad metric":
        args += ["--metrics", "fidelity"]
    elif case == "not a folder":
        args.append(str(tmp_path / "nowhere"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablation_seeds: error:"), err


@pytest.mark.parametrize("text, why", [("{", "JSONDecodeError"), ('{"a": 1}', "no train_seed, eval, arms"),
                                       ("[1]", "a JSON list, not an object"),
                                       ('{"train_seed": 1, "eval": {"clips": 4}, "arms": [1]}', "arms is not an object"),
                                       (b"\xff\xfe", "UnicodeDecodeError")])
def test_damaged_or_foreign_report_is_one_line_exit_2(tmp_path, capsys, text, why):
    """A report.json that is no ablation report (broken JSON, another shape) crashed with a traceback."""
    ones = np.ones((4, 3))
    a = _folder(tmp_path, 0, {"tf": ones, "x": ones})
    b = _folder(tmp_path, 1, {"tf": ones, "x": ones})
    (b / "report.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "pooled.json"
    assert main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"ablation_seeds: error: {b / 'report.json'}: not a readable ablation report ("), err
    assert why in err[0] and err[0].endswith("; rerun its ablation command"), err
    assert not out.exists()


def test_damaged_evaluation_cache_is_one_line_exit_2(tmp_path, capsys):
    ones = np.ones((4, 3))
    a = _folder(tmp_path, 0, {"tf": ones, "x": ones})
    (a / "eval" / "x.npz").write_bytes((a / "eval" / "x.npz").read_bytes()[:100])
    assert main([str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.npz: unreadable evaluation" in err[0] and "rerun its ablation command" in err[0], err


def test_the_warmup_is_compared_as_a_file(tmp_path, monkeypatch):
    """A replicate run with --warmup given as an absolute path records that path; the one run without the
    flag recorded the preset's relative one: the same file pools, another warmup is refused."""
    monkeypatch.chdir(tmp_path)
    fid = np.full((4, 3), 0.5)
    a = _folder(tmp_path, 0, {"tf": fid, "x": fid})
    b = _folder(tmp_path, 1, {"tf": fid, "x": fid})
    for folder, warmup in ((a, "assets/w"), (b, str(tmp_path / "assets" / "w"))):
        report = json.loads((folder / "report.json").read_text())
        (folder / "report.json").write_text(json.dumps({**report, "warmup": warmup}))
    assert list(pool([a, b], ["object_fidelity"])["arms"]) == ["x"]
    report = json.loads((b / "report.json").read_text())
    (b / "report.json").write_text(json.dumps({**report, "warmup": str(tmp_path / "other")}))
    with pytest.raises(Exception, match="differs from .* in warmup"):
        pool([a, b], ["object_fidelity"])
    # a copy of the same warmup (a run from another checkout) pools; a copy of other weights does not
    for d, data in ((tmp_path / "assets" / "w", b"weights"), (tmp_path / "other", b"weights")):
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(data)
    assert list(pool([a, b], ["object_fidelity"])["arms"]) == ["x"]
    (tmp_path / "other" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(Exception, match="differs from .* in warmup"):
        pool([a, b], ["object_fidelity"])


def test_reference_from_other_folders_pairs_seed_by_seed(tmp_path, capsys):
    """--reference-folders: the same arm of another training variant (e.g. LoRA vs full fine-tuning), one
    folder per seed in the same order; a folder of another seed is refused in one line."""
    rng = np.random.default_rng(4)
    full = [{a: rng.uniform(0.3, 0.6, (4, 3)) for a in ("tf", "ar")} for _ in range(2)]
    lora = [{a: rng.uniform(0.3, 0.6, (4, 3)) for a in ("tf", "ar")} for _ in range(2)]
    fa = [_folder(tmp_path / "full", s, full[s]) for s in range(2)]
    la = [_folder(tmp_path / "lora", s, lora[s]) for s in range(2)]
    r = pool(la, ["object_fidelity"], reference="ar", arms=["ar", "tf"], reference_folders=fa)
    for arm in ("ar", "tf"):
        d = np.stack([extrapolation_mean(lora[s][arm]) - extrapolation_mean(full[s]["ar"]) for s in range(2)], 1)
        assert r["arms"][arm]["object_fidelity"]["pooled"]["mean"] == pytest.approx(d.mean(), abs=1e-5)
    assert r["reference_folders"] == [str(f) for f in fa]
    assert main([str(f) for f in la] + ["--metrics", "object_fidelity", "--reference", "ar", "--arms", "ar",
                                        "--reference-folders", ",".join(map(str, fa))]) == 0
    assert "ar of the reference folders" in capsys.readouterr().out
    assert main([str(f) for f in la] + ["--reference", "ar", "--reference-folders", ",".join(map(str, fa[::-1]))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ablation_seeds: error: ") and "differs from" in err and "train_seed" in err and "\n" not in err
    # a longer schedule is a training variant too (ablation --steps 600 against 300): compared, not refused
    longer = [_folder(tmp_path / "long", s, lora[s], steps=600) for s in range(2)]
    assert pool(longer, ["object_fidelity"], reference="ar", arms=["ar"], reference_folders=fa)["arms"]["ar"]
    with pytest.raises(Exception, match="differs from .* in steps_per_arm"):  # but not pooled as replicates
        pool([la[0], longer[1]], ["object_fidelity"])


def test_folders_trained_with_other_overrides_are_not_replicates(tmp_path, capsys):
    """An ablation run with --set train.lora.rank=4 is another experiment, not a seed replicate of one
    without it (a report written before the list was recorded counts as none)."""
    rng = np.random.default_rng(5)
    a, b = (_folder(tmp_path, s, {a: rng.uniform(0.3, 0.6, (4, 3)) for a in ("tf", "ar")}) for s in range(2))
    report = json.loads((b / "report.json").read_text())
    (b / "report.json").write_text(json.dumps({**report, "overrides": []}))
    assert pool([a, b], ["object_fidelity"])["seeds"] == [0, 1]  # none recorded == an empty list
    (b / "report.json").write_text(json.dumps({**report, "overrides": ["train.lora.rank=4"]}))
    assert main([str(a), str(b), "--metrics", "object_fidelity"]) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "overrides" in err
