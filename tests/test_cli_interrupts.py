"""train/train.py under Ctrl+C: one true line on stderr and exit 130 (143 for a SIGTERM), whether the signal
is the first one, before the trainer installed its handler (imports, data rendering, model loading), or the
second one during training (signals.GracefulStop). In process, raising what each handler raises; and one
real SIGINT while the synthetic set renders (it used to be lost now and then: raised in the parent's
after-fork hooks of an ffmpeg writer, CPython prints "Exception ignored in _releaseLock" and drops it; the
renderer now takes it as a flag)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import load_script
from train_helpers import TINY_YAML, child_env


def _train_cli_raising(monkeypatch, exc):
    import resampling_forcing.training as training

    def train(cfg, **kw):
        raise exc

    monkeypatch.setattr(training, "train", train)
    return load_script("train/train.py", "train_cli")


def test_one_ctrl_c_before_training_is_not_called_twice(tmp_path, monkeypatch, capsys):
    """Python's own SIGINT handler (in place until training.fit installs GracefulStop) raises a bare
    KeyboardInterrupt: ONE Ctrl+C, which was reported as "interrupted twice"."""
    train_cli = _train_cli_raising(monkeypatch, KeyboardInterrupt())
    assert train_cli.main(["--config", str(TINY_YAML), f"train.run_dir={tmp_path / 'run'}",
                           f"data.synthetic_dir={tmp_path / 'synth'}"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted (Ctrl+C) before training started: no new checkpoint; rerun the same command"]
    assert not (tmp_path / "run").exists()


def test_second_signal_during_training_keeps_its_message_and_code(tmp_path, monkeypatch, capsys):
    from resampling_forcing.signals import SecondSignal

    # what signals.GracefulStop raises on a second signal (a SIGTERM: 143, as the shell reports it)
    second = SecondSignal("SIGTERM", "second SIGTERM: stopping without a checkpoint")
    train_cli = _train_cli_raising(monkeypatch, second)
    assert train_cli.main(["--config", str(TINY_YAML), f"train.run_dir={tmp_path / 'run'}",
                           f"data.synthetic_dir={tmp_path / 'synth'}"]) == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        "second SIGTERM: stopping without a checkpoint (the last checkpoint stays; rerun the same command to resume)"]
    assert not (tmp_path / "run").exists()


def test_a_real_ctrl_c_while_the_data_set_renders(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    synth = tmp_path / "synth"
    proc = subprocess.Popen([sys.executable, str(repo / "train" / "train.py"), "--config", str(TINY_YAML),
                             f"train.run_dir={tmp_path / 'run'}", f"data.synthetic_dir={synth}",
                             "data.synthetic_videos=2000"],
                            cwd=repo, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((synth / "videos").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the rendering loop (2000 videos take minutes)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    want = "interrupted (Ctrl+C) before training started: no new checkpoint; rerun the same command"
    assert lines == [want], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    assert not list((synth / "videos").glob(".*.tmp*"))  # the video in progress was finished, not cut
