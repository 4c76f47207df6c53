"""Clips are read as a player shows the file: frames picked by presentation timestamp (variable
frame rate), an MP4 edit list's hidden frames left out (``ffmpeg -ss X -c copy``), the display
rotation of portrait phone videos applied, non-square pixels resized to their displayed shape;
decord and PyAV give the same frames, and constant-rate files the same frames as before
(``floor(t * src_fps)``)."""
import fractions
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from resampling_forcing.data import decode as D
from resampling_forcing.data import video as V
from resampling_forcing.mp4 import write_mp4

HAVE_DECORD = D._get_decord() is not None
BACKENDS = ["pyav", "auto", pytest.param("decord", marks=pytest.mark.skipif(not HAVE_DECORD, reason="decord absent"))]
STEP = 4  # frame k of a counter video is flat grey level STEP * k


def _ffmpeg(*args):
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *map(str, args)], check=True)


def _counter(n, h=32, w=32):
    return np.stack([np.full((h, w, 3), STEP * k, np.uint8) for k in range(n)])


def _levels(clip):  # clip [3, F, H, W] in [-1, 1] -> source frame index of each output frame
    return [int(round(v / STEP)) for v in ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()]


def _dataset(d, name, *args, **kw):
    m = d / f"m_{name}.jsonl"
    m.write_text(json.dumps({"path": name, "caption": name}) + "\n")
    return V.VideoClipDataset(m, *args, random_start=False, **kw)


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("timing")
    for fps in (24, 25, 30000 / 1001, 60):  # constant rate
        write_mp4(d / f"cfr{fps:.2f}.mp4", _counter(60), fps=fps)
    _ffmpeg("-i", d / "cfr24.00.mp4", "-c", "copy", d / "cfr24.mkv")  # 1 ms time base: 42, 83, 125 ms ...
    # variable rate: frames 0-19 at 10 fps (0-2 s), frames 20-59 at 40 fps (2-3 s)
    import av

    with av.open(str(d / "vfr.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.time_base = s.codec_context.time_base = fractions.Fraction(1, 1000)
        s.options = {"crf": "0"}
        for k, t in enumerate([100 * k for k in range(20)] + [2000 + 25 * k for k in range(40)]):
            fr = av.VideoFrame.from_ndarray(_counter(k + 1)[k], format="rgb24")
            fr.pts, fr.time_base = t, fractions.Fraction(1, 1000)
            c.mux(s.encode(fr))
        c.mux(s.encode())
    # cut at 0.5 s without re-encoding (mid-GOP: an MP4 edit list hides source frames 0-11)
    write_mp4(d / "src24.mp4", _counter(60), fps=24)
    _ffmpeg("-ss", "0.5", "-i", d / "src24.mp4", "-c", "copy", d / "cut.mp4")
    # landscape pixels with a display rotation (a portrait phone video): red top, green left, blue corner
    x = np.zeros((4, 48, 64, 3), np.uint8)
    x[:, :8, :, 0] = 255
    x[:, :, :8, 1] = 255
    x[:, -12:, -16:, 2] = 255
    write_mp4(d / "land.mp4", x, fps=8)
    for r in (90, 180, 270):
        _ffmpeg("-display_rotation", r, "-i", d / "land.mp4", "-c", "copy", d / f"rot{r}.mp4")
    # mirrored (a front camera's video, tagged rather than re-encoded), alone and with a quarter turn
    for name, flags in (("hflip", ["-display_hflip"]), ("vflip", ["-display_vflip"]),
                        ("rot90h", ["-display_rotation", "90", "-display_hflip"]),
                        ("rot270v", ["-display_rotation", "270", "-display_vflip"])):
        _ffmpeg(*flags, "-i", d / "land.mp4", "-c", "copy", d / f"{name}.mp4")
    # non-square pixels: 64x48 stored, SAR 2:1 (shown 128x48); a green band at stored columns 24-39
    x = np.zeros((4, 48, 64, 3), np.uint8)
    x[:, :, 24:40, 1] = 255
    write_mp4(d / "square.mp4", x, fps=8)
    _ffmpeg("-i", d / "square.mp4", "-vf", "setsar=2", "-c:v", "libx264", "-crf", "5", d / "sar2.mp4")
    return d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, src", [("cfr24.00.mp4", 24), ("cfr25.00.mp4", 25), ("cfr29.97.mp4", 30000 / 1001),
                                       ("cfr60.00.mp4", 60), ("cfr24.mkv", 24)])
def test_constant_rate_files_pick_the_frames_they_picked_before(vids, name, src, backend):
    """Timestamps change nothing at a constant rate: output frame k is source frame floor(t * src_fps)."""
    be = {"decord": D._DecordBackend, "pyav": D._PyAVBackend}.get(backend)
    if be is not None:  # evenly spaced (the mkv to within its 1 ms rounding): the index formula, as before
        assert be().info(str(vids / name)).times is None
    avail = math.ceil(60 * 16 / src - 1e-6)
    for start in (0, 3, 7, 1000):
        ds = _dataset(vids, name, 9, 32, 32, fps=16, start_frame=start, backend=backend)
        s = min(start, avail - 9)
        assert _levels(ds[0]["video"]) == [math.floor((s + k) * src / 16 + 1e-6) for k in range(9)], start
        assert ds.num_bad == 0
    with pytest.raises(ValueError, match="too_short"):  # one frame more than the source lasts
        _dataset(vids, name, avail + 1, 32, 32, fps=16, backend=backend, probe=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_rate_is_resampled_by_timestamp(vids, backend):
    """Frames 0-19 at 10 fps, then 20-59 at 40 fps (3 s): at 8 fps each output frame shows the frame
    on screen at k / 8 s. By index at the average rate (19.9 fps) the first 2 s played about twice as
    fast and the last second half as fast."""
    ds = _dataset(vids, "vfr.mp4", 24, 32, 32, fps=8, backend=backend)
    want = [min(int(k / 8 / 0.1 + 1e-9), 19) if k < 16 else 20 + int((k / 8 - 2) / 0.025 + 1e-9) for k in range(24)]
    assert want[:6] == [0, 1, 2, 3, 5, 6] and want[16:19] == [20, 25, 30]
    assert _levels(ds[0]["video"]) == want
    assert ds.num_bad == 0
    with pytest.raises(ValueError, match="too_short"):  # 3 s at 8 fps: 24 frames, not 25
        _dataset(vids, "vfr.mp4", 25, 32, 32, fps=8, backend=backend, probe=True)
    native = _dataset(vids, "vfr.mp4", 60, 32, 32, fps=None, backend=backend)  # fps=None: every source frame
    assert _levels(native[0]["video"]) == list(range(60))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_list_cut_shows_the_frames_a_player_shows(vids, backend):
    """`ffmpeg -ss 0.5 -c copy` keeps the GOP's earlier frames behind an MP4 edit list: a player shows
    source frames 12-59 (48). decord counted 60 and seeked inconsistently; PyAV decoded 48 of the
    60 its header announced and dropped the file as corrupt when a clip reached past frame 47."""
    for start in (0, 10, 18, 25, 30, 31, 100):  # the last start is 48 - 17 = 31
        ds = _dataset(vids, "cut.mp4", 17, 32, 32, fps=None, start_frame=start, backend=backend)
        s = min(start, 31)
        assert _levels(ds[0]["video"]) == list(range(12 + s, 12 + s + 17)), start
        assert ds.num_bad == 0
    ds = _dataset(vids, "cut.mp4", 9, 32, 32, fps=16, start_frame=1000, backend=backend)  # 2 s at 16 fps: 32
    assert _levels(ds[0]["video"]) == [12 + (23 + k) * 3 // 2 for k in range(9)]
    with pytest.raises(ValueError, match="too_short"):
        _dataset(vids, "cut.mp4", 49, 32, 32, fps=None, backend=backend, probe=True)


def _shown(path, h, w):
    """The first frame as ffmpeg (a player) displays it, in [-1, 1]."""
    import imageio_ffmpeg

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3).astype(np.float32) / 127.5 - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rot", [90, 180, 270])
def test_rotated_phone_videos_are_upright(vids, rot, backend):
    """A display matrix turns stored landscape pixels into the portrait video a player shows. decord
    failed on 90/270 (size mismatch); PyAV trained the stored frame sideways (upside down at 180), and
    a portrait target called the file too small."""
    h, w = (64, 48) if rot != 180 else (48, 64)
    ds = _dataset(vids, f"rot{rot}.mp4", 1, h, w, max_upscale=1.0, backend=backend)  # the displayed size
    clip = ds[0]["video"][:, 0].permute(1, 2, 0).numpy()
    assert ds.num_bad == 0
    assert np.abs(clip - _shown(vids / f"rot{rot}.mp4", h, w)).max() < 0.05
    red_side = {90: (slice(None), slice(0, 4)), 180: (slice(-4, None), slice(None)), 270: (slice(None), slice(-4, None))}
    assert clip[red_side[rot] + (0,)].mean() > 0.9  # the red bar: left, bottom, right


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["hflip", "vflip", "rot90h", "rot270v"])
def test_mirrored_videos_are_shown_as_a_player_shows_them(vids, name, backend):
    """A display matrix with a mirror: the training clip and mp4.read_mp4 show what ffmpeg shows. PyAV's
    rotation angle alone turned a horizontal mirror into a half turn (upside down) and ignored a vertical
    one."""
    from resampling_forcing.mp4 import read_mp4

    h, w = (64, 48) if name.startswith("rot") else (48, 64)
    shown = _shown(vids / f"{name}.mp4", h, w)
    ds = _dataset(vids, f"{name}.mp4", 1, h, w, max_upscale=1.0, backend=backend)
    clip = ds[0]["video"][:, 0].permute(1, 2, 0).numpy()
    assert ds.num_bad == 0 and np.abs(clip - shown).max() < 0.05
    assert np.array_equal(read_mp4(vids / f"{name}.mp4")[0], np.round((shown + 1) * 127.5).astype(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_square_pixels_keep_the_displayed_aspect(vids, backend):
    """64x48 stored with a 2:1 sample aspect ratio is shown 128x48: cropped to 96x48 it needs no
    upscaling and the green band (stored columns 24-39, shown 48-79) is 32 wide at columns 32-63. By
    the stored pixels it was called too small (1.5x upscaling) or squeezed to half its width."""
    ds = _dataset(vids, "sar2.mp4", 1, 48, 96, max_upscale=1.0, backend=backend)
    band = (ds[0]["video"][1, 0] > 0).float().mean(0).numpy() > 0.5  # green columns
    cols = np.flatnonzero(band)
    assert ds.num_bad == 0
    assert abs(cols.min() - 32) <= 1 and abs(cols.max() - 63) <= 1, cols
    square = _dataset(vids, "square.mp4", 1, 48, 96, max_upscale=1.0, backend=backend)  # square pixels: too small
    assert square.try_get(0) is None and square.bad_reason(0) == "too_small"


def test_a_file_decord_declined_goes_straight_to_pyav_next_time(vids, monkeypatch):
    """Once a file was read with PyAV (decord declined a rotation), later loads start there: decord is not
    opened again per epoch (it and a PyAV look at the first frame cost ~0.1-0.2 s per 480p file)."""
    if not V._backends("auto") or not isinstance(V._backends("auto")[0], V._DecordBackend):
        pytest.skip("decord is not installed: every file is read with PyAV anyway")
    opens = []
    real = V._DecordBackend.open
    monkeypatch.setattr(V._DecordBackend, "open", lambda self, path: opens.append(path) or real(self, path))
    ds = _dataset(vids, "rot90.mp4", 1, 64, 48, max_upscale=1.0, backend="auto")
    first = ds[0]["video"]
    n = len(opens)
    assert n >= 1 and torch.equal(ds[0]["video"], first) and len(opens) == n


@pytest.mark.parametrize("name", ["rot90.mp4", "sar2.mp4", "vfr.mp4"])
def test_init_videos_are_read_as_the_training_clips(vids, name):
    """The sampler's --init-video / init_video= reads a file as the training clips do (it went through
    imageio: non-square pixels came in squashed and a variable frame rate was resampled by index; the
    rotation case guards what ffmpeg's autorotation already gave)."""
    from resampling_forcing.encoders import PixelShuffleVAE
    from resampling_forcing.pipeline.inputs import video_clip

    h, w = {"rot90.mp4": (64, 48), "sar2.mp4": (48, 64), "vfr.mp4": (32, 32)}[name]
    clip, info = video_clip(vids / name, PixelShuffleVAE(1), h, w, chunk_frames=1, fps=8.0)
    frame = clip[0, :, 0].permute(1, 2, 0)
    if name == "rot90.mp4":
        assert float((frame - torch.from_numpy(_shown(vids / name, h, w))).abs().max()) < 0.05
    elif name == "sar2.mp4":  # shown 128x48: the stored 16-column band is 32 columns wide (16 when squashed)
        band = (frame[:, :, 1].mean(0) > 0).nonzero().flatten()
        assert 30 <= len(band) <= 34 and abs(float(band.float().mean()) - 31.5) < 1.5, band
    else:  # 0.1 s per frame for 2 s, then 0.025 s: the frame on screen at k / 8 s
        times = [0.1 * j for j in range(20)] + [2 + 0.025 * j for j in range(40)]
        want = [max(j for j, t in enumerate(times) if t <= k / 8 + 5e-4) for k in range(info["frames_in"])]
        assert _levels(clip[0]) == want[-clip.shape[2]:]
