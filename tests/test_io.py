import json
import os
import time

import numpy as np
import pytest
import torch

from resampling_forcing import figures
from resampling_forcing import io as rio
from resampling_forcing import mp4 as rmp4


def _clip(f=10, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    x = np.full((f, h, w, 3), 16, np.uint8)
    for t in range(f):
        y0, x0 = 4 + t % 8, 3 + (2 * t) % 12
        x[t, y0 : y0 + 8, x0 : x0 + 10] = (220, 40, 40)
    x[:, -6:, -6:] = rng.integers(0, 255, 3)  # a second, flat patch
    return x


def _only_final(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names)


@pytest.mark.parametrize("h,w", [(32, 32), (64, 64), (48, 80), (33, 17)])
def test_mp4_round_trip_shape_and_content(tmp_path, h, w):
    x = _clip(9, h, w)
    p = rmp4.write_mp4(tmp_path / "a.mp4", x, fps=8)
    y, fps = rmp4.read_mp4(p, with_fps=True)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert fps == pytest.approx(8.0)
    assert np.abs(y.astype(int) - x).mean() < 3.0
    _only_final(tmp_path, ["a.mp4"])


def test_write_float_tensor_channel_first(tmp_path):
    x = _clip(7)
    t = torch.from_numpy(x).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3,F,H,W] in [-1,1]
    rmp4.write_mp4(tmp_path / "t.mp4", t, fps=4)
    y = rmp4.read_mp4(tmp_path / "t.mp4")
    assert y.shape == x.shape
    assert np.abs(y.astype(int) - x).mean() < 3.0
    # batch of one and [F,H,W,3] float also accepted
    assert rmp4.to_uint8_video(t[None]).shape == x.shape
    assert rmp4.to_uint8_video(x.astype(np.float32) / 127.5 - 1).shape == x.shape


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        rmp4.write_mp4(tmp_path / "bad.mp4", np.zeros((3, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError):
        rmp4.write_mp4(tmp_path / "bad.mp4", np.zeros((0, 8, 8, 3), np.uint8))
    _only_final(tmp_path, [])

    # a failure in the middle of encoding: nothing under the final name, no temp left, and an
    # existing complete file is kept untouched
    good = rmp4.write_mp4(tmp_path / "v.mp4", _clip(5), fps=8)
    before = good.read_bytes()
    from resampling_forcing.ffmpeg import Encoder

    real = Encoder.write
    sent = {}

    def broken(self, frame):  # the third frame fails, ffmpeg holding two
        sent[self] = sent.get(self, 0) + 1
        if sent[self] == 3:
            raise RuntimeError("disk full")
        real(self, frame)

    monkeypatch.setattr(Encoder, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        rmp4.write_mp4(tmp_path / "v.mp4", _clip(5, seed=1), fps=8)
    with pytest.raises(RuntimeError, match="disk full"):
        rmp4.write_mp4(tmp_path / "new.mp4", _clip(5), fps=8)
    _only_final(tmp_path, ["v.mp4"])
    assert good.read_bytes() == before


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such video"):
        rmp4.read_mp4(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        rmp4.read_mp4(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="junk.mp4"):
        rmp4.read_mp4(tmp_path / "junk.mp4")


def test_contact_sheet(tmp_path):
    from PIL import Image

    a, b = _clip(10), _clip(6, seed=3)
    p = figures.contact_sheet([a, b], tmp_path / "sheet.png", every=3, scale=2, gap=2)
    img = np.asarray(Image.open(p))
    cols = 4  # frames 0,3,6,9 of the longest video
    assert img.shape == (2 * 64 + 3 * 2, cols * 64 + (cols + 1) * 2, 3)
    # the first cell is the first frame upscaled x2
    np.testing.assert_array_equal(img[2 : 2 + 64 : 2, 2 : 2 + 64 : 2], a[0])
    # labels add a left margin; unequal lengths/sizes are fine
    p2 = figures.contact_sheet([a, _clip(4, 16, 24)], tmp_path / "lab.png", every=2, labels=["one", "two"])
    assert Image.open(p2).size[0] > 5 * 64
    _only_final(tmp_path, ["sheet.png", "lab.png"])
    with pytest.raises(ValueError):
        figures.contact_sheet([a], tmp_path / "x.png", labels=["a", "b"])


def test_contact_sheet_pairs_last_frame_and_margin(tmp_path):
    """The ablation's layout: truth over continuation, joined by a grey line, pairs 3 gaps apart."""
    from PIL import Image

    a, b = _clip(10, 8, 8), _clip(10, 8, 8, seed=1)
    p = figures.contact_sheet([a, b, b, a], tmp_path / "pairs.png", every=4, scale=1, gap=2, last=True, margin=0, pairs=True)
    img = np.asarray(Image.open(p))
    assert img.shape == (4 * 8 + 1 + 6 + 1, 4 * 8 + 3 * 2, 3)  # frames 0, 4, 8 and the last, 9
    np.testing.assert_array_equal(img[:8, -8:], a[9])
    assert (img[8] == 128).all() and (img[17:23] == 255).all()  # joint of pair 1, gap between pairs
    np.testing.assert_array_equal(img[9:17, :8], b[0])
    np.testing.assert_array_equal(img[23:31, 10:18], b[4])
    with pytest.raises(ValueError, match="max_columns"):
        figures.contact_sheet([a], tmp_path / "x.png", max_columns=0)


def test_save_figure_and_json_are_atomic(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    figures.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    fig, _ = plt.subplots()
    with pytest.raises(Exception):
        figures.save_figure(fig, tmp_path / "g.png", format="no-such-format")
    rio.atomic_write_json(tmp_path / "d.json", {"a": 1})
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": 1}
    _only_final(tmp_path, ["f.png", "d.json"])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mode):
    """mkstemp creates 0600; every atomically written file must get 0666 & ~umask like open() would."""
    import torch.nn as nn

    from resampling_forcing.config import ModelConfig
    from resampling_forcing.models.loading import save_model
    from resampling_forcing.models.wan import CausalWanModel

    old = os.umask(umask)
    try:
        assert rio.current_umask() == umask
        rio.atomic_write_json(tmp_path / "a.json", {"a": 1})
        rmp4.write_mp4(tmp_path / "v.mp4", _clip(3), fps=4)
        with rio.atomic_group([tmp_path / "g.json", tmp_path / "g.mp4"]) as (j, m):
            j.write_text("{}")
            rmp4.write_mp4(m, _clip(3), fps=4, atomic=False)
        model = CausalWanModel(ModelConfig(dim=32, num_heads=2, ffn_dim=48, num_layers=1, freq_dim=16,
                                           in_channels=4, out_channels=4, text_dim=8))
        assert isinstance(model, nn.Module)
        save_model(model, tmp_path / "m")
        files = [tmp_path / n for n in ("a.json", "v.mp4", "g.json", "g.mp4")] + list((tmp_path / "m").iterdir())
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
    finally:
        os.umask(old)


def test_probe_writable_dir_really_tries_and_leaves_nothing(tmp_path):
    assert rio.probe_writable_dir(tmp_path / "new" / "deeper") is None
    assert rio.probe_writable_dir(tmp_path) is None
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("x")
    assert "is a file" in rio.probe_writable_dir(tmp_path / "f" / "sub")
    assert "cannot create" in rio.probe_writable_dir("/proc/nope/run")


@pytest.mark.parametrize("fps", [0.0, -1.0, float("inf"), float("nan"), 1e9, 1000, 1e-6])
def test_write_mp4_refuses_an_unwritable_frame_rate(tmp_path, fps):
    """inf crashed inside the writer (OverflowError) after a whole rollout, 1e9 and 1000 wrote stream rates
    that read back as 0 (ffmpeg tags 1000 as "1k"), below 1e-4 ffmpeg writes no file: one ValueError naming
    the file, and no file."""
    with pytest.raises(ValueError, match=r"fps must be a number in \[0.001, 1000\)"):
        rmp4.write_mp4(tmp_path / "v.mp4", np.zeros((2, 8, 8, 3), np.uint8), fps=fps)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- streamed mp4 (Mp4Writer)


def test_mp4_writer_pieces_equal_one_write(tmp_path):
    """Pieces of a video written one by one give the file that writing it at once gives."""
    g = np.random.default_rng(0)
    video = g.integers(0, 255, (9, 16, 24, 3), dtype=np.uint8)
    once = rmp4.write_mp4(tmp_path / "once.mp4", video, fps=8)
    with rmp4.Mp4Writer(tmp_path / "pieces.mp4", fps=8) as w:
        for piece in (video[:1], video[1:5], video[5:5], video[5:]):
            w.write(piece)
    assert w.frames == 9 and (tmp_path / "pieces.mp4").read_bytes() == once.read_bytes()
    other = rmp4.Mp4Writer(tmp_path / "x.mp4")
    other.write(video[:2])
    with pytest.raises(ValueError, match="frames of 8x24 after frames of 16x24"):
        other.write(video[:, :8])
    other.abort()
    with pytest.raises(ValueError, match="0 frames"):
        rmp4.Mp4Writer(tmp_path / "y.mp4").close()


def test_mp4_frames_sees_a_truncated_file(tmp_path):
    f = rmp4.write_mp4(tmp_path / "a.mp4", np.zeros((6, 16, 16, 3), np.uint8), fps=8)
    assert rmp4.mp4_frames(f) == 6
    data = f.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 40, 5):  # what a killed or starved encoder leaves
        (tmp_path / "t.mp4").write_bytes(data[:cut])
        assert rmp4.mp4_frames(tmp_path / "t.mp4") is None


@pytest.mark.parametrize("found,message", [(None, "no complete file"), (2, "2 of the 3 frames")])
def test_mp4_writer_refuses_an_unfinished_file(tmp_path, monkeypatch, found, message):
    """close() checks the file: an encoder that died before finishing it (a kill -9, the OOM killer) or that
    ended it early (a SIGTERM to the whole job) is an error, so no caller commits it as the video."""
    real = rmp4.mp4_frames
    assert real(rmp4.write_mp4(tmp_path / "ok.mp4", np.zeros((3, 16, 16, 3), np.uint8))) == 3
    monkeypatch.setattr(rmp4, "mp4_frames", lambda path: found)
    w = rmp4.Mp4Writer(tmp_path / "v.mp4", fps=8)
    w.write(np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(RuntimeError, match=message):
        w.close()


def test_mp4_writer_full_disk_is_enospc_naming_the_file(tmp_path, monkeypatch):
    """ffmpeg dying on a full disk reaches Python as a broken pipe: reported as ENOSPC with the file's name."""
    import errno
    import shutil
    from collections import namedtuple

    from resampling_forcing.ffmpeg import Encoder

    def broken(self, frame):  # what a write to a dead ffmpeg's pipe raises
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(Encoder, "write", broken)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    w = rmp4.Mp4Writer(tmp_path / "v.mp4", fps=8)
    with pytest.raises(OSError) as e:
        w.write(np.zeros((3, 16, 16, 3), np.uint8))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "v.mp4") and rio.is_no_space(e.value)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))  # space left: a dead encoder
    w = rmp4.Mp4Writer(tmp_path / "w.mp4", fps=8)
    with pytest.raises(RuntimeError, match=r"w\.mp4: ffmpeg stopped \(exit code -?\d+\) before the video was finished"):
        w.write(np.zeros((3, 16, 16, 3), np.uint8))
    for call in (lambda: w.write(np.zeros((1, 16, 16, 3), np.uint8)), w.close):  # said again, not a bare AttributeError
        with pytest.raises(RuntimeError, match="the encoder failed earlier"):
            call()


def test_mp4_writer_abort_kills_the_encoder_at_once(tmp_path):
    """abort() does not wait for ffmpeg to encode its backlog (a second Ctrl-C stops at once): right after it
    no ffmpeg child of this process is alive (a killed one is at most a zombie)."""
    w = rmp4.Mp4Writer(tmp_path / "v.mp4", fps=8)
    w.write(np.random.default_rng(0).integers(0, 255, (24, 480, 832, 3), dtype=np.uint8))  # seconds of work
    from helpers import ffmpeg_children

    assert any(s in "RSD" for s in ffmpeg_children().values())
    w.abort()
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously: a moment, not the backlog's seconds
    while any(s != "Z" for s in ffmpeg_children().values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(s == "Z" for s in ffmpeg_children().values()), ffmpeg_children()
    f = tmp_path / "v.mp4"  # killed, not finished: no complete file (a graceful close would have written one)
    assert not f.exists() or rmp4.mp4_frames(f) is None


def test_mp4_writer_runs_no_python_between_fork_and_exec(tmp_path):
    """imageio-ffmpeg's preexec_fn made Python run in the forked child before exec: its at-fork hooks and a
    garbage collection there (a PyAV scaler's slice threads' condition variable, which no thread of the
    child can release) hung the writer forever and with it CI. The encoder starts ffmpeg with no Python
    between fork and exec: an at-fork hook that would end the child unfinished never runs."""
    armed = []
    os.register_at_fork(after_in_child=lambda: armed and os._exit(17))  # no-op once disarmed
    armed.append(True)
    try:
        rmp4.write_mp4(tmp_path / "v.mp4", _clip(3), fps=8)
    finally:
        armed.clear()
    assert rmp4.mp4_frames(tmp_path / "v.mp4") == 3


def test_mp4_writer_encoder_has_its_own_process_group(tmp_path):
    """A terminal's Ctrl+C goes to its foreground process group: ffmpeg is outside ours, so only this process
    hears it (and stops after the video in progress) while ffmpeg finishes the file it is writing."""
    from helpers import ffmpeg_children

    with rmp4.Mp4Writer(tmp_path / "v.mp4", fps=8) as w:
        w.write(_clip(2))
        kids = [pid for pid, state in ffmpeg_children().items() if state != "Z"]
        assert kids and all(os.getpgid(pid) != os.getpgid(0) for pid in kids)
    assert rmp4.mp4_frames(tmp_path / "v.mp4") == 2


def test_mp4_writer_interrupted_while_closing_leaves_no_encoder(tmp_path):
    """Ctrl+C while close() waits for ffmpeg's backlog: ffmpeg (in its own session, so the terminal's Ctrl+C
    does not reach it) is killed, not left encoding on its own into a temporary that is being removed."""
    from helpers import ffmpeg_children

    w = rmp4.Mp4Writer(tmp_path / "v.mp4", fps=8)
    w.write(np.random.default_rng(0).integers(0, 255, (24, 480, 832, 3), dtype=np.uint8))  # seconds of work
    proc = w._ffmpeg._proc

    def interrupted(*a, **k):
        del proc.wait  # the real wait from now on (the kill reaps ffmpeg with it)
        raise KeyboardInterrupt

    proc.wait = interrupted
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert all(s == "Z" for s in ffmpeg_children().values()), ffmpeg_children()
    w.abort()  # what a caller's cleanup does next: nothing left to do, no error


def test_read_skips_a_damaged_packet(tmp_path, caplog):
    """One damaged packet (here the last frame's NAL length) costs that frame, not the video (PyAV's
    container-level decode raised on it; ffmpeg's reader, used before, skipped it too), with a warning."""
    import logging

    p = rmp4.write_mp4(tmp_path / "v.mp4", _clip(12), fps=8)
    data = bytearray(p.read_bytes())
    i = data.index(b"stsz") + 4  # version/flags, sample size (0: the sizes follow), count, the sizes
    count = int.from_bytes(data[i + 8:i + 12], "big")
    last = int.from_bytes(data[i + 8 + 4 * count:i + 12 + 4 * count], "big")
    assert data.rindex(b"mdat") < len(data) - last  # faststart: the samples, in order, end the file
    data[len(data) - last:len(data) - last + 4] = b"\xff\xff\xff\xf0"
    p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="resampling_forcing.mp4"):
        video = rmp4.read_mp4(p)
    assert video.shape[0] == 11 and "1 damaged packet(s) skipped" in caplog.text


def test_mp4_writer_arguments(tmp_path):
    """quality outside imageio-ffmpeg's 0..10 scale is refused (it gave a negative crf and a misleading 'no
    complete file'); numpy frame rates are rates."""
    for bad in (11, -1, "9", True):
        with pytest.raises(ValueError, match="quality must be a number in"):
            rmp4.Mp4Writer(tmp_path / "v.mp4", quality=bad)
    p = rmp4.write_mp4(tmp_path / "v.mp4", _clip(3), fps=np.float32(7.5))
    assert rmp4.read_mp4(p, with_fps=True)[1] == 7.5
