import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from resampling_forcing.data import decode as D
from resampling_forcing.data import synthetic as S
from resampling_forcing.data import video as V
from resampling_forcing.mp4 import write_mp4


def _counter_video(n, h=32, w=32):
    """Frame k is flat grey level 8*k (so the decoded level tells which frame was picked)."""
    x = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        x[k] = min(255, 8 * k)
    return x


def _level_to_index(clip):  # clip [3,F,H,W] in [-1,1]
    level = (clip.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [int(round(v / 8)) for v in level.tolist()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vids")
    write_mp4(d / "c16.mp4", _counter_video(24), fps=16)  # 1.5 s at 16 fps
    write_mp4(d / "c8.mp4", _counter_video(12), fps=8)
    v, _ = S.generate_clip(0, frames=20, size=(48, 80))
    write_mp4(d / "wide.mp4", v, fps=8)
    write_mp4(d / "short.mp4", _counter_video(4), fps=8)
    write_mp4(d / "small.mp4", _counter_video(12, 16, 16), fps=8)
    good = (d / "c8.mp4").read_bytes()
    (d / "trunc.mp4").write_bytes(good[: len(good) // 2])
    (d / "junk.mp4").write_bytes(os.urandom(3000))
    (d / "empty.mp4").write_bytes(b"")
    return d


def _manifest(d, names, name="m.jsonl", split=None):
    rows = [{"path": n, "caption": f"cap {n}"} | ({"split": split[i]} if split else {}) for i, n in enumerate(names)]
    p = d / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_clip_shape_range_and_fps_resampling(files):
    m = _manifest(files, ["c16.mp4", "c8.mp4"])
    ds = V.VideoClipDataset(m, num_frames=5, height=32, width=32, fps=8, random_start=False)
    a = ds[0]
    assert a["video"].shape == (3, 5, 32, 32) and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    assert a["caption"] == "cap c16.mp4" and a["index"] == 0
    assert _level_to_index(a["video"]) == [0, 2, 4, 6, 8]  # 16 -> 8 fps: every other frame by timestamp
    assert _level_to_index(ds[1]["video"]) == [0, 1, 2, 3, 4]
    up = V.VideoClipDataset(m, num_frames=6, height=32, width=32, fps=16, random_start=False)
    assert _level_to_index(up[1]["video"]) == [0, 0, 1, 1, 2, 2]  # 8 -> 16 fps repeats frames
    native = V.VideoClipDataset(m, num_frames=9, height=32, width=32, fps=None, random_start=False, start_frame=3)
    assert _level_to_index(native[0]["video"]) == list(range(3, 12))
    # clip length is a parameter (1 + 4k for the Wan VAE, or anything else)
    for n in (1, 9, 13):
        assert V.VideoClipDataset(m, n, 32, 32, fps=16)[0]["video"].shape[1] == n


def test_random_start_is_seeded(files):
    m = _manifest(files, ["c16.mp4"])
    mk = lambda seed: V.VideoClipDataset(m, 5, 32, 32, fps=16, seed=seed)  # noqa: E731
    starts = lambda ds: [_level_to_index(ds[0]["video"])[0] for _ in range(2)]  # noqa: E731
    assert starts(mk(0)) == starts(mk(0))
    seen = set()
    ds = mk(0)
    for e in range(12):
        ds.set_epoch(e)
        idx = _level_to_index(ds[0]["video"])
        assert idx == list(range(idx[0], idx[0] + 5))
        seen.add(idx[0])
    assert len(seen) > 3 and max(seen) <= 24 - 5


def test_resize_short_side_and_center_crop(files):
    m = _manifest(files, ["wide.mp4"])
    ds = V.VideoClipDataset(m, 4, 32, 32, fps=8, random_start=False)
    x = ds[0]["video"]
    assert x.shape == (3, 4, 32, 32)
    # direct check of the transform: a marker at the centre of an 80-wide frame stays centred
    f = np.zeros((1, 48, 80, 3), np.uint8)
    f[0, 20:28, 36:44] = 255
    out = V.resize_center_crop(f, 32, 32)
    col = (out[0, 0] > 0).any(0).nonzero().flatten()
    assert out.shape == (3, 1, 32, 32) and abs(col.float().mean().item() - 15.5) < 1.0
    ds2 = V.VideoClipDataset(m, 4, 24, 40, fps=8, random_start=False)
    assert ds2[0]["video"].shape == (3, 4, 24, 40)


def test_bad_files_are_skipped_counted_and_fall_through(files, caplog):
    names = ["c8.mp4", "trunc.mp4", "junk.mp4", "empty.mp4", "gone.mp4", "short.mp4", "small.mp4", "c16.mp4"]
    m = _manifest(files, names)
    with caplog.at_level(logging.WARNING, logger="resampling_forcing.data"):
        ds = V.VideoClipDataset(m, 5, 32, 32, fps=8, random_start=False)
        items = [ds[i]["index"] for i in range(len(ds))]
        again = [ds[i]["index"] for i in range(len(ds))]
    assert items == [0, 7, 7, 7, 7, 7, 7, 7] == again  # bad rows fall through to the next good one
    bad = ds.bad_files
    assert sum(bad.values()) == 6
    assert bad["empty"] == 1 and bad["missing"] == 1 and bad["too_short"] == 1 and bad["too_small"] == 1
    assert bad.get("corrupt", 0) + bad.get("unreadable", 0) == 2
    lines = [r for r in caplog.records if r.name == "resampling_forcing.data"]
    assert len(lines) == 6  # ONE line per bad file, not per access
    assert all("\n" not in r.getMessage() for r in lines)
    assert "8 videos listed, 6 skipped" in ds.summary() and "too_short: 1" in ds.summary()
    assert ds.try_get(1) is None and ds.try_get(0) is not None
    # pyav backend agrees
    ds2 = V.VideoClipDataset(m, 5, 32, 32, fps=8, random_start=False, backend="pyav")
    assert [ds2[i]["index"] for i in range(len(ds2))] == items
    assert sum(ds2.bad_files.values()) == 6
    # probing up front (headers only) finds all but the half-written file before any access;
    # decoding finds that one
    ds3 = V.VideoClipDataset(m, 5, 32, 32, fps=8, probe=True)
    assert sum(ds3.bad_files.values()) >= 5 and ds3.bad_reason(5) == "too_short"
    assert [ds3[i]["index"] for i in range(len(ds3))] == items
    assert sum(ds3.bad_files.values()) == 6


def test_decord_failure_falls_back_to_pyav(files, monkeypatch):
    m = _manifest(files, ["c8.mp4"])
    ref = V.VideoClipDataset(m, 5, 32, 32, fps=8, random_start=False)[0]["video"]

    def boom(self, *a, **k):
        raise V.BadVideo("corrupt", "simulated decord failure")

    monkeypatch.setattr(V._DecordBackend, "frames", boom)
    ds = V.VideoClipDataset(m, 5, 32, 32, fps=8, random_start=False)
    out = ds[0]["video"]
    assert ds.num_bad == 0
    assert (out - ref).abs().max() < 0.05
    # decord not installed at all: auto uses PyAV
    monkeypatch.setattr(D, "_decord", None)
    monkeypatch.setattr(D, "_decord_checked", True)
    ds = V.VideoClipDataset(m, 5, 32, 32, fps=8, random_start=False)
    assert [type(b).__name__ for b in ds._backends] == ["_PyAVBackend"]
    assert (ds[0]["video"] - ref).abs().max() < 0.05
    with pytest.raises(ValueError, match="decord"):
        V.VideoClipDataset(m, 5, 32, 32, backend="decord")


def test_manifest_errors_are_one_line(files, tmp_path):
    def one_line(excinfo, *words):
        msg = str(excinfo.value)
        assert "\n" not in msg
        for w in words:
            assert w in msg

    with pytest.raises(ValueError) as e:
        V.VideoClipDataset(tmp_path / "nope.jsonl", 5, 32, 32)
    one_line(e, "nope.jsonl", "not found", "path, caption")
    p = tmp_path / "cols.csv"
    p.write_text("file,text\na.mp4,hello\n")
    with pytest.raises(ValueError) as e:
        V.VideoClipDataset(p, 5, 32, 32)
    one_line(e, "cols.csv", "path", "caption")
    p = tmp_path / "keys.jsonl"
    p.write_text(json.dumps({"path": "a.mp4"}) + "\n")
    with pytest.raises(ValueError) as e:
        V.VideoClipDataset(p, 5, 32, 32)
    one_line(e, "keys.jsonl", "caption")
    p = tmp_path / "bad.jsonl"
    p.write_text("{not json\n")
    with pytest.raises(ValueError) as e:
        V.read_manifest(p)
    one_line(e, "bad.jsonl:1")
    p = tmp_path / "none.jsonl"
    p.write_text(json.dumps({"path": "missing.mp4", "caption": "x"}) + "\n")
    with pytest.raises(ValueError) as e:
        V.VideoClipDataset(p, 5, 32, 32)
    one_line(e, "none.jsonl", "no usable video")
    m = _manifest(files, ["c8.mp4"], "sp.jsonl")
    with pytest.raises(ValueError) as e:
        V.VideoClipDataset(m, 5, 32, 32, split="test")
    one_line(e, "sp.jsonl", "split")


def test_csv_manifest_split_and_dataloader(files, tmp_path):
    d = tmp_path / "sub"
    d.mkdir()
    for n in ("c8.mp4", "c16.mp4"):
        shutil.copy(files / n, d / n)
    p = d / "m.csv"
    p.write_text("path,caption,split\nc8.mp4,eight,train\nc16.mp4,\"sixteen, sixteen\",test\n")
    ds = V.VideoClipDataset(p, 5, 32, 32, fps=8, split="test")
    assert len(ds) == 1 and ds[0]["caption"] == "sixteen, sixteen"
    dl = torch.utils.data.DataLoader(V.VideoClipDataset(p, 5, 32, 32, fps=8), batch_size=2)
    batch = next(iter(dl))
    assert batch["video"].shape == (2, 3, 5, 32, 32) and batch["caption"] == ["eight", "sixteen, sixteen"]


def _bad_rows_setup(files, tmp_path, workers=0, batch=2, *extra):
    """A manifest of 7 good videos and 6 bad ones (2 known at open: empty, missing; 4 found when
    decoded), the first row good; TrainData over it (tiny encoders)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_helpers import TINY_YAML

    from resampling_forcing.config import load_config
    from resampling_forcing.data.loader import TrainData
    from resampling_forcing.encoders import build_text_encoder, build_vae

    for k in range(5):
        dst = files / f"c8_{k}.mp4"
        if not dst.exists():
            shutil.copy(files / "c8.mp4", dst)
    names = ["c8.mp4", "trunc.mp4", "c8_0.mp4", "junk.mp4", "empty.mp4", "c8_1.mp4", "short.mp4", "gone.mp4",
             "c8_2.mp4", "small.mp4", "c8_3.mp4", "c16.mp4", "c8_4.mp4"]
    m = _manifest(files, names, name="bad_rows.jsonl")
    cfg = load_config(TINY_YAML, ["data.source=manifest", f"data.manifest={m}", "data.num_frames=5", "model.chunk_frames=1",
                                  f"data.num_workers={workers}", f"train.run_dir={tmp_path / 'run'}", *extra])
    data = TrainData(cfg, batch, vae=build_vae(cfg.encoders), text_encoder=build_text_encoder(cfg.encoders))
    good = {f"cap {n}" for n in names if n.startswith("c")}
    return data, good


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_rows_are_dropped_from_the_epoch_and_counted_once(files, tmp_path, workers, caplog, one_thread,
                                                              monkeypatch, capfd):
    """A bad row is dropped from its micro-batch, never replaced by the next good video (which then
    got several samples per epoch); each bad file is warned about and counted once, also with
    DataLoader workers (the rows a worker found travel back to the main process)."""
    data, good = _bad_rows_setup(files, tmp_path, workers)
    assert data.num_items == 11 and data.per_epoch == 5  # empty + missing left out of the permutation
    reported = []
    note = V.VideoClipDataset.note_bad
    monkeypatch.setattr(V.VideoClipDataset, "note_bad",
                        lambda self, i, reason, detail="": (reported.append(i), note(self, i, reason, detail)))
    with caplog.at_level(logging.WARNING, logger="resampling_forcing.data"):
        for epoch in range(2):
            caps = []
            for pos in range(epoch * data.per_epoch, (epoch + 1) * data.per_epoch):
                b = data.batch(pos)
                if b is not None:
                    assert b["latents"].shape[0] == len(b["caption"]) <= 2
                    caps += b["caption"]
            assert len(caps) == len(set(caps)), f"epoch {epoch}: a video sampled twice: {sorted(caps)}"
            assert set(caps) <= good
            used = {data.dataset.rows[i]["caption"] for p in range(epoch * 5, epoch * 5 + 5) for i in data.indices(p)}
            assert set(caps) == used & good  # every good row of the epoch's order, once
    bad = data.dataset.bad_files
    assert sum(bad.values()) == 6 and "13 videos listed, 6 skipped" in data.summary(), data.summary()
    if workers:
        assert sorted(reported) == sorted(set(reported)) and len(reported) == 4, reported  # each once
    # one warning per bad file, in the main process also with workers (they warned from their own
    # process before, twice when a prefetched batch was discarded)
    warned = [r.getMessage() for r in caplog.records if "skipping video" in r.getMessage()]
    assert len(warned) == 6 and len(set(warned)) == 6, warned
    assert "skipping video" not in capfd.readouterr().err  # no worker process logged on its own


def test_a_micro_batch_of_bad_rows_only_is_skipped(files, tmp_path, one_thread):
    data, good = _bad_rows_setup(files, tmp_path, batch=1)
    out = [data.batch(p) for p in range(data.per_epoch)]
    assert sum(b is None for b in out) == 4  # trunc, junk, short, small: no stand-in
    assert sorted(b["caption"][0] for b in out if b is not None) == sorted(good)
    p, b = data.first_batch(0)
    assert b is not None and data.batch(p)["caption"] == b["caption"]
    assert [q for q, _ in zip(data.iterate(0), range(7))][-1][0] == data.per_epoch - 1


@pytest.mark.parametrize("n, src, fps, want", [
    (10, 30.0, 16.0, 6),    # 30 -> 16 fps: output frames 0..5 show source frames 0, 1, 3, 5, 7, 9
    (10, 8.0, 16.0, 20),    # upsampled: every source frame twice
    (10, 30.0, 29.97, 10),  # NTSC against 30: a clip of exactly 10 frames is not too short
    (12, 16.0, 8.0, 6),
    (1, 30.0, 16.0, 1),
])
def test_available_frames_counts_every_frame_the_source_shows(n, src, fps, want):
    """Output frame k shows the source frame on screen at k / fps; it exists while k / fps < n / src (the
    count was one short whenever the rates differ, and the last source frame was dropped)."""
    got = V.available_frames(n, src, fps)
    assert got == want
    shown = [int(k * src / fps + 1e-6) for k in range(got + 1)]  # source frame at each output time
    assert max(shown[:got]) <= n - 1 < shown[got]  # the next output frame would be past the source's end


def test_manifest_with_a_byte_order_mark(tmp_path, files):
    """Excel's 'CSV UTF-8' export starts with a BOM: the header was read as '\\ufeffpath' and refused."""
    for name, text in (("bom.csv", "path,caption\nc8.mp4,hello\n"),
                       ("bom.jsonl", json.dumps({"path": "c8.mp4", "caption": "hello"}) + "\n")):
        p = files / name
        p.write_text("\ufeff" + text, encoding="utf-8")
        rows = V.read_manifest(p)
        assert [(os.path.basename(r["path"]), r["caption"]) for r in rows] == [("c8.mp4", "hello")]


def test_fixed_batch_with_workers_runs_past_an_epoch(files, tmp_path, one_thread):
    """data.fixed_batch repeats position 0's batch forever; with DataLoader workers the loader covered one
    epoch's positions only and raised StopIteration at position per_epoch (and at once on a resume there)."""
    data, _ = _bad_rows_setup(files, tmp_path, 1, 2, "data.fixed_batch=true")
    first = data.batch(0)["caption"]
    for p in list(range(1, data.per_epoch + 3)) + [5 * data.per_epoch]:  # past the epoch; a resumed position
        assert data.batch(p)["caption"] == first, p


def test_jsonl_caption_with_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw inside a string (valid JSONL);
    str.splitlines() split the line there and the whole manifest was refused as invalid JSON."""
    caps = [f"line one{ch}line two" for ch in ("\u2028", "\u2029", "\x85")] + ["plain"]
    p = tmp_path / "m.jsonl"
    p.write_bytes("".join(json.dumps({"path": f"{k}.mp4", "caption": c}, ensure_ascii=False) + "\r\n"
                          for k, c in enumerate(caps)).encode())
    rows = V.read_manifest(p)
    assert [r["caption"] for r in rows] == caps and [r["row"] for r in rows] == [1, 2, 3, 4]


def test_csv_quoted_captions_keep_newlines(tmp_path):
    """A quoted CSV caption may hold newlines (csv.writer, Excel): they were dropped ("first linesecond
    line"), and U+2028 cut the caption and added a row whose path was the rest of it."""
    import csv

    caps = ["first line\nsecond line", "x\r\ny", "un chat\u2028sur un toit", "last"]
    p = tmp_path / "m.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([f"{k}.mp4", c] for k, c in enumerate(caps))
    rows = V.read_manifest(p)
    assert [(os.path.basename(r["path"]), r["caption"]) for r in rows] == [(f"{k}.mp4", c) for k, c in enumerate(caps)]
