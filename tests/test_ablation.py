"""The ablation runner (resampling_forcing.ablation) end to end on a very small world, and its
evaluation helpers on known answers."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from resampling_forcing.ablation import PRESETS, main
from resampling_forcing.ablation_report import table, with_holm
from resampling_forcing.ablation_eval import (eval_clips, extrapolation_mean, metric_arrays, paired, sanity_check,
                                              score)
from resampling_forcing.config import load_config
from resampling_forcing.data.synthetic import combo_key, parse_caption
from resampling_forcing.data.synthetic_dataset import held_out_combos
from train_helpers import REPO

SMALL = {  # configs/ablation_cpu.yaml shrunk: 16x16, 4 chunks per clip, ~50K parameters
    "data.synthetic_videos": 24, "data.num_frames": 8, "data.height": 16, "data.width": 16,
    "model.dim": 32, "model.ffn_dim": 64, "model.num_heads": 2, "model.num_layers": 2, "model.freq_dim": 32,
    "train.batch_size": 2, "train.progress": False, "diffusion.sample_steps": 2,
    "train.stages": "[{name: tf, steps: 3}]",
}


def _cli(tmp_path, *extra):
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    return ["--preset", "cpu", "--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "docs"),
            "--train-warmup", "--arms", "tf,ar_rec,ar_1step,ramp", "--steps", "6", "--eval-clips", "3", "--gap-clips", "2", "--val-clips", "2",
            "--set", f"data.synthetic_dir={tmp_path / 'syn'}", *sets, *extra]


@pytest.mark.slow
def test_runner_smoke_resumes_and_reports(tmp_path, one_thread, capsys):
    assert main(_cli(tmp_path)) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"warmup", "tf", "ar_rec", "ar_1step", "ramp"}
    cal = report["calibration"]
    assert cal["target"] > 0 and cal["recommended_shift"] > 0 and cal["noise_sigma"] == pytest.approx(cal["target"] ** 0.5)
    assert cal["one_step_target"] > 0 and cal["one_step_shift"] > 0
    shifts = {n: a["overrides"][1] for n, a in report["arms"].items() if n != "warmup"}
    assert shifts["ar_1step"] == f"diffusion.resample_shift={round(cal['one_step_shift'], 4)}"
    assert shifts["ar_rec"] == shifts["ramp"] == f"diffusion.resample_shift={round(cal['recommended_shift'], 4)}"
    for name in ("tf", "ar_rec", "ramp"):
        arm = report["arms"][name]
        assert len(arm["summary"]["psnr"]) == 8  # 8 segments of the training clip length
        assert all(s["n"] == 3 and s["mean"] is not None for s in arm["summary"]["psnr"])
        assert arm["gap"]["rollout_mean"] > 0
    assert report["arms"]["tf"]["gap"]["degradation_mean"] == 0.0  # teacher forcing degrades nothing
    assert report["arms"]["ar_rec"]["gap"]["degradation_mean"] > 0
    assert set(report["arms"]["ar_rec"]["vs_tf"]) >= {"psnr", "object_fidelity", "collapse"}
    # tuning never sees the reporting clips: calibration and gaps on the calibration set, the best arm
    # chosen on the validation set (and by its numbers there), the tables on the eval set
    assert "held-out set calibration" in json.loads((out / "calibration" / "diagnose_warmup.json").read_text())["data"]
    assert "held-out set calibration" in json.loads((out / "calibration" / "gap_ramp.json").read_text())["data"]
    val = {n: report["arms"][n]["validation"] for n in ("ar_rec", "ar_1step", "ramp")}
    assert all(v["object_fidelity"]["n"] == 2 for v in val.values()) and "validation" not in report["arms"]["tf"]
    assert report["best_arm"] == max(val, key=lambda n: (val[n]["object_fidelity"]["mean"], val[n]["psnr"]["mean"]))
    assert (out / "eval" / "validation_ramp.npz").is_file() and not (out / "sheets" / "validation_ramp.png").exists()
    seeds = report["eval"]["clip_sets"]["seeds"]
    assert all(10_000_000 <= x < 11_000_000 for x in seeds["eval"]) and len(seeds["eval"]) == 3
    assert seeds["calibration"] == [11_000_000, 11_000_001]
    assert len(seeds["validation"]) == 2 and all(12_000_000 <= x < 13_000_000 for x in seeds["validation"])
    assert "vs_tf" not in report["arms"]["warmup"]  # the Holm family is the arms
    assert all(set(e["vs_tf"]["psnr"]) >= {"p", "p_holm"} for n, e in report["arms"].items() if n not in ("tf", "warmup"))
    assert list(report["routing"]) == ["dense", "top-1", "top-5", "window 1", "sink 1 + window 4"]
    # the sliding protocol (default --protocols dense,sliding): every arm and the warmup again, through a
    # window of the training clip's history (4 chunks per SMALL clip -> 3), compared with tf under it
    sl = report["protocols"]["sliding"]
    assert sl["routing"] == ["window", None, 0, 3] and set(sl["arms"]) == set(report["arms"])
    assert "vs_tf" not in sl["arms"]["warmup"] and "vs_tf" not in sl["arms"]["tf"]
    assert all(set(sl["arms"][n]["vs_tf"]["object_fidelity"]) >= {"p", "p_holm"} for n in ("ar_rec", "ar_1step", "ramp"))
    assert sl["arms"]["tf"]["summary"] != report["arms"]["tf"]["summary"]  # the window was applied
    with np.load(out / "eval" / "tf_sliding.npz") as z:
        assert json.loads(str(z["key"]))["routing"] == ["window", None, 0, 3]
    assert (out / "plots" / "sliding_object_fidelity.png").is_file() and (out / "sheets" / "ramp_sliding.png").is_file()
    assert "| arm, sliding - tf (paired) |" in table(report)
    # equal budgets: same steps and the same learning rate at every step in every arm
    logs = {n: [json.loads(l) for l in (out / "arms" / n / "log.jsonl").read_text().splitlines()]
            for n in ("tf", "ar_rec", "ramp")}
    assert {n: [r["step"] for r in log] for n, log in logs.items()} == {n: [1, 2, 3, 4, 5, 6] for n in logs}
    assert [r["lr"] for r in logs["tf"]] == [r["lr"] for r in logs["ar_rec"]] == [r["lr"] for r in logs["ramp"]]
    assert [r.get("ramp") for r in logs["ramp"]] == [0.5] + [1.0] * 5  # ramp over the first steps // 3 = 2 steps
    for m in ("psnr", "object_fidelity", "collapse"):
        assert (out / "plots" / f"{m}.png").is_file() and (tmp_path / "docs" / "cpu_plots" / f"{m}.png").is_file()
    assert (tmp_path / "docs" / "cpu.json").is_file() and (out / "sheets" / "tf.png").is_file()
    # a rerun reuses every finished stage and reports the same numbers
    capsys.readouterr()
    assert main(_cli(tmp_path)) == 0
    assert "arm 1/4" not in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert again["arms"] == report["arms"] and again["routing"] == report["routing"]
    assert again["protocols"] == report["protocols"]
    assert len(report["invocations"]) == 1 and [i["command"] for i in again["invocations"]] == [report["command"]] * 2
    assert all(i["wall_seconds"] > 0 for i in again["invocations"])
    # without tf: every arm is a candidate, and the validation numbers that chose the best arm are reported
    capsys.readouterr()
    no_tf = _cli(tmp_path)
    no_tf[no_tf.index("--arms") + 1] = "ar_rec,ar_1step"
    assert main(no_tf) == 0 and "arm 1/2" not in capsys.readouterr().out
    r2 = json.loads((out / "report.json").read_text())
    val = {n: r2["arms"][n]["validation"] for n in ("ar_rec", "ar_1step")}
    assert r2["best_arm"] == max(val, key=lambda n: (val[n]["object_fidelity"]["mean"], val[n]["psnr"]["mean"]))
    assert all("vs_tf" not in a for a in r2["arms"].values()) and "arm - tf" not in table(r2)
    # --no-routing: no arm is chosen, nothing routed, and the report and its table still stand
    assert main(_cli(tmp_path, "--no-routing")) == 0
    r3 = json.loads((out / "report.json").read_text())
    assert r3["best_arm"] is None and r3["routing_arm"] is None and r3["routing"] == {}
    assert r3["eval"]["clip_sets"]["seeds"]["validation"] == [] and "| ar_rec |" in table(r3)
    # a finished arm trained with other settings is not reused: another seed (or --steps) in the same --out
    # is refused in one line before any training (it reused the seed-0 arms and reported train_seed 1)
    for extra in (("--seed", "1"), ("--steps", "5")):
        capsys.readouterr()
        assert main(_cli(tmp_path, *extra)) == 2
        cap = capsys.readouterr()
        assert "arm 1/4" not in cap.out and "was trained with other settings" in cap.err, cap.err
        assert len(cap.err.strip().splitlines()) == 1


def test_arms_at_any_strength():
    """ar_S / parallel_S / ramp_S train that form at s = S (a dose-response sweep); the named arms keep theirs."""
    import json as _json
    from pathlib import Path

    from resampling_forcing.ablation_arms import arm_overrides, describe_arm
    from resampling_forcing.cli import BadInput

    calib = {"recommended_shift": 12.4, "noise_sigma": 0.37, "one_step_shift": 2.1}

    def stage_and_shift(name):
        o = arm_overrides(name, calib, PRESETS["cpu"], 30, Path("w"), Path("r"))
        return _json.loads(o[2].split("=", 1)[1])[0], o[3]

    st, sh = stage_and_shift("ar_1.2")
    assert (st["objective"], st["name"], sh) == ("resampling", "ar_1_2", "diffusion.resample_shift=1.2") and "ramp" not in st
    st, sh = stage_and_shift("parallel_0.25")
    assert (st["objective"], sh) == ("parallel_resampling", "diffusion.resample_shift=0.25")
    st, sh = stage_and_shift("ramp_3")
    assert (st["objective"], st["ramp"], st["ramp_steps"], sh) == ("resampling", "probability", 10, "diffusion.resample_shift=3.0")
    assert stage_and_shift("ar_0.6")[1] == "diffusion.resample_shift=0.6"
    assert "s = 123.4567" in describe_arm("ar_123.4567") and "s = 1000" in describe_arm("ramp_1000")
    for alias, canonical in (("ar_0.60", "ar_0.6"), ("ramp_3.0", "ramp_3"), ("parallel_01", "parallel_1"),
                             ("ar_123.45670", "ar_123.4567"), ("ar_1000.0", "ar_1000")):
        with pytest.raises(BadInput, match=f"write this arm as {canonical}"):  # one spelling per arm
            describe_arm(alias)
    assert stage_and_shift("ar_rec")[1] == "diffusion.resample_shift=12.4" and "s = 1.2" in describe_arm("ar_1.2")
    st, sh = stage_and_shift("parallel_1step")  # the AR-vs-parallel pair at ar_1step's strength
    assert (st["objective"], sh) == ("parallel_resampling", "diffusion.resample_shift=2.1") == (
        "parallel_resampling", stage_and_shift("ar_1step")[1])
    st, sh = stage_and_shift("ramp_1step")  # the gradual switch at the same strength
    assert (st["ramp"], st["ramp_steps"], sh) == ("probability", 10, stage_and_shift("ar_1step")[1])
    from resampling_forcing.ablation_arms import ARMS, _NAMED_FORMS

    assert set(ARMS) - {"tf", "noise_aug"} == set(_NAMED_FORMS)  # every named form arm has its strength
    # --resample-steps: the resampling forms' stage only; 1 (the paper's) is left unsaid, as before
    for name, want in (("ar_1step", 4), ("parallel_1step", 4), ("ramp_3", 4), ("tf", None), ("noise_aug", None)):
        o = arm_overrides(name, calib, PRESETS["cpu"], 30, Path("w"), Path("r"), resample_steps=4)
        assert _json.loads(o[2].split("=", 1)[1])[0].get("resample_steps") == want, name
        assert "resample_steps" not in stage_and_shift(name)[0]
    # --resample-cfg likewise: guidance of the resampling rollout, left unsaid at the default (no guidance)
    for name, want in (("ar_1step", 2.0), ("parallel_1step", 2.0), ("tf", None), ("noise_aug", None)):
        o = arm_overrides(name, calib, PRESETS["cpu"], 30, Path("w"), Path("r"), resample_cfg=2.0)
        assert _json.loads(o[2].split("=", 1)[1])[0].get("resample_cfg") == want, name
        assert "resample_cfg" not in stage_and_shift(name)[0]


@pytest.mark.parametrize("arms,msg", [("tf,ar_0", "the strength must be in"), ("ar_x", "unknown arm 'ar_x'"),
                                      ("tf,ar_1.2,ar_1.2", "names an arm twice"),
                                      ("tf --resample-steps 0", "--resample-steps must be >= 1"),
                                      ("tf --resample-cfg -1", "--resample-cfg must be in [0, 100]"),
                                      ("", "names no arm"), (" , ", "names no arm")])  # an unset shell variable
def test_bad_arm_names_are_one_line_exit_2(capsys, arms, msg):
    assert main(["--arms", *(arms.split() if arms.strip() else [arms])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_holm_family_is_the_entries_compared():
    """with_holm adjusts one metric's p over the entries that carry the comparison (the warmup has none),
    on the unrounded p, then rounds both to 3 significant figures."""
    from resampling_forcing.ablation_eval import METRICS

    def entry(p):
        return {"vs_tf": {m: {"mean": 0.1, "ci95": 0.05, "n": 32, "p": p} for m in METRICS}}

    got = with_holm({"warmup": {"summary": {}}, "a": entry(0.0071234), "b": entry(0.04), "c": entry(None)}, "vs_tf")
    assert "vs_tf" not in got["warmup"] and got["c"]["vs_tf"]["psnr"]["p_holm"] is None
    assert got["a"]["vs_tf"]["psnr"]["p_holm"] == 0.0142 and got["a"]["vs_tf"]["psnr"]["p"] == 0.00712
    assert got["b"]["vs_tf"]["object_fidelity"]["p_holm"] == 0.04


@pytest.mark.parametrize("protocols,msg", [("dense,window5", "choose from dense, sliding"),
                                           ("sliding", "dense is required"), ("dense,sliding,dense", "twice")])
def test_bad_protocols_are_one_line_exit_2(capsys, protocols, msg):
    assert main(["--arms", "tf", "--protocols", protocols]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_sliding_protocol_reads_the_training_clip_history():
    """The sliding window of the CPU preset is its training clip's history: 12 frames = 6 chunks -> 5."""
    from resampling_forcing.ablation_report import parse_protocols, protocol_routing

    cfg = load_config(REPO / PRESETS["cpu"].config)
    assert protocol_routing("sliding", cfg) == ("window", None, 0, 5) and protocol_routing("dense", cfg) is None
    assert parse_protocols("sliding, dense") == ["dense", "sliding"]


def test_bad_arm_is_one_line_exit_2(capsys):
    assert main(["--arms", "tf,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown arm 'bogus'" in err[0]


def test_eval_clips_are_held_out_and_trained_combinations():
    data = load_config(REPO / PRESETS["cpu"].config).data
    clips = eval_clips(data, 6, 24)
    held = set(held_out_combos(max_objects=data.synthetic_max_objects, seed=0))
    assert len(clips) == 6 and all(v.shape == (24, data.height, data.width, 3) for v, _ in clips)
    assert all(combo_key(parse_caption(m["caption"])) not in held for _, m in clips)
    assert all(m["seed"] >= 10_000_000 for _, m in clips)


def test_held_out_sets_are_disjoint_and_diagnose_reads_the_one_asked():
    """Calibration, validation and eval clips never share a generator seed (what tunes the ablation must
    not see what reports it), and diagnose --held-out draws the set it names."""
    from resampling_forcing.data.synthetic import HELD_OUT_SEED_BASES
    from resampling_forcing.diagnose import build_parser, load_clips

    data = load_config(REPO / PRESETS["cpu"].config).data
    sets = {s: eval_clips(data, 40, 12, split=s) for s in HELD_OUT_SEED_BASES}
    seeds = {s: {m["seed"] for _, m in c} for s, c in sets.items()}
    assert all(len(v) == 40 for v in seeds.values())
    assert not (seeds["eval"] & seeds["calibration"]) and not (seeds["eval"] & seeds["validation"])
    assert not (seeds["calibration"] & seeds["validation"])
    assert min(seeds["calibration"]) == HELD_OUT_SEED_BASES["calibration"]
    with pytest.raises(ValueError, match="choose one of"):
        eval_clips(data, 1, 12, split="test")

    class Pipe:  # what load_clips reads of a pipeline: the data config and the VAE encoding
        config = load_config(REPO / PRESETS["cpu"].config)
        device = "cpu"

        @staticmethod
        def load_init_video(video):
            return torch.as_tensor(np.ascontiguousarray(video)).float()[None], None

    _, cal = load_clips(Pipe, None, 3, "calibration")
    _, ev = load_clips(Pipe, None, 3)
    from resampling_forcing.data.synthetic import generate_clip

    want = [generate_clip(HELD_OUT_SEED_BASES["calibration"] + i, frames=12, size=(32, 32), max_objects=3)[1]["caption"]
            for i in range(3)]
    assert cal == want and cal != ev
    assert build_parser().parse_args(["--checkpoint", "x"]).held_out is None  # = eval, and refused with --data


def test_metrics_separate_good_from_bad_continuations():
    data = load_config(REPO / PRESETS["cpu"].config).data
    clips = eval_clips(data, 6, 36)
    s = sanity_check(clips, given_frames=2, segment_frames=12)
    truth, frozen, other = s["truth"], s["frozen"], s["other scene"]
    assert truth["psnr"]["mean"] > s["truth + noise 0.1"]["psnr"]["mean"] > frozen["psnr"]["mean"]
    assert truth["center_error"]["mean"] < 0.5 < frozen["center_error"]["mean"]
    assert truth["object_fidelity"]["mean"] > 0.9 and truth["collapse"]["mean"] == 0.0
    assert frozen["motion_score"]["mean"] < 0.2 < truth["motion_score"]["mean"]
    assert other["color_acc"]["mean"] < truth["color_acc"]["mean"]


def test_paired_difference_and_collapse_rule():
    data = load_config(REPO / PRESETS["cpu"].config).data
    clips = eval_clips(data, 3, 24)
    truth = np.stack([v for v, _ in clips])
    blank = np.zeros_like(truth) + truth[:, :1, :1, :1]  # background only: every object lost
    a, b = metric_arrays(score(truth, clips, 12)), metric_arrays(score(blank, clips, 12))
    assert (a["collapse"] == 0).all() and (b["collapse"] == 1).all()
    d = paired(a["collapse"], b["collapse"])
    assert d["mean"] == -1.0 and d["ci95"] == 0.0 and d["n"] == 3
    assert extrapolation_mean(np.array([[5.0, 1.0, np.nan, 3.0]])).tolist() == [2.0]


def test_paired_p_values_and_holm_on_known_answers():
    """Two-sided t p-values against the closed forms for 1 and 2 degrees of freedom and the tabulated
    97.5% point; Holm's step-down on a hand-worked family; paired() gives the t test of the differences."""
    import math

    from resampling_forcing.stats import holm, t975, t_two_sided_p

    for t in (0.0, 0.3, 1.0, 2.5, 10.0, -4.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-12)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-12)
    # the quantile at a real (Satterthwaite) df lies between its integer neighbours; the normal's at large df
    assert t975(3) < t975(2.5) < t975(2) and t975(1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_two_sided_p(3.0, 31) == pytest.approx(0.0052887, abs=1e-6)  # the density integrated numerically
    # sorted 0.01, 0.03, 0.04 of m = 3: 0.03, then max(0.03, 0.06), then max(0.06, 0.04); None stays None
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06, "d": None})
    assert holm({"a": 0.6, "b": 0.2}) == {"b": 0.4, "a": 0.6}
    a = np.array([[0.0, 0.5, 0.7], [0.0, 0.2, 0.4], [0.0, 0.9, 0.5], [0.0, 0.3, 0.3]])
    b = np.zeros_like(a)
    d = extrapolation_mean(a)  # 0.6, 0.3, 0.7, 0.3
    t = d.mean() / (d.std(ddof=1) / 2.0)
    assert paired(a, b)["p"] == pytest.approx(t_two_sided_p(t, 3), abs=1e-6) and paired(a, b)["p"] < 0.05
    # no spread: decided (0 for a constant nonzero difference, 1 for none), whatever the float rounding
    assert paired(b, b)["p"] == 1.0 and paired(np.full((4, 8), 1 / 7), b)["p"] == 0.0
    assert paired(np.full((4, 8), 0.1), b)["p"] == 0.0 and paired(a[:1], b[:1])["p"] is None


def test_intervals_use_students_t():
    """95% intervals over n clips use t(n - 1), not 1.96 (4% too narrow at the ablation's 32 clips)."""
    from resampling_forcing.stats import interval, t975

    for df, want in ((1, 12.7062), (2, 4.30265), (3, 3.18245), (5, 2.57058), (10, 2.22814), (31, 2.03951)):
        assert t975(df) == pytest.approx(want, abs=1e-5), df  # tabulated to 6 figures
    v = np.array([1.0, 2.0, 4.0, 7.0, np.nan])
    assert interval(v)["ci95"] == pytest.approx(t975(3) * v[:4].std(ddof=1) / 2.0, abs=1e-5)
    assert interval(v)["n"] == 4 and interval(np.array([3.0]))["ci95"] == 0.0


def test_an_interrupted_arm_stops_the_runner(tmp_path, monkeypatch, capsys):
    """A signal that stops an arm's training (its checkpoint saved) stops the runner with one line and
    exit 130; it must not go on to the next arm or evaluate a half-trained one."""
    import resampling_forcing.training as training

    calls = []

    def fake_train(cfg, accelerator=None):
        calls.append(cfg.train.run_dir)
        return {"status": "interrupted", "step": 1, "checkpoint": None, "signal": "SIGTERM"}

    monkeypatch.setattr(training, "train", fake_train)
    assert main(_cli(tmp_path)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1 and calls[0].endswith("warmup")
    assert len(err) == 1 and "stopped at step 1 by SIGTERM" in err[0] and "resume" in err[0]


@pytest.mark.parametrize("name", ["warmup", "tf", "ar_0.6"])
def test_shipped_ablation_checkpoints_load_and_sample(name, one_thread):
    """assets/ablation/{warmup, tf, ar_0.6}: the shared warmup and the final teacher-forcing and best
    resampling arms (docs/results.md#ablation) load with Pipeline.from_pretrained and roll out."""
    from resampling_forcing.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(REPO / "assets" / "ablation" / name, device="cpu")
    res = pipe.generate("a red circle", 2, steps=2, seed=0)
    assert tuple(res.video.shape) == (1, 4, 32, 32, 3) and res.video.dtype == torch.uint8


# ----------------------------------------------------------------------------- the memory probe


def test_memory_probe_metrics_separate_return_from_loss():
    from resampling_forcing.ablation_memory import after, memory_sanity, probe_clips

    data = load_config(REPO / "configs/ablation_memory.yaml").data
    clips = probe_clips(data, 6, visible=8, blackout=4, after_frames=6)
    video, meta = clips[0]
    assert video.shape[0] == 18 and meta["blackout"] == [8, 4]
    assert (video[8:12] == video[8, 0, 0]).all() and video[7].std() > 0  # dark frames are background only
    tail = after(clips, 12)
    assert tail[0][0].shape[0] == 6 and tail[0][1]["frames"][0] == meta["frames"][12]
    s = memory_sanity(clips, 12, 6)
    truth, gone, other = s["truth"], s["objects never return"], s["other clip"]
    assert truth["object_fidelity"]["mean"] > 0.9 and truth["collapse"]["mean"] == 0.0
    assert gone["object_fidelity"]["mean"] < 0.1 and gone["collapse"]["mean"] == 1.0
    assert other["color_acc"]["mean"] < truth["color_acc"]["mean"]


@pytest.mark.slow
def test_memory_probe_smoke_resumes_and_reports(tmp_path, one_thread, monkeypatch, capsys):
    from resampling_forcing import ablation_memory as am
    from resampling_forcing.training import train

    small = {**SMALL, "data.synthetic_dir": tmp_path / "syn", "data.synthetic_blackout_frames": "[2, 2]",
             "data.synthetic_blackout_prob": 1.0}
    sets = [f"{k}={v}" for k, v in small.items()]
    init = tmp_path / "init"
    from accelerate.state import AcceleratorState, GradientState, PartialState

    train(load_config(REPO / am.CONFIG, sets + [f"train.run_dir={init}", "train.init_from=null"]))
    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    monkeypatch.setattr(am, "MODES", {k: am.MODES[k] for k in ("dense", "top-1", "window 1")})
    monkeypatch.setattr(am, "VISIBLE", 6), monkeypatch.setattr(am, "BLACKOUT", 4), monkeypatch.setattr(am, "AFTER", 4)
    argv = ["--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "docs"), "--clips", "3", "--steps", "2",
            *[a for kv in sets for a in ("--set", kv)], "--set", f"train.init_from={init}"]
    assert am.main(argv) == 0
    report = json.loads((tmp_path / "docs" / "memory.json").read_text())
    assert report["steps"] == 2 and report["probe"]["given_chunks"] == 5
    for cond in am.CONDITIONINGS:
        modes = report["modes"][cond]
        assert list(modes) == ["dense", "top-1", "window 1"]
        assert modes["dense"]["picks_before_blackout"] is None
        assert modes["window 1"]["picks_before_blackout"] == 0.0  # it only sees the last (dark) chunk
        assert 0.0 <= modes["top-1"]["picks_before_blackout"] <= 1.0
        assert all(modes[m]["after"]["psnr"]["n"] == 3 for m in modes)
        assert modes["dense"]["vs_dense"]["psnr"]["mean"] == 0.0
    assert (tmp_path / "docs" / "memory_sheets" / "memory_none.png").is_file()
    log = (tmp_path / "out" / "train" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in log] == [1, 2]
    capsys.readouterr()
    assert am.main(argv) == 0  # a rerun reuses everything
    assert "[memory] training" not in capsys.readouterr().out
    assert json.loads((tmp_path / "docs" / "memory.json").read_text())["modes"] == report["modes"]


def test_memory_probe_bad_init_is_one_line_exit_2(capsys):
    from resampling_forcing.ablation_memory import main as memory_main

    assert memory_main(["--set", "train.init_from=no/such/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ablation_memory: error: train.init_from") and "\n" not in err


def test_seed_replicate_changes_training_randomness_not_the_data_set():
    from resampling_forcing.ablation_arms import seed_overrides
    from resampling_forcing.config import synthetic_seed

    base = load_config(REPO / PRESETS["cpu"].config)
    assert seed_overrides(None, base) == []
    arm = load_config(REPO / PRESETS["cpu"].config, seed_overrides(5, base))
    assert arm.train.seed == 5 and synthetic_seed(arm) == synthetic_seed(base) == base.train.seed
    assert synthetic_seed(load_config(REPO / PRESETS["cpu"].config, ["train.seed=3"])) == 3  # default: train.seed


def test_eval_cache_is_keyed_by_the_weights_and_settings(tmp_path):
    """OUT/eval/*.npz is reused only for the same checkpoint weights and settings (it was keyed by the arm
    name alone: a rerun with more steps or another seed reported the old evaluation)."""
    import os

    from resampling_forcing.ablation_eval import cache_key, cached

    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights v1")
    path = tmp_path / "eval" / "arm.npz"
    path.parent.mkdir()
    key = cache_key(ck, clips=32, seed=0)
    assert not cached(path, key)
    np.savez(path, seconds=1.0, key=key, psnr=np.ones(3))
    assert cached(path, key)
    assert not cached(path, cache_key(ck, clips=16, seed=0)) and not cached(path, cache_key(ck, clips=32, seed=1))
    st = (ck / "model.safetensors").stat()
    os.utime(ck / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained weights
    assert not cached(path, cache_key(ck, clips=32, seed=0))
    np.savez(path, seconds=1.0, psnr=np.ones(3))  # a cache from before keys existed
    assert not cached(path, key)


def _damaged_warmup(tmp_path, how: str):
    """assets/ablation/warmup with its weights truncated, or an empty folder."""
    import shutil

    ck = tmp_path / how
    if how == "empty":
        ck.mkdir()
    else:
        shutil.copytree(REPO / "assets" / "ablation" / "warmup", ck)
        (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:2_000_000])
    return ck


def _no_training(monkeypatch):
    import resampling_forcing.training as training

    def fail(cfg, **kw):
        raise AssertionError(f"trained {cfg.train.run_dir} (rendering its data set) before refusing the input")

    monkeypatch.setattr(training, "train", fail)


@pytest.mark.parametrize("how, msg", [("trunc", "model.safetensors is truncated"),
                                      ("empty", "neither model_config.json nor config.json")])
def test_damaged_warmup_is_refused_before_the_work_folder(tmp_path, monkeypatch, capsys, how, msg):
    """A damaged --warmup failed in the calibration (a traceback: "diagnose ... failed") and left its
    empty work folder; now one line, exit 2, nothing created."""
    _no_training(monkeypatch)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--warmup", str(_damaged_warmup(tmp_path, how))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablation: error: --warmup ") and msg in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("how, msg", [("trunc", "model.safetensors is truncated"),
                                      ("empty", "neither model_config.json nor config.json")])
def test_memory_probe_damaged_init_is_refused_before_rendering(tmp_path, monkeypatch, capsys, how, msg):
    """A damaged train.init_from was refused by the trainer only after the occlusion data set was rendered
    (minutes), leaving the work folder; now one line, exit 2, before anything is created."""
    from resampling_forcing.ablation_memory import main as memory_main

    _no_training(monkeypatch)
    out, syn = tmp_path / "out", tmp_path / "syn"
    assert memory_main(["--out", str(out), "--set", f"train.init_from={_damaged_warmup(tmp_path, how)}",
                        "--set", f"data.synthetic_dir={syn}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablation_memory: error: train.init_from=") and msg in err[0], err
    assert "--set train.init_from=" in err[0]
    assert not out.exists() and not syn.exists()


def test_set_of_a_schedule_key_reaches_every_arm_and_arm_keys_are_refused(capsys):
    """--set train.lr=... (e.g. a LoRA's own lr) replaces the preset's for every arm (it was silently
    replaced by the preset's); a --set of what makes an arm (its run folder, its init, its strength) is one
    line, exit 2, before any work."""
    from pathlib import Path

    from resampling_forcing.ablation import _path
    from resampling_forcing.ablation_arms import arm_overrides, arm_settings

    calib = {"recommended_shift": 2.0, "noise_sigma": 0.3, "one_step_shift": 1.0}
    arm = arm_overrides("ar_1step", calib, PRESETS["cpu"], 30, Path("w"), Path("r"))
    sets = arm_settings(arm, ["train.lr=9e-4", "train.lora.rank=4"], ["train.seed=3"])
    cfg = load_config(_path(PRESETS["cpu"].config), sets)
    assert cfg.train.lr == 9e-4 and cfg.train.lora.rank == 4 and cfg.train.seed == 3
    assert load_config(_path(PRESETS["cpu"].config), arm_settings(arm, [], [])).train.lr == PRESETS["cpu"].lr
    assert cfg.diffusion.resample_shift == 1.0 and cfg.train.run_dir == "r"  # the arm's own keys stay
    for key in ("train.init_from=x", "diffusion.resample_shift=3", "train.run_dir=y"):
        capsys.readouterr()
        assert main(["--arms", "tf", "--set", key]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the ablation sets it for each arm" in err[0], err
