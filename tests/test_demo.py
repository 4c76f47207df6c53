"""`make demo` end to end at toy sizes: data, live training (TF then RF), sampling from the live
and the shipped checkpoint, evaluation, and every promised output file."""
import json
import sys
from pathlib import Path

import pytest

from resampling_forcing import demo

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--tf-steps", "3", "--rf-steps", "2", "--length-factor", "2",
                    "--extra-captions", "1", f"data.synthetic_dir={tmp_path / 'data'}",
                    "data.synthetic_videos=24", "train.batch_size=4", "diffusion.sample_steps=2",
                    "train.tensorboard=false"])
    assert rc == 0
    for name in ("contact_sheet.png", "drift_live.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rollout_frames"] == 24 and metrics["segment_frames"] == 12
    held_out = json.loads((tmp_path / "data" / "dataset.json").read_text())["held_out_captions"]
    assert metrics["captions"][: len(held_out)] == held_out
    mp4s = sorted((out / "live").glob("*.mp4"))
    assert len(mp4s) == len(metrics["captions"])
    # named and described as sample/sample.py names and describes its videos (PipelineOutput.save)
    import re

    assert all(re.fullmatch(r"\d{3}_[a-z0-9_]+\.mp4", p.name) for p in mp4s), [p.name for p in mp4s]
    meta = json.loads(mp4s[0].with_suffix(".json").read_text())
    for key in ("prompt", "negative_prompt", "seed", "sample_index", "video", "frames", "fps", "num_chunks",
                "sampling", "pipeline", "timings"):
        assert key in meta, (key, sorted(meta))
    assert meta["video"] == mp4s[0].name and meta["demo_model"] == "live" and meta["prompt"] == metrics["captions"][0]
    # real generator clips are the ceiling of the metric
    assert all(s["quality"] > 0.95 for s in metrics["models"]["real"]["per_segment"])
    assert len(metrics["models"]["live"]["per_segment"]) == 2
    assert demo.PRETRAINED.is_dir(), "the shipped checkpoint assets/tiny-pretrained is missing"
    # the shipped checkpoint still loads and draws the captioned objects moving on a clean background
    # with this code: 0.79 quality here (2 Euler steps, 24 frames); noise scores ~0, and the previous
    # checkpoint (2400 steps, words-only text features) scored 0.53 in `make demo`
    first = metrics["models"]["pretrained"]["per_segment"][0]
    assert first["quality"] > 0.65 and first["object_fidelity"] > 0.6, first
    assert first["background_clean"] > 0.9, first
    # it also continues the first chunk of each real clip; scored against the true continuation
    # (measured 0.92 / 0.83 quality, PSNR 14.9 / 11.7 dB, centre error 3.6 / 8.8 px)
    cont = metrics["models"]["pretrained_continued"]["per_segment"]
    assert len(sorted((out / "pretrained_continued").glob("*.mp4"))) == len(metrics["captions"])
    assert all(s["quality"] > 0.7 and s["center_error"] < 12 for s in cont), cont
    assert cont[0]["quality"] > 0.8 and cont[0]["psnr"] > 12, cont
    assert "outputs in" in capsys.readouterr().out


def test_demo_bad_override_exits_2(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "train.lrr=1"]) == 2
    assert "unknown key train.lrr" in capsys.readouterr().err


def test_quality_sweep_smoke(tmp_path, capsys):
    """bench/quality_sweep.py scores the shipped checkpoint per setting (not a quality test)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_sweep", REPO / "bench" / "quality_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q.json"
    assert mod.main(["--checkpoint", str(demo.PRETRAINED), "--seeds", "0", "--length-factor", "1",
                     "--train-captions", "1", "--settings", '{"steps": 2}', '{"steps": 2, "sink": 1, "window": 2}',
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["held_out"] == 2 and len(report["captions"]) == 3
    assert [r["setting"] for r in report["settings"]] == [{"steps": 2}, {"steps": 2, "sink": 1, "window": 2}]
    for row in report["settings"]:
        assert len(row["per_segment"]) == 1 and 0 <= row["mean"] <= 1 and row["training"] is not None
    assert '| `{"steps": 2}` |' in capsys.readouterr().out
    assert mod.main(["--checkpoint", str(demo.PRETRAINED), "--settings", "{bad"]) == 2
    assert "bad --settings" in capsys.readouterr().err


def _small_demo_args(tmp_path, tf_steps=3):
    return ["--out", str(tmp_path / "demo"), "--tf-steps", str(tf_steps), "--rf-steps", "2", "--length-factor", "2",
            "--extra-captions", "1", f"data.synthetic_dir={tmp_path / 'data'}", "data.synthetic_videos=24",
            "train.batch_size=4", "diffusion.sample_steps=2", "train.tensorboard=false", "train.progress=false"]


def _signal_during_training(tmp_path, sig):
    """Start the demo in a child process, send `sig` once training has logged a step; its result."""
    import os
    import signal as _signal  # noqa: F401
    import subprocess
    import time

    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import child_env

    log = tmp_path / "demo" / "run" / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "resampling_forcing.demo", *_small_demo_args(tmp_path, 100_000)],
                            env=child_env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the demo did not start training"
            time.sleep(0.2)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_demo_sigterm_during_training_stops_without_sampling(tmp_path):
    import signal

    rc, out, err = _signal_during_training(tmp_path, signal.SIGTERM)
    assert rc == demo.EXIT_SIGTERM == 143, (rc, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("demo: stopped by SIGTERM during training at step "), err
    assert "not sampling" in last
    assert "3/5 sampling" not in out
    assert not (tmp_path / "demo" / "live").exists() and not (tmp_path / "demo" / "metrics.json").exists()
    assert list((tmp_path / "demo" / "run" / "checkpoints").glob("step_*")), "the trainer saved on SIGTERM"
    # its advice resumes this run (rerunning the demo would delete it: "run the same command" was wrong)
    hint = f"resume this run with: python train/train.py --config {tmp_path / 'demo' / 'run' / 'config.yaml'}"
    assert hint in err and "run the same command" not in err, err


def test_demo_ctrl_c_during_training_one_line_no_traceback(tmp_path):
    import signal

    rc, out, err = _signal_during_training(tmp_path, signal.SIGINT)
    assert rc == demo.EXIT_SIGINT == 130, (rc, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("demo: stopped by SIGINT during training"), err
    assert not (tmp_path / "demo" / "live").exists()


def test_demo_signals_outside_training_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl+C or SIGTERM before/after training (data generation, sampling): one line, 130 / 143."""
    import os
    import signal

    def ctrl_c(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train", ctrl_c)
    assert demo.main(_small_demo_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["demo: stopped by SIGINT before the end; outputs may be incomplete (exit 130)"]

    def sigterm(cfg, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the demo")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(demo, "train", sigterm)
    assert demo.main(_small_demo_args(tmp_path)) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["demo: stopped by SIGTERM before the end; outputs may be incomplete (exit 143)"]
    assert signal.getsignal(signal.SIGTERM) is before  # the demo's handler is removed again


def test_demo_out_holds_the_data_set_and_the_run(tmp_path, monkeypatch, capsys):
    """`--out X` puts the synthetic data set under X (it went to ./outputs/synthetic); an explicit
    data.synthetic_dir= still wins."""
    seen = []

    def fake_train(cfg, **kw):
        seen.append((cfg.data.synthetic_dir, cfg.train.run_dir))
        return {"status": "interrupted", "signal": "SIGINT", "step": 0, "checkpoint": None}

    monkeypatch.setattr(demo, "train", fake_train)
    out = tmp_path / "X"
    assert demo.main(["--out", str(out)]) == 130
    assert seen[-1] == (str(out / "synthetic"), str(out / "run"))
    assert demo.main(["--out", str(out), f"data.synthetic_dir={tmp_path / 'mine'}"]) == 130
    assert seen[-1][0] == str(tmp_path / "mine")


def _damaged_copy(tmp_path, how: str) -> Path:
    """assets/tiny-pretrained with one thing broken (the audit's ck/trunc and ck/emptydir)."""
    import shutil

    ck = tmp_path / how
    if how == "empty":
        ck.mkdir()
        return ck
    shutil.copytree(demo.PRETRAINED, ck)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2_000_000])
    return ck


@pytest.mark.parametrize("case", ["truncated weights", "not a checkpoint", "huge length factor",
                                  "continue past the rollout"])
def test_demo_refuses_before_any_work(tmp_path, monkeypatch, capsys, case):
    """A bad --pretrained, a rollout that cannot fit in memory and a --continue-chunks that would silently
    skip the continuation are refused in one line, exit 2, before the data set, the training or --out."""
    def no_training(cfg, **kw):
        raise AssertionError("the demo trained before refusing its input")

    monkeypatch.setattr(demo, "train", no_training)
    out = tmp_path / "demo"
    args = {"truncated weights": ["--pretrained", str(_damaged_copy(tmp_path, "trunc"))],
            "not a checkpoint": ["--pretrained", str(_damaged_copy(tmp_path, "empty"))],
            "huge length factor": ["--length-factor", "1000000"],
            "continue past the rollout": ["--continue-chunks", "24"]}[case]
    assert demo.main(["--out", str(out), *args, f"data.synthetic_dir={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo: error: "), err
    want = {"truncated weights": ["--pretrained", "model.safetensors is truncated", "--pretrained ''"],
            "not a checkpoint": ["--pretrained", "neither model_config.json nor config.json"],
            "huge length factor": ["6000000 chunks", "needs at least", "lower --length-factor"],
            "continue past the rollout": ["--continue-chunks 24 must be < the rollout's 24 chunks", "0 to skip"]}[case]
    assert all(w in err[0] for w in want), err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_demo_deletes_only_a_demo_run(tmp_path, monkeypatch, capsys):
    """OUT/run that the demo did not make (a real training run) is refused in one line and kept (it was
    deleted); a demo's run (its mark, or an earlier demo's config layout) is trained afresh."""
    import yaml

    def stop_here(cfg, **kw):
        raise RuntimeError("trained")

    monkeypatch.setattr(demo, "train", stop_here)
    out = tmp_path / "demo"
    run = out / "run"
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"run_dir": "/elsewhere"}, "data": {}}))
    args = ["--out", str(out), "--pretrained", ""]
    assert demo.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} exists and is not a demo run" in err[0], err
    assert (run / "checkpoints" / "step_0000003").is_dir()
    # an earlier demo's run (no mark): its config's folders are the demo's layout under --out
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"run_dir": str(run)},
                                                      "data": {"synthetic_dir": str(out / "synthetic")}}))
    for name in ("pretrained/000_a.mp4", "pretrained_continued/000_a.mp4", "live/005_b.mp4"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"an earlier demo's video")
    for name in ("drift_pretrained.png", "metrics.json", "contact_sheet.png"):
        (out / name).write_bytes(b"x")
    with pytest.raises(RuntimeError, match="trained"):
        demo.main(args)
    assert (run / demo.DEMO_MARK).is_file() and not (run / "checkpoints").exists()
    # its outputs went with it: a run without --pretrained showed the old pretrained videos and plots beside
    assert sorted(p.name for p in out.iterdir()) == ["run"]
