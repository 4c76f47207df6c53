"""Issue 13: every bad input to train/train.py and train/precompute.py gives ONE line on stderr
naming the problem and the fix, exit code 2, no traceback and nothing left behind; the run folder
is locked; a damaged newest checkpoint falls back to the previous one; a full disk during a save
says so in one line and keeps the previous checkpoint."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from resampling_forcing.checkpoint import checkpoint_problem, list_checkpoints
from resampling_forcing.mp4 import write_mp4
from resampling_forcing.models.loading import CheckpointError
from resampling_forcing.training import Trainer, train
from train_helpers import REPO, TINY_YAML, child_env, read_log, small_overrides
from train_helpers import fresh_accelerate_state, synth  # noqa: F401 (fixtures)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _bad_manifest(folder):
    """A manifest of only unusable videos: corrupt bytes, a 3-frame clip, a missing file, a null byte."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.mp4").write_bytes(os.urandom(3000))
    write_mp4(folder / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    rows = [{"path": "corrupt.mp4", "caption": "a"}, {"path": "short.mp4", "caption": "b"},
            {"path": "missing.mp4", "caption": "c"}, {"path": "nul\x00.mp4", "caption": "d"}]
    m = folder / "allbad.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_config_inside_its_new_run_folder_is_not_rewritten(tmp_path, capsys):
    """A new run (no checkpoint) writes RUN/config.yaml: a config.yaml there that no run wrote is the user's,
    the --config itself or another file: one line, exit 2, the file as it was. A run's own (its first line
    RUN_CONFIG_HEADER: a start stopped before its first checkpoint) is replaced as before."""
    from resampling_forcing.config import RUN_CONFIG_HEADER, load_config, run_config_yaml

    run = tmp_path / "run"
    run.mkdir()
    cfg = run / "config.yaml"
    for given, note in ((cfg, "(your --config)"), (TINY_YAML, "")):
        cfg.write_text("# my notes\n" + TINY_YAML.read_text())
        before = cfg.read_text()
        assert _train_cli()(["--config", str(given), f"train.run_dir={run}"]) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert f"holds a config.yaml {note}".replace("  ", " ").rstrip() in err and "that no run wrote" in err, err
        assert cfg.read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    # a run's own config.yaml passes this check (the run then stops at its missing manifest, another line),
    # also one written before the header (a crashed start of an older version, restarted)
    own = run_config_yaml(load_config(TINY_YAML, [f"train.run_dir={run}"]))
    for text in (own, own.removeprefix(RUN_CONFIG_HEADER)):
        cfg.write_text(text)
        argv = ["--config", str(TINY_YAML), f"train.run_dir={run}", "data.source=manifest",
                f"data.manifest={tmp_path / 'none.jsonl'}"]
        assert _train_cli()(argv) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert "no run wrote" not in err and "none.jsonl" in err, err


def test_train_cli_bad_inputs_one_line_exit_2_nothing_left(tmp_path, synth, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    manifest = _bad_manifest(tmp_path / "videos")
    truncated = tmp_path / "truncated_ckpt"  # the shipped checkpoint with its weights cut short
    shutil.copytree(REPO / "assets" / "tiny-pretrained", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cases = {  # overrides -> a word the one line must contain
        "log_every 0": (["train.log_every=0"], "train.log_every=0"),
        "num_frames 0": (["data.num_frames=0"], "data.num_frames=0"),
        "fps 0": (["data.fps=0"], "data.fps=0"),
        "wan vae without path": (["encoders.vae=wan"], "encoders.vae_path"),
        "umt5 without path": (["encoders.text=umt5"], "encoders.text_path"),
        "run_dir under a file": ([f"train.run_dir={afile}/run"], "is a file"),
        "run_dir under /proc": (["train.run_dir=/proc/nope/run"], "cannot create"),
        "8192x8192": (["data.height=8192", "data.width=8192"], "needs at least"),
        "optional field, wrong type": (["train.ema_decay=high"], "train.ema_decay: "),
        # before the data set is rendered (a fresh synthetic folder stays absent) or encoders load
        "init_from typo": ([f"train.init_from={tmp_path / 'no_such_run'}",
                            f"data.synthetic_dir={tmp_path / 'fresh_synth'}"], "no_such_run does not exist"),
        "init_from truncated": ([f"train.init_from={truncated}", f"data.synthetic_dir={tmp_path / 'fresh_synth'}"],
                                "model.safetensors is truncated"),
        "no usable video": (["data.source=manifest", f"data.manifest={manifest}"],
                            "all 4 files skipped (bad_path: 1, missing: 1, too_short: 1, unreadable: 1)"),
        # were a ZeroDivisionError in validate / a ValueError in the data loader
        "vae_factor 0": (["encoders.vae_factor=0"], "encoders.vae_factor=0: must be >= 1"),
        "seed 2**64": (["train.seed=18446744073709551616"], "train.seed=18446744073709551616: must be an int in [0, "),
        # made the loss NaN (20 bad steps, then the wrong advice and a run folder) or meant nothing
        "train_t_std nan": (["diffusion.train_t_std=.nan"], "diffusion.train_t_std=nan: must be a finite number >= 0"),
        "eps -1": (["model.eps=-1"], "model.eps=-1.0: must be a finite number > 0"),
        "rope_theta 0": (["model.rope_theta=0"], "model.rope_theta=0.0: must be a finite number > 0"),
        "resample_cfg nan": (["train.stages.1.resample_cfg=.nan"], "train.stages[1].resample_cfg must be in [0, 100]"),
        "resample_cfg -1": (["train.stages.1.resample_cfg=-1"], "train.stages[1].resample_cfg must be in [0, 100]"),
        "grad_clip nan": (["train.grad_clip=.nan"], "train.grad_clip=nan: must be a finite number (<= 0 = no clipping)"),
        # refused only after the synthetic set was rendered (fresh_synth stays absent)
        "num_frames not whole chunks": (["data.num_frames=9", f"data.synthetic_dir={tmp_path / 'fresh_synth'}"],
                                        "data.num_frames=9: gives 9 latent frames, not a multiple of "
                                        "model.chunk_frames=2; use data.num_frames=8 or 10"),
    }
    if not torch.cuda.is_available():
        cases["xformers on CPU"] = (["attention.backend=xformers"], "CUDA-only")
    main = _train_cli()
    for name, (extra, needle) in cases.items():
        run = tmp_path / f"run_{len(os.listdir(tmp_path))}"
        args = ["--config", str(TINY_YAML)] + small_overrides(run, synth) + extra
        capsys.readouterr()
        t0 = time.time()
        code = main(args)
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2, name
        assert needle in line, f"{name}: {line}"
        assert not run.exists(), f"{name}: left {run} behind"
        assert time.time() - t0 < 60, f"{name}: refused only after {time.time() - t0:.0f}s"
    assert not (tmp_path / "fresh_synth").exists()


def test_train_cli_config_not_utf8(tmp_path, capsys):
    """A config file that is not UTF-8 was a UnicodeDecodeError traceback."""
    bad = tmp_path / "utf16.yaml"
    bad.write_bytes(b"\xff\xfe")
    assert _train_cli()(["--config", str(bad)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: config file {bad} is not UTF-8 text; save it as UTF-8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["utf16.yaml"]


def _precompute(*args):
    return subprocess.run([sys.executable, str(REPO / "train" / "precompute.py"), "--config", str(TINY_YAML), *args],
                          capture_output=True, text=True, timeout=300, env=child_env(), cwd=REPO)


def test_precompute_cli_bad_inputs_one_line_exit_2_nothing_left(tmp_path):
    manifest = _bad_manifest(tmp_path / "videos")
    cases = [
        (["--device", "tpu9"], "--device tpu9"),
        (["encoders.vae=wan"], "encoders.vae_path"),
        (["--out", "/proc/nope/latents"], "cannot create"),
        # every file unusable: refused with the counts by cause, and no empty store left
        ([], "no usable video: all 4 files skipped (bad_path: 1, missing: 1, too_short: 1, unreadable: 1)"),
        # refused at config load, before any encoding (it wrote a store no config of this model can train on)
        (["data.num_frames=7"], "data.num_frames=7: gives 7 latent frames, not a multiple of model.chunk_frames=2; "
                                "use data.num_frames=6 or 8"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for extra, needle in cases:
        out = tmp_path / "store"
        args = ["--manifest", str(manifest), "--out", str(out), "--split", ""]
        if "--out" in extra:
            args = ["--manifest", str(manifest), "--split", ""]
        r = _precompute(*args, *extra)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("precompute: error:")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert needle in lines[0], (extra, lines[0])
        assert not out.exists(), extra


def test_null_byte_row_is_skipped_and_named(tmp_path, caplog):
    from resampling_forcing.data.video import VideoClipDataset

    write_mp4(tmp_path / "good.mp4", np.zeros((8, 16, 16, 3), np.uint8), fps=8)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "good.mp4", "caption": "g"}) + "\n"
                                      + json.dumps({"path": "bad\x00.mp4", "caption": "b"}) + "\n")
    with caplog.at_level("WARNING", logger="resampling_forcing.data"):
        ds = VideoClipDataset(tmp_path / "m.jsonl", 8, 16, 16, fps=8)
    assert ds.bad_files == {"bad_path": 1} and "manifest row 2" in caplog.text
    assert ds.try_get(0) is not None and ds.try_get(1) is None


# ----------------------------------------------------------------------------- the run lock


HOLD = ("import sys, time; from resampling_forcing.training_utils import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)")


def test_second_trainer_is_refused_and_lock_dies_with_its_holder(tmp_path, synth, capsys):
    from resampling_forcing.training_utils import RunLock, RunLockError

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = _train_cli()(["--config", str(TINY_YAML)] + small_overrides(run, synth))
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and f"pid {holder.pid}" in line and "in use by another trainer" in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused trainer wrote nothing
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, nothing is stale
        holder.wait()
        lock = RunLock(run).acquire()
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()
        lock.release()
        with RunLock(run):  # released after a normal exit too
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert train(load_cfg(run, synth, steps_tf=1, steps_rf=0))["step"] == 1  # and a trainer runs there


def load_cfg(run, synth, *extra, **kw):
    from resampling_forcing.config import load_config

    return load_config(TINY_YAML, small_overrides(run, synth, **kw) + list(extra))


# ----------------------------------------------------------------------------- checkpoints


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, synth, caplog):
    run = tmp_path / "run"
    train(load_cfg(run, synth, "train.save_every=2", "data.fixed_batch=true", steps_tf=2, steps_rf=2))
    ref = read_log(run)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    step4 = run / "checkpoints" / "step_0000004"
    for name in ("optimizer.bin", "model.safetensors"):  # each damage is seen without loading anything
        f = step4 / name
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        assert name in checkpoint_problem(step4)
        f.write_bytes(data)
    assert checkpoint_problem(step4) is None
    (step4 / "optimizer.bin").rename(step4 / "opt.moved")  # a missing optimizer was taken as whole (a traceback)
    assert checkpoint_problem(step4, resume=True) == "optimizer.bin is missing"
    assert checkpoint_problem(step4) is None  # its weights still serve train.init_from, --lora
    with pytest.raises(CheckpointError, match=r"step_0000004 cannot be resumed: optimizer.bin is missing .*train.init_from="):
        train(load_cfg(run, synth, "train.save_every=2", "data.fixed_batch=true", steps_tf=2, steps_rf=3))
    assert (step4 / "model.safetensors").is_file()  # refused, not set aside: its weights are whole
    (step4 / "opt.moved").rename(step4 / "optimizer.bin")
    from unittest import mock

    from resampling_forcing.checkpoint import safetensors_problem

    with mock.patch("builtins.open", side_effect=PermissionError(13, "Permission denied")):  # root reads anything
        assert safetensors_problem(step4 / "model.safetensors") == "model.safetensors cannot be read (Permission denied)"
    opt = step4 / "optimizer.bin"
    data = opt.read_bytes()
    opt.write_bytes(b"\x00not a checkpoint" * 3)  # not even a zip: was an UnpicklingError traceback on resume
    assert checkpoint_problem(step4) == "optimizer.bin is not a torch.save file (damaged)"
    torch.save({"state": torch.ones(3)}, opt, _use_new_zipfile_serialization=False)  # the pre-zip format is whole
    assert checkpoint_problem(step4) is None
    opt.write_bytes(data)
    opt = step4 / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="resampling_forcing.train"):
        res = train(load_cfg(run, synth, "train.save_every=2", "data.fixed_batch=true", steps_tf=2, steps_rf=2))
    assert "step_0000004 is damaged (optimizer.bin is truncated" in caplog.text and "step_0000002" in caplog.text
    assert res["step"] == 4
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # steps 3-4 trained again from step 2, exactly as before
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    assert (run / "checkpoints" / "step_0000004.damaged").is_dir()  # kept for inspection, out of the way
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and checkpoint_problem(step4) is None


def test_disk_full_during_a_save_one_line_previous_checkpoint_intact(tmp_path, synth, capsys, monkeypatch):
    run = tmp_path / "run"
    original = Trainer._export
    calls = {"n": 0}

    def export_disk_full(self, folder):
        calls["n"] += 1
        original(self, folder)
        if calls["n"] == 2:
            raise RuntimeError(f"[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                               f"file data/0: file write failed ({os.strerror(errno.ENOSPC)})")

    monkeypatch.setattr(Trainer, "_export", export_disk_full)
    code = _train_cli()(["--config", str(TINY_YAML)] + small_overrides(run, synth, steps_tf=2, steps_rf=2)
                        + ["train.save_every=2"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and f"no space left on {run / 'checkpoints'}" in line and "step_0000002 is intact" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    assert checkpoint_problem(run / "checkpoints" / "step_0000002") is None


# ----------------------------------------------------------------------------- workers


def test_loader_workers_die_with_their_parent(tmp_path):
    """The worker_init_fn sets PR_SET_PDEATHSIG: a worker whose parent is killed with -9 goes too."""
    script = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    from resampling_forcing.data.loader import die_with_parent\n"
        "    die_with_parent(0)\n"
        "    open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(120)\n"
    )
    marker = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", script, str(marker)], env=child_env())
    try:
        deadline = time.time() + 120
        while not (marker.exists() and marker.read_text()):
            assert time.time() < deadline and parent.poll() is None
            time.sleep(0.1)
        child = int(marker.read_text())
        os.kill(child, 0)  # alive while its parent lives
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            try:  # reaped by init (or a subreaper); a zombie still answers kill(0), so check its state
                if open(f"/proc/{child}/stat").read().split(")")[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the worker outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ----------------------------------------------------------------------------- the secondary tools


def _tool_cases(tmp_path):
    from resampling_forcing import ablation, ablation_memory, ablation_seeds, demo, diagnose
    from resampling_forcing.eval import cli as eval_cli
    from resampling_forcing.eval import pixel

    ck = str(REPO / "assets" / "tiny-pretrained")
    vids = tmp_path / "vids"
    vids.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    report, plot = tmp_path / "report.json", tmp_path / "plot.png"  # a report of an earlier run: kept
    report.write_text("{}")
    plot.write_text("png")
    exists = "exists; pass --overwrite to replace it"
    old_out = tmp_path / "old_ablation"  # a work folder of the version that calibrated on the eval clips
    (old_out / "gaps").mkdir(parents=True)
    return {
        "diagnose --out a folder": (diagnose.main, ["--checkpoint", ck, "--out", str(tmp_path)], "is a directory"),
        "diagnose --out under /proc": (diagnose.main, ["--checkpoint", ck, "--out", "/proc/x/r.json"], "cannot create"),
        "diagnose --out exists": (diagnose.main, ["--checkpoint", ck, "--out", str(report)], exists),
        "eval --out exists": (eval_cli.main, ["--videos", str(vids), "--out", str(report)], exists),
        "eval --plot exists": (eval_cli.main, ["--videos", str(vids), "--plot", str(plot)], exists),
        "pixel --out exists": (pixel.main, [str(vids), "--out", str(report)], exists),
        "seeds --out exists": (ablation_seeds.main, [str(vids), str(vids), "--out", str(report)], exists),
        "diagnose huge seed": (diagnose.main, ["--checkpoint", ck, "--seed", str(2**80)], "--seed must be in"),
        "diagnose empty --checkpoint": (diagnose.main, ["--checkpoint", ""], "--checkpoint must not be empty"),
        "diagnose --config a folder": (diagnose.main, ["--checkpoint", ck, "--config", str(tmp_path)], "is a directory"),
        "diagnose --held-out with --data": (diagnose.main, ["--checkpoint", ck, "--data", str(vids), "--held-out",
                                                            "calibration"], "pass one of them"),
        "diagnose too many held-out clips": (diagnose.main, ["--checkpoint", ck, "--clips", "1000001"], "a held-out set has"),
        "ablation arm spelled twice": (ablation.main, ["--arms", "tf,ar_1.0"], "write this arm as ar_1"),
        "ablation arm too weak": (ablation.main, ["--arms", "tf,ar_0.00001"], "at most 4 decimals"),
        "ablation old work folder": (ablation.main, ["--out", str(old_out)], "made by an earlier version"),
        "eval --plot not png": (eval_cli.main, ["--videos", str(vids), "--out", str(tmp_path / "m.json"),
                                                "--plot", str(tmp_path / "p.txt")], "expected a .png file"),
        "eval usage error": (eval_cli.main, ["--segment-frames", "1.5"], "(see --help)"),
        "ablation empty arms": (ablation.main, ["--arms", ","], "names no arm"),
        "ablation routing arm": (ablation.main, ["--arms", "tf", "--routing-arm", "ar_0.6"], "is not among the arms"),
        "ablation contradiction": (ablation.main, ["--routing-arm", "tf", "--no-routing"], "contradict"),
        "ablation --out a file": (ablation.main, ["--out", str(a_file)], "is a file, not a directory"),
        "ablation --warmup a file": (ablation.main, ["--warmup", str(a_file)], "not a run or checkpoint folder"),
        "ablation --report-dir /proc": (ablation.main, ["--report-dir", "/proc/x"], "cannot create"),
        "memory init a file": (ablation_memory.main, ["--out", str(tmp_path / "mem"), "--set",
                                                      f"train.init_from={a_file}"], "not a run or checkpoint folder"),
        "memory --seed": (ablation_memory.main, ["--seed", "-1"], "--seed must be in"),
        "demo negative steps": (demo.main, ["--tf-steps", "-1"], "--tf-steps must be >= 0"),
        "demo pretrained typo": (demo.main, ["--pretrained", str(tmp_path / "typo")], "not a checkpoint folder"),
        "demo run_dir override": (demo.main, ["train.run_dir=" + str(a_file)], "move it with --out"),
    }


def test_secondary_tools_refuse_bad_input_in_one_line_before_any_work(tmp_path, capsys):
    """diagnose, eval, pixel, ablation, ablation_seeds, ablation_memory and the demo: each bad flag is one line
    and exit 2 before any work (output paths were found bad only after the run, some ablation flags only after
    training every arm, the demo deleted a run_dir given as an override, reports were replaced without
    --overwrite), and nothing is written."""
    for name, (main, argv, text) in _tool_cases(tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and text in err, f"{name}: {err!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "old_ablation", "plot.png", "report.json",
                                                          "vids"]  # nothing created
    assert [p.name for p in (tmp_path / "old_ablation").iterdir()] == ["gaps"]
    assert (tmp_path / "a_file").read_text() == "x"
    assert (tmp_path / "report.json").read_text() == "{}" and (tmp_path / "plot.png").read_text() == "png"


# ----------------------------------------------------------------------------- a checkpoint's model_config.json


TINY_CK = REPO / "assets" / "tiny-pretrained"


def _damaged_checkpoint(tmp_path, model_config) -> "os.PathLike":
    """assets/tiny-pretrained copied with its model_config.json replaced (a dict: keys changed; else the
    whole file's JSON, or raw text)."""
    ck = tmp_path / "ck"
    shutil.copytree(TINY_CK, ck)
    if isinstance(model_config, dict):
        text = json.dumps({**json.loads((TINY_CK / "model_config.json").read_text()), **model_config})
    else:
        text = model_config if isinstance(model_config, str) else json.dumps(model_config)
    (ck / "model_config.json").write_text(text)
    return ck


@pytest.mark.parametrize("model_config,problem", [
    ({"num_heads": 3}, "dim=128 is not divisible by num_heads=3"),
    ({"dim": "big"}, "dim: expected int, got str 'big'"),
    ({"dim": None}, "dim: expected int, got NoneType None"),
    ({"dim": 128.0}, "dim: expected int, got float 128.0"),
    ({"num_layers": 0}, "num_layers=0: must be >= 1"),
    ({"eps": float("nan")}, "eps=nan: must be a finite number > 0"),
    ({"rope_theta": -1}, "rope_theta=-1.0: must be a finite number > 0"),
    ({"prediction": "eps"}, "prediction: 'eps' is not one of ['velocity', 'x0']"),
    ({"patch_size": [1, 2]}, "patch_size=[1, 2]: expected three positive ints"),
    ([1, 2], "expected a JSON object of model settings, got list"),
    ("{", "is not readable JSON"),
], ids=lambda v: str(v)[:20])
def test_bad_model_config_json_is_one_checkpoint_error(tmp_path, model_config, problem):
    """Bad values in model_config.json crashed the first forward pass (an unflatten RuntimeError, a
    TypeError in the memory estimate, an AttributeError for a list): now the typed construction and the
    model rules of the config (config_checks.check_model) refuse them at load, naming the file and the key."""
    from resampling_forcing.models.loading import CheckpointError, load_model

    ck = _damaged_checkpoint(tmp_path, model_config)
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(ck / "model_config.json")) and problem in msg, msg


@pytest.mark.parametrize("change", [{"num_heads": 3}, {"chunk_frames": 0}, {"head_dim": None},
                                    {"patch_size": [2, 2, 2], "chunk_frames": 3}, {"x0_min_t": 1.5}])
def test_config_and_checkpoint_share_the_model_rules(tmp_path, change):
    """The same model value is refused by the YAML (key model.X) and by a checkpoint's model_config.json
    (key X), with the same rule."""
    from resampling_forcing.config import ConfigError, config_from_dict
    from resampling_forcing.models.loading import CheckpointError, config_from_checkpoint

    change = {k: v for k, v in change.items() if k != "head_dim"} or {"dim": 130, "num_heads": 10}  # head dim 13
    with pytest.raises(ConfigError) as from_yaml:
        config_from_dict({"model": {"preset": "tiny", "chunk_frames": 2, **change},
                          "encoders": {"vae": "pixel_shuffle", "text": "hash"}})
    with pytest.raises(CheckpointError) as from_ck:
        config_from_checkpoint(_damaged_checkpoint(tmp_path, change))
    rule = str(from_yaml.value).replace("model.", "")
    assert rule in str(from_ck.value), (str(from_yaml.value), str(from_ck.value))


def test_sample_cli_bad_model_config_json_one_line_exit_2(tmp_path):
    """The user's view: sample/sample.py with a checkpoint whose model_config.json has num_heads=3
    printed a 44-line traceback from the first forward; now one line, exit 2, no output."""
    ck = _damaged_checkpoint(tmp_path, {"num_heads": 3})
    out = tmp_path / "o.mp4"
    r = subprocess.run([sys.executable, str(REPO / "sample" / "sample.py"), "--checkpoint", str(ck), "--prompt", "x",
                        "--num-chunks", "2", "--steps", "1", "--output", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=child_env(), cwd=REPO)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == (f"error: {ck / 'model_config.json'}: dim=128 is not divisible by num_heads=3; the file is "
                        "damaged or edited: restore it from the run that saved the weights"), lines[0]
    assert not out.exists() and not out.with_suffix(".json").exists()
