"""sample.py on SIGINT / SIGTERM: the chunk in progress is finished and the video so far is written
(marked "stopped_early", exit 130 / 143); later prompts are not started; a second signal stops at once and
writes nothing. The signal is sent to this process from inside the rollout, after a given chunk."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from resampling_forcing import sampler
from resampling_forcing.mp4 import read_mp4

from helpers import ffmpeg_children, load_sample_cli, save_checkpoint_for_tests

CF = 2  # latent frames per chunk of helpers.tiny_run_config (the pixel-shuffle VAE is 1:1 in time)
CLI = load_sample_cli()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)


def cli(*args):
    return CLI.main([str(a) for a in args])


def _signal_after(monkeypatch, chunk: int, sig=signal.SIGINT, times: int = 1):
    """Rollout.next_chunk sends `sig` to this process `times` times right after generating chunk `chunk`
    (0-based, counted over the whole test)."""
    real, count = sampler.Rollout.next_chunk, [0]

    def next_chunk(self, *a, **k):
        out = real(self, *a, **k)
        if count[0] == chunk:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        count[0] += 1
        return out

    monkeypatch.setattr(sampler.Rollout, "next_chunk", next_chunk)


def test_a_signal_writes_the_chunks_so_far(run_dir, tmp_path, capsys, monkeypatch):
    base = ("--checkpoint", run_dir, "--prompt", "a red circle", "--num-chunks", 4, "--seed", 5, "--steps", 2,
            "--device", "cpu", "--quiet")
    full = tmp_path / "full.mp4"
    assert cli(*base, "--output", full) == 0
    _signal_after(monkeypatch, 1)
    part = tmp_path / "part.mp4"
    capsys.readouterr()
    assert cli(*base, "--output", part) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    err = capsys.readouterr().err
    assert f"wrote {part} ({2 * CF} frames, stopped by SIGINT after 2 of 4 chunks" in err, err
    a, b = read_mp4(part), read_mp4(full)
    assert a.shape[0] == 2 * CF and b.shape[0] == 4 * CF
    assert np.abs(a.astype(int) - b[: 2 * CF].astype(int)).max() <= 2  # the same first chunks (mp4 rounding)
    meta = json.loads(part.with_suffix(".json").read_text())
    assert meta["num_chunks"] == 2 and meta["frames"] == 2 * CF
    assert meta["stopped_early"] == {"signal": "SIGINT", "requested_chunks": 4}
    assert "stopped_early" not in json.loads(full.with_suffix(".json").read_text())


def test_sigterm_skips_the_prompts_not_started(run_dir, tmp_path, capsys, monkeypatch):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\n")
    _signal_after(monkeypatch, 0, signal.SIGTERM)
    out = tmp_path / "o"
    assert cli("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 3, "--output", f"{out}/", "--batch", 1,
               "--steps", 1, "--device", "cpu", "--quiet") == 143  # 128 + SIGTERM, as a shell reports it
    # the stopped video and its chunks (for --resume); nothing of the prompt not started
    assert sorted(p.name for p in out.iterdir()) == ["000_a_red_circle.json", "000_a_red_circle.mp4",
                                                     "000_a_red_circle.resume"]
    assert read_mp4(out / "000_a_red_circle.mp4").shape[0] == CF
    assert f"not generated (SIGTERM): {out / '001_a_blue_square.mp4'}" in capsys.readouterr().err


def test_a_second_signal_stops_at_once_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    _signal_after(monkeypatch, 0, times=2)
    out = tmp_path / "o" / "v.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 3, "--output", out, "--steps", 1,
               "--device", "cpu", "--quiet") == 130
    # no video, no temporary: only the resume folder (the run key; chunk 0 was stopped before it was kept)
    assert not Path(out).exists() and [p.name for p in out.parent.iterdir()] == ["v.resume"]
    assert sorted(p.name for p in (out.parent / "v.resume").iterdir()) == ["run.json"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["second SIGINT: stopped without writing the video in progress (--resume continues it); files "
                   "already reported as written are complete"], err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_while_loading_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM before any video is begun (the model loading) stops at once: one line, exit 143, no file
    and no lock left; the previous handlers are back."""
    from resampling_forcing.pipeline import Pipeline

    def loading(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the signal did not stop the loading")

    monkeypatch.setattr(Pipeline, "from_pretrained", loading)
    out = tmp_path / "o" / "v.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 3, "--output", out, "--quiet") == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("SIGTERM: stopped while no video was in progress"), err
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stopped_storyboard_lists_only_the_switches_it_shows(run_dir, tmp_path, monkeypatch):
    _signal_after(monkeypatch, 0, signal.SIGTERM)
    out = tmp_path / "s.mp4"
    assert cli("--checkpoint", run_dir, "--prompts-at", "0:a red circle;2:a blue square", "--num-chunks", 4,
               "--output", out, "--steps", 1, "--device", "cpu", "--quiet") == 143
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [e["chunk"] for e in meta["storyboard"]] == [0]
    assert meta["stopped_early"] == {"signal": "SIGTERM", "requested_chunks": 4, "switches_not_reached": [2]}
    t = meta["timings"]
    assert meta["num_chunks"] == 1 and t["generated_chunks"] == 1 and len(t["per_chunk_s"]) == 1
    assert meta["frames"] == CF == read_mp4(out).shape[0]


def test_a_batch_stops_together_and_a_stop_after_the_last_chunk_keeps_whole_videos(run_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\na green circle\n")
    _signal_after(monkeypatch, 0)
    out = tmp_path / "b"
    assert cli("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 3, "--output", f"{out}/", "--batch", 2,
               "--steps", 1, "--device", "cpu", "--quiet") == 130
    for name in ("000_a_red_circle", "001_a_blue_square"):  # one rollout: both samples stop after chunk 1
        assert read_mp4(out / f"{name}.mp4").shape[0] == CF
        assert json.loads((out / f"{name}.json").read_text())["stopped_early"]["requested_chunks"] == 3
    assert not (out / "002_a_green_circle.mp4").exists()
    monkeypatch.undo()
    _signal_after(monkeypatch, 1)  # after the last chunk of the only rollout: the video is whole
    whole = tmp_path / "w.mp4"
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--output", whole, "--steps", 1,
               "--device", "cpu", "--quiet") == 130
    assert "stopped_early" not in json.loads(whole.with_suffix(".json").read_text())
    assert read_mp4(whole).shape[0] == 2 * CF and "stopped by" not in capsys.readouterr().err


def test_a_signal_to_the_whole_job_stops_the_encoder_too(run_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM to every process of the job (Slurm's scancel, systemd) also ends the ffmpeg encoders, which
    stream the videos. A race decides whether ffmpeg read the last frames before it ended its file: then the
    video is written whole (its frame count checked against the JSON's); else one line says so and no file of
    the video is left. Never a video shorter than its JSON says. Exit code: the stop's, either way."""
    real, count = sampler.Rollout.next_chunk, [0]

    def next_chunk(self, *a, **k):
        out = real(self, *a, **k)
        if count[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            for pid, state in ffmpeg_children().items():
                if state != "Z":
                    os.kill(pid, signal.SIGTERM)
        count[0] += 1
        return out

    monkeypatch.setattr(sampler.Rollout, "next_chunk", next_chunk)
    out = tmp_path / "v.mp4"
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "a", "--num-chunks", 4, "--steps", 1, "--device", "cpu",
               "--quiet", "--output", out) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if err[0].startswith("wrote"):  # ffmpeg had read every frame sent before it ended the file
        meta = json.loads(out.with_suffix(".json").read_text())
        assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4", "v.resume"] and meta["stopped_early"]
        assert read_mp4(out).shape[0] == meta["frames"] == 2 * CF
    else:
        assert "also stopped the video encoder" in err[0] and "--resume continues them" in err[0], err
        assert os.listdir(tmp_path) == ["v.resume"]  # the chunks made, for --resume

