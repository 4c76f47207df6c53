"""Resumable sampling (sampling_resume.py, sample(replay=...), sample.py --resume).

1. The rollout: replaying the first n chunks of a call continues it bit for bit (latents, decoded video,
   routing selections), with CFG, a re-noised cache write (context_t > 0: its noise draws), a given history,
   prompt switches (keep / recache) and top-k routing; the reference is the uninterrupted call.
2. The CLI: a run stopped by a signal or killed by an error keeps its chunks in OUT.resume; --resume writes
   the video the uninterrupted run writes (frame for frame) and removes the folder; a larger --num-chunks
   extends; a leftover folder without --resume, or a folder of another run, is one line (exit 2) before any
   work; a finished video is kept, not generated again; a damaged chunk file is generated again.
"""
import json
import os
import signal

import numpy as np
import pytest
import torch

from resampling_forcing import sampler
from resampling_forcing.attention.routing import RoutingSpec
from resampling_forcing.encoders import PixelShuffleVAE
from resampling_forcing.mp4 import read_mp4
from resampling_forcing.options import SamplingOptions
from resampling_forcing.sampler import sample
from resampling_forcing.sampling_resume import ResumeState, key_difference, state_dir

from helpers import load_sample_cli, save_checkpoint_for_tests, tiny_model

H, W = 2, 14
CLI = load_sample_cli()


def _ctx(seed, b=2):
    return torch.randn(b, 5, 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "cfg": dict(opts=dict(cfg_scale=3.0)),
    "context_t": dict(opts=dict(cfg_scale=1.0, context_t=0.3)),
    "history+topk": dict(opts=dict(cfg_scale=2.0, routing=RoutingSpec("topk", top_k=1), record_selection=True),
                         history=2),
    "switch keep": dict(opts=dict(cfg_scale=1.0, context_t=0.2), board="keep"),
    "switch recache": dict(opts=dict(cfg_scale=2.0), board="recache", history=1),
    "switch recache context_t": dict(opts=dict(cfg_scale=2.0, context_t=0.3), board="recache"),
}


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_replay_continues_the_rollout_bit_for_bit(case, n):
    c = CASES[case]
    model = tiny_model(in_channels=12, out_channels=12)  # PixelShuffleVAE(2): 12 channels
    vae = PixelShuffleVAE(factor=2)
    cf = model.cfg.chunk_frames
    kw = dict(neg_context=_ctx(9, 1), options=SamplingOptions(steps=2, **c["opts"]), seed=5, vae=vae)
    if c.get("history"):
        kw["history"] = torch.randn(1, 12, c["history"] * cf, H, W, generator=torch.Generator().manual_seed(1))
    if c.get("board"):
        kw.update(storyboard=[(0, _ctx(1)), (2, _ctx(2))], switch_cache=c["board"])
        ctx = None
    else:
        ctx = _ctx(1)
    full = sample(model, ctx, 5, (H, W), **kw)
    h = full.history_chunks * cf
    seen = []
    res = sample(model, ctx, 5, (H, W), replay=full.latents[:, :, h:h + n * cf].clone(),
                 callback=lambda ch: seen.append(ch.replayed), **kw)
    assert seen == [g < n for g in range(5)]
    assert torch.equal(res.latents, full.latents) and torch.equal(res.video, full.video)
    if full.selection is not None:
        np.testing.assert_array_equal(res.selection, full.selection)
    t = res.timings
    assert t["replayed_chunks"] == n and t["generated_chunks"] == 5 and len(t["per_chunk_s"]) == 5 - n
    # the replay is taken as given: other latents there change what follows
    if n < 5:
        other = sample(model, ctx, 5, (H, W), replay=full.latents[:, :, h:h + n * cf] + 0.5, **kw)
        assert not torch.equal(other.latents[:, :, h + n * cf:], full.latents[:, :, h + n * cf:])


def test_replay_through_a_stateful_vae_decoder():
    """The Wan VAE's streaming decoder carries a cache from chunk to chunk: the replayed chunks are decoded
    again in order, so the frames after them are the uninterrupted run's too (the pixel-shuffle VAE above
    keeps no state). The replay is given as a sequence of chunks, as sampling_resume.ReplayChunks gives it."""
    from diffusers import AutoencoderKLWan

    from resampling_forcing.encoders import WanVAE

    torch.manual_seed(0)
    vae = WanVAE.from_model(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval())
    model = tiny_model()
    cf = model.cfg.chunk_frames
    kw = dict(options=SamplingOptions(steps=2, cfg_scale=1.0), seed=3, vae=vae)
    full = sample(model, _ctx(1), 4, (H, W), **kw)
    chunks = [full.latents[:, :, g * cf:(g + 1) * cf].clone() for g in range(2)]
    res = sample(model, _ctx(1), 4, (H, W), replay=chunks, **kw)
    assert torch.equal(res.latents, full.latents) and torch.equal(res.video, full.video)
    assert vae.frames_for_latents(4 * cf) == res.video.shape[1]


def test_replay_of_the_wrong_shape_is_refused():
    model = tiny_model()
    cf = model.cfg.chunk_frames
    with pytest.raises(ValueError, match="whole chunks"):
        sample(model, _ctx(1), 2, (H, W), replay=torch.zeros(2, 4, cf + 1, H, W), decode=False)
    with pytest.raises(ValueError, match="chunk latents must be"):
        sample(model, _ctx(1), 2, (H, W), replay=torch.zeros(1, 4, cf, H, W), decode=False,
               options=SamplingOptions(steps=1, cfg_scale=1.0))


def test_key_difference_names_the_first_setting():
    a = dict(seed=1, sampling=dict(steps=4, routing=dict(top_k=2)), prompt="x")
    assert key_difference(a, json.loads(json.dumps(a))) is None
    assert key_difference(a, dict(a, seed=2)) == "seed: 1 then, 2 now"
    b = dict(a, sampling=dict(steps=4, routing=dict(top_k=3)))
    assert key_difference(a, b) == "sampling.routing.top_k: 2 then, 3 now"
    assert key_difference(a, dict(a, init=None)) == "init: \"<unset>\" then, null now"
    # a field that is a mapping on one side only is named whole, not by a part of it
    assert key_difference(dict(a, init=None), dict(a, init=dict(kind="image", sha256="ab"))) == \
        'init: null then, {"kind": "image", "sha256": "ab"} now'
    assert key_difference(dict(a, init={}), dict(a, init=None)) == "init: {} then, null now"


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)


def cli(*args):
    return CLI.main([str(a) for a in args])


def _base(run_dir, *extra):
    return ("--checkpoint", run_dir, "--prompt", "a red circle", "--prompt", "a blue square", "--batch", 2,
            "--seed", 5, "--steps", 2, "--cfg", 2, "--device", "cpu", "--quiet", *extra)


def _count_chunks(monkeypatch):
    real, made = sampler.Rollout.next_chunk, []

    def next_chunk(self, *a, **k):
        made.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(sampler.Rollout, "next_chunk", next_chunk)
    return made


def _fail_after(monkeypatch, chunk: int, exc):
    """Rollout.next_chunk raises `exc` when asked for chunk `chunk` (0-based, counted over the test): a crash."""
    real, count = sampler.Rollout.next_chunk, [0]

    def next_chunk(self, *a, **k):
        if count[0] == chunk:
            raise exc
        count[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(sampler.Rollout, "next_chunk", next_chunk)


def _videos(out):
    return [out.parent / f"{out.stem}_000_a_red_circle.mp4", out.parent / f"{out.stem}_001_a_blue_square.mp4"]


def test_a_crashed_run_resumes_to_the_uninterrupted_video(run_dir, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full" / "v.mp4"
    assert cli(*_base(run_dir, "--num-chunks", 4, "--output", full)) == 0
    assert not any(state_dir(v).exists() for v in _videos(full))  # a whole video leaves no folder
    out = tmp_path / "crash" / "v.mp4"
    with monkeypatch.context() as m:
        _fail_after(m, 3, MemoryError("out of memory"))  # dies while making chunk 3: chunks 0-2 are kept
        with pytest.raises(MemoryError):
            cli(*_base(run_dir, "--num-chunks", 4, "--output", out))
    assert not any(v.exists() for v in _videos(out))  # no video, but its chunks
    assert [ResumeState(v).chunks() for v in _videos(out)] == [3, 3]
    capsys.readouterr()
    # without --resume: one line, exit 2, the folder untouched
    assert cli(*_base(run_dir, "--num-chunks", 4, "--output", out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a run left 3 chunk(s)" in err and "add --resume" in err, err
    made = _count_chunks(monkeypatch)
    assert cli(*_base(run_dir, "--num-chunks", 4, "--output", out, "--resume")) == 0
    assert len(made) == 1  # only the last chunk is denoised
    for a, b in zip(_videos(out), _videos(full)):
        np.testing.assert_array_equal(read_mp4(a), read_mp4(b))
        meta = json.loads(a.with_suffix(".json").read_text())
        assert meta["timings"]["replayed_chunks"] == 3 and meta["num_chunks"] == 4
        assert not state_dir(a).exists()
    # --resume again: both videos are whole and of this run: kept, nothing generated
    made.clear()
    before = [v.stat().st_mtime_ns for v in _videos(out)]
    assert cli(*_base(run_dir, "--num-chunks", 4, "--output", out, "--resume")) == 0
    assert not made and [v.stat().st_mtime_ns for v in _videos(out)] == before
    assert "kept" in capsys.readouterr().err


def test_a_stopped_video_resumes_and_extends(run_dir, tmp_path, monkeypatch, capsys):
    base = ("--checkpoint", run_dir, "--prompt", "a red circle", "--seed", 3, "--steps", 2, "--device", "cpu",
            "--quiet", "--context-t", "0.2")
    full = tmp_path / "full.mp4"
    assert cli(*base, "--num-chunks", 5, "--output", full) == 0
    part = tmp_path / "part.mp4"
    real, count = sampler.Rollout.next_chunk, [0]

    def next_chunk(self, *a, **k):  # SIGTERM after chunk 1: the video so far is written, its chunks kept
        out = real(self, *a, **k)
        if count[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        count[0] += 1
        return out

    with monkeypatch.context() as m:
        m.setattr(sampler.Rollout, "next_chunk", next_chunk)
        assert cli(*base, "--num-chunks", 3, "--output", part) == 143
    assert "--resume continues it" in capsys.readouterr().err
    assert json.loads(part.with_suffix(".json").read_text())["stopped_early"]["requested_chunks"] == 3
    assert ResumeState(part).chunks() == 2
    # resumed with a larger --num-chunks: the same video as a run that asked for 5 from the start
    assert cli(*base, "--num-chunks", 5, "--output", part, "--resume") == 0
    np.testing.assert_array_equal(read_mp4(part), read_mp4(full))
    meta = json.loads(part.with_suffix(".json").read_text())
    assert "stopped_early" not in meta and meta["num_chunks"] == 5 and not state_dir(part).exists()


def test_keep_chunks_lets_a_finished_video_be_extended_exactly(run_dir, tmp_path, monkeypatch):
    base = ("--checkpoint", run_dir, "--prompt", "a red circle", "--seed", 8, "--steps", 2, "--cfg", 2,
            "--device", "cpu", "--quiet")
    full = tmp_path / "full.mp4"
    assert cli(*base, "--num-chunks", 4, "--output", full) == 0
    out = tmp_path / "v.mp4"
    assert cli(*base, "--num-chunks", 2, "--output", out, "--keep-chunks") == 0
    assert ResumeState(out).chunks() == 2 and read_mp4(out).shape[0] < read_mp4(full).shape[0]
    made = _count_chunks(monkeypatch)
    assert cli(*base, "--num-chunks", 2, "--output", out, "--resume", "--keep-chunks") == 0
    assert not made  # finished with these settings: kept
    assert cli(*base, "--num-chunks", 4, "--output", out, "--resume", "--keep-chunks") == 0
    assert len(made) == 2
    np.testing.assert_array_equal(read_mp4(out), read_mp4(full))
    assert ResumeState(out).chunks() == 4
    # a shorter video from the kept chunks: nothing denoised, and the chunks beyond it stay for later
    short = tmp_path / "short.mp4"
    assert cli(*base, "--num-chunks", 2, "--output", short) == 0
    made.clear()
    assert cli(*base, "--num-chunks", 2, "--output", out, "--resume") == 0
    assert not made and ResumeState(out).chunks() == 4
    np.testing.assert_array_equal(read_mp4(out), read_mp4(short))
    assert cli(*base, "--num-chunks", 4, "--output", out, "--resume") == 0
    assert not made and not state_dir(out).exists()  # all four replayed, the folder goes with the whole video
    np.testing.assert_array_equal(read_mp4(out), read_mp4(full))


def test_resume_refuses_another_runs_folder_and_regenerates_a_damaged_chunk(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "v.mp4"
    base = ("--checkpoint", run_dir, "--prompt", "a red circle", "--steps", 2, "--device", "cpu", "--quiet",
            "--num-chunks", 3, "--output", out)
    full = tmp_path / "full.mp4"
    assert cli(*base[:-1], full, "--seed", 4) == 0
    with monkeypatch.context() as m:
        _fail_after(m, 2, KeyboardInterrupt())  # as a second Ctrl+C: stopped at once, no video
        assert cli(*base, "--seed", 4) == 130
    st = ResumeState(out)
    assert st.chunks() == 2
    capsys.readouterr()
    assert cli(*base, "--seed", 6, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "written by another run (seed: 4 then, 6 now)" in err, err
    assert st.chunks() == 2  # untouched
    (st.dir / "chunk_000001.npy").write_bytes(b"not an array")
    made = _count_chunks(monkeypatch)
    assert cli(*base, "--seed", 4, "--resume") == 0
    assert len(made) == 2  # chunk 1 (damaged) and chunk 2 are generated again
    assert "chunk_000001.npy is unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(read_mp4(out), read_mp4(full))


def test_a_resume_folder_that_is_a_file_is_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    state_dir(out).write_text("x")
    assert cli("--checkpoint", run_dir, "--prompt", "p", "--num-chunks", 1, "--output", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a file" in err, err


def test_kill_9_then_resume_writes_the_uninterrupted_video(run_dir, tmp_path):
    """sample.py as a user runs it, killed with SIGKILL once two chunks are kept: nothing can be tidied, and
    --resume still writes the uninterrupted run's video and leaves no temporary or folder behind."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    base = ["--checkpoint", str(run_dir), "--prompt", "a red circle", "--seed", 2, "--steps", 40, "--device", "cpu",
            "--quiet", "--num-chunks", 5]
    full = tmp_path / "full.mp4"
    assert cli(*base, "--output", full) == 0
    out = tmp_path / "k" / "v.mp4"
    proc = subprocess.Popen([sys.executable, str(repo / "sample" / "sample.py"), *map(str, base), "--output", str(out)],
                            env=dict(os.environ, PYTHONPATH=str(repo)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while ResumeState(out).chunks() < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    kept = ResumeState(out).chunks()
    assert proc.returncode == -signal.SIGKILL and 2 <= kept < 5, (proc.returncode, kept)
    assert not out.exists()
    _wait_for_orphan_encoders(out.parent)  # the killed run's ffmpeg ends its temporary when its input closes
    assert cli(*base, "--output", out, "--resume") == 0
    np.testing.assert_array_equal(read_mp4(out), read_mp4(full))
    assert json.loads(out.with_suffix(".json").read_text())["timings"]["replayed_chunks"] == kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["v.json", "v.mp4"]  # its temporary removed too


def _wait_for_orphan_encoders(folder, timeout=30.0):
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for cmd in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                busy = busy or (b"ffmpeg" in cmd.read_bytes() and str(folder).encode() in cmd.read_bytes())
            except OSError:
                pass
        if not busy:
            return
        time.sleep(0.05)


def test_resume_is_refused_before_any_video_and_what_changes_no_bit_may_change(run_dir, tmp_path, monkeypatch,
                                                                            capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\n")
    out = tmp_path / "o"
    base = ("--checkpoint", run_dir, "--prompts-file", pf, "--batch", 1, "--num-chunks", 3, "--steps", 2,
            "--top-k", 1, "--device", "cpu", "--quiet", "--output", f"{out}/")
    with monkeypatch.context() as m:
        _fail_after(m, 4, MemoryError())  # video 0 written, video 1 stopped after 1 chunk
        with pytest.raises(MemoryError):
            cli(*base, "--seed", 1, "--fps", 8)
    v0, v1 = out / "000_a_red_circle.mp4", out / "001_a_blue_square.mp4"
    assert v0.exists() and not v1.exists() and ResumeState(v1).chunks() == 1
    made = _count_chunks(monkeypatch)
    capsys.readouterr()
    # another seed: refused before video 0 (which it would make again first) is started
    assert cli(*base, "--seed", 2, "--resume") == 2 and not made
    assert "(seed: 1 then, 2 now)" in capsys.readouterr().err
    # another fps, a bounded cache (its host tier in the model's own dtype, named or not) and selections change
    # no bit of the latents: video 0 is made again (its fps differs), video 1 continues from its kept chunk
    assert cli(*base, "--seed", 1, "--resume", "--fps", 10, "--kv-resident-chunks", 1, "--kv-host-dtype", "fp32",
               "--record-selection") == 0
    assert len(made) == 3 + 2
    meta = json.loads(v1.with_suffix(".json").read_text())
    assert meta["timings"]["replayed_chunks"] == 1 and meta["fps"] == 10 and v1.with_suffix(".selection.npy").exists()


def test_a_changed_init_image_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    import imageio.v3 as iio

    img = tmp_path / "first.png"
    iio.imwrite(img, np.full((8, 8, 3), 100, np.uint8))
    out = tmp_path / "v.mp4"
    base = ("--checkpoint", run_dir, "--prompt", "a red circle", "--init-image", img, "--num-chunks", 3,
            "--steps", 2, "--device", "cpu", "--quiet", "--output", out)
    with monkeypatch.context() as m:
        _fail_after(m, 2, MemoryError())
        with pytest.raises(MemoryError):
            cli(*base)
    iio.imwrite(img, np.full((8, 8, 3), 200, np.uint8))
    capsys.readouterr()
    assert cli(*base, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "init.sha256" in err, err


def test_a_second_writer_of_the_same_video_is_refused_in_one_line(run_dir, tmp_path, capsys):
    """While a process writes v.mp4 (its lock held), a second sample.py for v.mp4 (a repeated command, a
    --resume of a run that is still going) is refused before it reads or makes anything; other outputs in
    the same folder are not held; once the first ends, the command runs."""
    from resampling_forcing.sampling_resume import lock_videos

    out, other = tmp_path / "v.mp4", tmp_path / "w.mp4"
    base = ("--checkpoint", run_dir, "--prompt", "p", "--num-chunks", 1, "--quiet")
    with lock_videos([out]):
        for extra in ((), ("--resume",)):
            assert cli(*base, "--output", out, *extra) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"another process is writing {out}" in err, err
            assert not out.exists() and not state_dir(out).exists()
        assert cli(*base, "--output", other) == 0
    assert cli(*base, "--output", out) == 0 and out.is_file()
    assert not (tmp_path / ".sample-locks").exists()  # released and removed


def test_an_existing_video_is_replaced_only_with_overwrite(run_dir, tmp_path, capsys):
    """A second command writing an existing video is refused before it loads anything, the video untouched;
    --overwrite replaces it; --resume keeps or continues only a video its own command wrote; the input
    video is never an output."""
    out = tmp_path / "v.mp4"
    base = ("--checkpoint", run_dir, "--num-chunks", 1, "--quiet", "--output", out)
    assert cli(*base, "--prompt", "a red circle") == 0
    before = out.read_bytes()
    capsys.readouterr()
    for extra, words in ((("--prompt", "a blue square"), f"--output: {out} exists; add --overwrite"),
                         (("--prompt", "a blue square", "--resume"), "exists and was written by another run")):
        assert cli(*base, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
        assert out.read_bytes() == before
    assert cli(*base, "--prompt", "a red circle", "--resume") == 0  # its own command's: kept
    assert out.read_bytes() == before
    assert cli(*base, "--prompt", "a blue square", "--overwrite") == 0
    assert out.read_bytes() != before and "blue" in json.loads(out.with_suffix(".json").read_text())["prompt"]
    assert cli(*base, "--prompt", "x", "--init-video", out, "--overwrite") == 2
    assert "is the --init-video itself" in capsys.readouterr().err
    # a stopped run's folder: --overwrite starts over (without it or --resume: refused, as before)
    st = ResumeState(out)
    st.begin({"any": "key"}, keep=0)
    st.save(0, torch.zeros(1, 1, 1, 1))
    assert cli(*base, "--prompt", "a red circle", "--overwrite") == 0
    assert not st.dir.exists() and out.read_bytes() == before
