"""Model-free drift measures (eval/pixel.py): each measure equals a plain per-pixel reference on odd
shapes, moves the way its name says on videos made to blur, saturate, darken, freeze or change colour, and
the command line writes its report (also paired with --compare) or refuses bad input in one line."""
import json
import math

import numpy as np
import pytest

from resampling_forcing.eval.pixel import (SEGMENT_MEASURES, color_histogram, frame_measures, hellinger, main,
                                           measure_video)
from resampling_forcing.mp4 import write_mp4


def _reference(frame: np.ndarray) -> dict:
    """One uint8 frame's measures, pixel by pixel."""
    h, w, _ = frame.shape
    rgb = frame.astype(np.float64)  # 0..255
    y = [[0.299 * rgb[i, j, 0] + 0.587 * rgb[i, j, 1] + 0.114 * rgb[i, j, 2] for j in range(w)] for i in range(h)]
    lap = [y[i - 1][j] + y[i + 1][j] + y[i][j - 1] + y[i][j + 1] - 4 * y[i][j]
           for i in range(1, h - 1) for j in range(1, w - 1)]
    m = sum(lap) / len(lap)
    sats = [(max(rgb[i, j]) - min(rgb[i, j])) / max(rgb[i, j]) for i in range(h) for j in range(w) if max(rgb[i, j]) > 0]
    ys = [v for row in y for v in row]
    mean_y = sum(ys) / len(ys)
    rg = [rgb[i, j, 0] - rgb[i, j, 1] for i in range(h) for j in range(w)]
    yb = [0.5 * (rgb[i, j, 0] + rgb[i, j, 1]) - rgb[i, j, 2] for i in range(h) for j in range(w)]

    def sd(v):
        mu = sum(v) / len(v)
        return math.sqrt(sum((x - mu) ** 2 for x in v) / len(v))

    return dict(sharpness=sum((x - m) ** 2 for x in lap) / len(lap), saturation=sum(sats) / len(sats),
                brightness=mean_y, contrast=sd(ys),
                colorfulness=math.hypot(sd(rg), sd(yb)) + 0.3 * math.hypot(sum(rg) / len(rg), sum(yb) / len(yb)))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 9, 4), (4, 3, 3)])
def test_measures_equal_the_per_pixel_reference(shape):
    f, h, w = shape
    rng = np.random.default_rng(sum(shape))
    video = rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
    video[0, 0, 0] = 0  # a black pixel: no saturation there
    got = frame_measures(video)
    for t in range(f):
        want = _reference(video[t])
        for k, v in want.items():
            assert got[k][t] == pytest.approx(v, rel=1e-5, abs=1e-4), (k, t)
    y = video.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert math.isnan(got["motion"][0]) and math.isnan(got["flicker"][0])
    for t in range(1, f):
        assert got["motion"][t] == pytest.approx(np.abs(y[t] - y[t - 1]).mean(), rel=1e-5)
        assert got["flicker"][t] == pytest.approx(abs(y[t].mean() - y[t - 1].mean()), rel=1e-5, abs=1e-4)


def test_histogram_and_hellinger():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    h = color_histogram(a)
    want = np.zeros(512)
    for px in a.reshape(-1, 3):
        r, g, b = (int(c) * 8 // 256 for c in px)
        want[(r * 8 + g) * 8 + b] += 1
    np.testing.assert_allclose(h, want / want.sum())
    assert hellinger(h, h) == pytest.approx(0.0, abs=1e-7)
    black, white = color_histogram(np.zeros((1, 2, 2, 3), np.uint8)), color_histogram(np.full((1, 2, 2, 3), 255, np.uint8))
    assert hellinger(black, white) == pytest.approx(1.0)


def _textured(f=24, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (h, w, 3)).astype(np.float64)
    return np.stack([np.roll(base, t, axis=1) for t in range(f)])  # a moving texture


def _blur(img, k):
    out = img.copy()
    for _ in range(k):
        out = (out + np.roll(out, 1, 0) + np.roll(out, -1, 0) + np.roll(out, 1, 1) + np.roll(out, -1, 1)) / 5
    return out


def test_each_measure_moves_the_way_its_name_says():
    v = _textured()
    seg = 8
    blurred = np.stack([_blur(v[t], t // seg * 2) for t in range(len(v))])
    r = measure_video(blurred.clip(0, 255).astype(np.uint8), seg)
    assert r["drift"]["sharpness"] < 0.3  # blur: the last segment far less sharp
    grey = v.mean(axis=-1, keepdims=True)
    sat = np.stack([grey[t] + (v[t] - grey[t]) * (1 + t // seg) for t in range(len(v))]).clip(0, 255).astype(np.uint8)
    r = measure_video(sat, seg)
    assert r["drift"]["saturation"] > 1.5 and r["drift"]["colorfulness"] > 1.5 and r["segments"][2]["color_drift"] > 0.2
    dark = np.stack([v[t] * (1 - 0.3 * (t // seg)) for t in range(len(v))]).astype(np.uint8)
    r = measure_video(dark, seg)
    assert r["drift"]["brightness"] < -25 and r["segments"][1]["flicker"] > 0  # a step at the segment border
    frozen = np.concatenate([v[:seg], np.repeat(v[seg:seg + 1], len(v) - seg, axis=0)]).astype(np.uint8)
    r = measure_video(frozen, seg)
    assert r["segments"][0]["motion"] > 2 and r["segments"][2]["motion"] == 0 and r["drift"]["motion"] == 0
    steady = measure_video(v.astype(np.uint8), seg)
    assert all(abs(steady["drift"][m] - 1) < 0.05 for m in ("sharpness", "saturation", "colorfulness", "contrast"))
    assert steady["segments"][2]["color_drift"] < 0.05 and set(steady["segments"][0]) >= set(SEGMENT_MEASURES)


def test_cli_report_compare_and_one_line_errors(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    v = _textured(f=16, h=16, w=16)
    for name, seed in (("x.mp4", 0), ("y.mp4", 1)):
        write_mp4(a / name, _textured(f=16, h=16, w=16, seed=seed).astype(np.uint8), fps=8)
        dim = np.stack([v[t] * (1 - 0.04 * t) for t in range(16)]) if name == "x.mp4" else v
        write_mp4(b / name, dim.astype(np.uint8), fps=8)
    out = tmp_path / "r.json"
    assert main([str(a), "--segment-seconds", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["videos"]) == 2 and rep["videos"][0]["segment_frames"] == 8
    assert rep["summary"]["sharpness"][0]["n"] == 2
    assert main([str(a), "--compare", str(b), "--segment-frames", "8", "--out", str(out), "--overwrite"]) == 0
    rep = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    d = rep["difference"]["brightness"]
    assert len(d) == 2 and d[0]["n"] == 2 and "p" in d[0]
    x_a, x_b = (next(r for r in rep[k] if r["video"].endswith("x.mp4")) for k in ("videos", "compare_videos"))
    assert x_a["segments"][1]["brightness"] > x_b["segments"][1]["brightness"] + 10  # b's x darkens
    assert d[1]["mean"] > 0
    capsys.readouterr()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.mp4").write_bytes(b"not a video")
    write_mp4(tmp_path / "c" / "y.mp4", v.astype(np.uint8), fps=8)
    # one corrupt video is skipped with a warning and listed, not a crash; its pair goes with it
    assert main([str(a), "--compare", str(tmp_path / "c"), "--segment-frames", "8",
                 "--out", str(out), "--overwrite"]) == 0
    rep = json.loads(out.read_text())
    assert [s["video"] for s in rep["skipped"]] == [str(tmp_path / "c" / "x.mp4")]
    assert rep["difference"]["brightness"][0]["n"] == 1 and len(rep["videos"]) == 1
    assert "warning: skipped" in capsys.readouterr().err
    for args, words in (([str(tmp_path / "nope")], "no such file or folder"),
                        ([str(a), "--segment-frames", "0"], "--segment-frames must be >= 1"),
                        ([str(a), "--segment-seconds", "nan"], "--segment-seconds must be a number > 0"),
                        ([str(a), "--segment-seconds", "1", "--segment-frames", "4"], "both give the segment length"),
                        ([str(tmp_path / "c" / "x.mp4")], "no readable video"),
                        ([str(a), "--compare", str(b / "x.mp4")], "no video named y.mp4 there"),
                        ([str(a), str(a / "x.mp4"), "--compare", str(b)], "videos: two videos named x.mp4")):
        assert main([*args, "--out", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after a skipped file's warning)
        assert words in err, (args, err)
    assert not (tmp_path / "bad.json").exists()


def test_known_values_and_degenerate_videos():
    red = np.zeros((1, 4, 5, 3), np.uint8)
    red[..., 0] = 255
    m = frame_measures(red)
    assert m["colorfulness"][0] == pytest.approx(0.3 * math.hypot(255, 127.5))  # Hasler & Suesstrunk on 0..255
    assert m["saturation"][0] == 1 and m["brightness"][0] == pytest.approx(0.299 * 255, rel=1e-6)
    assert m["sharpness"][0] == 0 and m["contrast"][0] == 0 and math.isnan(m["motion"][0])
    black = measure_video(np.zeros((5, 4, 4, 3), np.uint8), 2)
    assert black["segments"][0]["saturation"] is None and black["segments"][0]["brightness"] == 0
    assert black["drift"]["sharpness"] is None  # 0 -> 0: no ratio
    tiny = measure_video(np.full((3, 2, 2, 3), 9, np.uint8), 8)  # under 3 x 3 pixels: no Laplacian
    assert tiny["segments"][0]["sharpness"] is None and len(tiny["segments"]) == 1
    assert all(v is None for v in tiny["drift"].values())  # one segment: nothing to compare
    one = measure_video(np.full((1, 4, 4, 3), 9, np.uint8), 4)
    assert one["segments"][0]["motion"] is None and one["num_frames"] == 1


def test_a_short_last_piece_joins_the_segment_before_it():
    v = _textured(f=81, h=8, w=8).astype(np.uint8)
    r = measure_video(v, 40)  # 40 + 40 + 1: the one-frame piece is not a segment of its own
    assert [(s["start"], s["stop"]) for s in r["segments"]] == [(0, 40), (40, 81)]
    assert [(s["start"], s["stop"]) for s in measure_video(v, 30)["segments"]] == [(0, 30), (30, 60), (60, 81)]
    r = measure_video(v, 80)
    assert [(s["start"], s["stop"]) for s in r["segments"]] == [(0, 81)] and r["drift"]["motion"] is None
    want = color_histogram(v[40:81])  # the joined segment's histogram counts every frame of it
    assert measure_video(v, 40)["segments"][1]["color_drift"] == pytest.approx(
        hellinger(color_histogram(v[:40]), want), abs=1e-6)


@pytest.mark.parametrize("block", [1, 5, 32])
def test_streamed_blocks_equal_the_whole_video(block):
    from resampling_forcing.eval.pixel import measure_blocks

    v = _textured(f=23, h=9, w=11, seed=3).astype(np.uint8)
    whole = measure_video(v, 7)
    assert measure_blocks((v[a:a + block] for a in range(0, 23, block)), 7) == whole


def test_iter_mp4_blocks_join_to_the_whole_video(tmp_path):
    """mp4.iter_mp4 in blocks of 1, 3, F and F + 1 frames gives read_mp4's frames and fps; an unreadable file is
    a VideoReadError naming it."""
    from resampling_forcing.mp4 import VideoReadError, iter_mp4, read_mp4

    path = tmp_path / "v.mp4"
    write_mp4(path, _textured(f=10, h=16, w=16).astype(np.uint8), fps=8)
    whole, fps = read_mp4(path, with_fps=True)
    assert whole.shape[0] == 10
    for block in (1, 3, 10, 11):
        got_fps, blocks = iter_mp4(path, block)
        parts = list(blocks)
        assert got_fps == fps and all(p.shape[0] <= block for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="bad.mp4: cannot decode video"):
        list(iter_mp4(bad)[1])
    with pytest.raises(ValueError, match="block=0"):
        iter_mp4(path, 0)
