import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from resampling_forcing.data import synthetic as S
from resampling_forcing.data import synthetic_dataset as SD
from resampling_forcing.mp4 import read_mp4


def test_deterministic_and_long_clips_continue_short_ones():
    a, ma = S.generate_clip(7, frames=24)
    b, mb = S.generate_clip(7, frames=24)
    np.testing.assert_array_equal(a, b)
    assert ma == mb
    long, ml = S.generate_clip(7, frames=400)  # far longer than a training clip
    np.testing.assert_array_equal(long[:24], a)
    assert ml["frames"][:24] == ma["frames"]
    c, _ = S.generate_clip(8, frames=24)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [32, 64, (48, 80)])
def test_frames_objects_and_metadata(size):
    h, w = (size, size) if isinstance(size, int) else size
    for seed in range(6):
        v, m = S.generate_clip(seed, frames=30, size=size, max_objects=2, shapes=S.SHAPES)
        assert v.shape == (30, h, w, 3) and v.dtype == np.uint8
        objs = m["objects"]
        assert 1 <= len(objs) <= 2
        assert len({o["color"] for o in objs}) == len(objs)  # colours are distinct in a scene
        assert S.parse_caption(m["caption"]) == [(o["color"], o["shape"]) for o in objs]
        assert m["prompt"] == m["caption"] and m["num_frames"] == 30
        # dark clean background: most pixels are exactly the background colour
        bg = (v == np.array(S.BACKGROUND, np.uint8)).all(-1).mean()
        assert bg > 0.6
        for t in (0, 29):
            for o in m["frames"][t]:
                x, y = o["center"]
                r = o["size"]
                assert r - 1e-6 <= x <= w - 1 - r + 1e-6 and r - 1e-6 <= y <= h - 1 - r + 1e-6
                # the object's colour is there, around its centre
                px = v[t, int(round(y)), int(round(x))]
                assert tuple(px) == tuple(S.PALETTE[o["color"]])


def test_physics_constant_speed_and_walls():
    scene = S.sample_scene(np.random.default_rng(3), size=32, objects=[("red", "circle"), ("blue", "square")])
    pos, vel = S.simulate(scene, 1000)
    speed = np.linalg.norm(vel, axis=-1)
    np.testing.assert_allclose(speed, speed[:1].repeat(1000, 0), rtol=1e-9)  # never slows, never stops
    for k, o in enumerate(scene.objects):
        assert (pos[:, k] >= o.size - 1e-9).all() and (pos[:, k] <= 31 - o.size + 1e-9).all()
    # straight lines between bounces: zero acceleration where the velocity did not change
    steady = ((vel[:-2] == vel[1:-1]) & (vel[1:-1] == vel[2:])).all(-1).all(-1)  # [F-2]
    acc = pos[2:] - 2 * pos[1:-1] + pos[:-2]
    assert steady.sum() > 500
    assert np.abs(acc[steady]).max() < 1e-9
    assert (np.sign(vel[1:]) != np.sign(vel[:-1])).any()  # it does bounce


def test_rendered_centroid_matches_metadata():
    v, m = S.generate_clip(11, frames=10, size=64, caption="a green circle bouncing")
    col = np.array(S.PALETTE["green"], np.float32)
    bg = np.array(S.BACKGROUND, np.float32)
    ys, xs = np.mgrid[0:64, 0:64]
    for t in range(10):
        cov = ((v[t].astype(np.float32) - bg) @ (col - bg)) / ((col - bg) @ (col - bg))
        cov = np.clip(cov, 0, 1)
        cx, cy = (cov * xs).sum() / cov.sum(), (cov * ys).sum() / cov.sum()
        assert math.hypot(cx - m["frames"][t][0]["center"][0], cy - m["frames"][t][0]["center"][1]) < 0.1


def test_captions_round_trip():
    assert S.make_caption([("red", "circle")]) == "a red circle bouncing"
    cap = S.make_caption([("red", "circle"), ("blue", "square")])
    assert cap == "a red circle and a blue square bouncing"
    assert S.parse_caption(cap) == [("red", "circle"), ("blue", "square")]
    assert S.parse_caption("Two things: a YELLOW Triangle, a green squares") == [("yellow", "triangle"), ("green", "square")]
    assert S.parse_caption("a dog running") == []
    scene = S.scene_from_caption("a blue triangle and a red square bouncing", seed=1, size=64)
    assert [(o.color, o.shape) for o in scene.objects] == [("blue", "triangle"), ("red", "square")]
    with pytest.raises(ValueError):
        S.scene_from_caption("nothing here")


def test_held_out_combos_keep_every_single_pair_in_training():
    held = SD.held_out_combos(fraction=0.2, seed=0)
    assert held and all(len(c) == 2 for c in held)
    train_pairs = {p for c in SD.all_combos(S.DEFAULT_COLORS, S.DEFAULT_SHAPES, 2) if c not in held for p in c}
    assert train_pairs == {(c, s) for c in S.DEFAULT_COLORS for s in S.DEFAULT_SHAPES}
    assert SD.held_out_combos(fraction=0.0) == []


def test_make_dataset_split_manifest_and_resume(tmp_path):
    out = tmp_path / "ds"
    manifest = SD.make_dataset(out, num_videos=10, frames=9, size=32, fps=8, seed=0, held_out_fraction=0.2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 10
    info = json.loads((out / "dataset.json").read_text())
    held = {S.combo_key(map(tuple, c)) for c in info["held_out_combos"]}
    splits = [r["split"] for r in rows]
    assert splits.count("test") == 2 and set(splits) == {"train", "test"}
    for r in rows:
        key = S.combo_key(S.parse_caption(r["caption"]))
        assert (key in held) == (r["split"] == "test")
        mp4 = out / r["path"]
        v = read_mp4(mp4)
        assert v.shape == (9, 32, 32, 3)
        meta = json.loads(mp4.with_suffix(".json").read_text())
        assert meta["prompt"] == r["caption"] and len(meta["frames"]) == 9 and meta["split"] == r["split"]
    assert len(info["held_out_captions"]) == len(held)

    # idempotent: nothing is rewritten; a missing file is regenerated identically
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    gone = out / "videos" / "000003.mp4"
    data = gone.read_bytes()
    gone.unlink()
    SD.make_dataset(out, num_videos=10, frames=9, size=32, fps=8, seed=0, held_out_fraction=0.2)
    now = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    changed = {k for k in now if now[k] != mtimes.get(k)}
    assert changed == {"000003.mp4", "000003.json"}
    assert gone.read_bytes() == data
    assert [p.name for p in out.rglob(".*")] == [SD.RENDER_LOCK]  # no temp files; the renderers' lock file
    # other arguments -> the recipe differs -> the file is rendered again
    SD.make_dataset(out, num_videos=2, frames=12, size=32, fps=8, seed=0, held_out_fraction=0.2)
    assert read_mp4(out / "videos" / "000000.mp4").shape[0] == 12


def test_make_dataset_removes_a_killed_renderers_temporaries(tmp_path):
    out = tmp_path / "ds"
    SD.make_dataset(out, num_videos=2, frames=4, size=16, seed=0)
    # what SIGTERM / kill -9 during write_mp4 and the manifest write leave (atomic_path's names)
    stale = [out / "videos" / ".000001.ab12cd34.tmp.mp4", out / ".manifest.x1y2z3w4.tmp.jsonl"]
    for p in stale:
        p.write_bytes(b"half")
    keep = out / "videos" / ".notes"  # not a temporary's name: left alone
    keep.write_text("mine")
    SD.make_dataset(out, num_videos=2, frames=4, size=16, seed=0)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_make_dataset_waits_for_another_renderer(tmp_path, caplog):
    import logging
    import threading
    import time

    from resampling_forcing.io import folder_lock

    out = tmp_path / "ds"
    done = threading.Event()
    errors = []

    def render():
        try:
            SD.make_dataset(out, num_videos=2, frames=4, size=16, seed=0)
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)
        done.set()

    with caplog.at_level(logging.WARNING, logger="resampling_forcing.io"):
        with folder_lock(out, SD.RENDER_LOCK, "test holds it"):
            worker = threading.Thread(target=render, daemon=True)  # a hang fails the test, not the run
            worker.start()
            deadline = time.monotonic() + 60
            while "another process is rendering" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "another process is rendering" in caplog.text  # it saw the lock and waits
            assert not done.is_set() and not (out / "manifest.jsonl").exists()
            assert not list((out / "videos").glob("*.mp4"))  # and wrote nothing meanwhile
        worker.join(120)
    assert done.is_set() and not errors
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2


def test_make_dataset_in_a_run_folder_and_a_complete_set_untouched(tmp_path):
    """The data folder may be the run folder, whose RUN/.lock the trainer holds (a shared lock name
    deadlocked); a complete data set is not rewritten (read-only data, a trainer reading it)."""
    import threading

    from resampling_forcing.training_utils import RunLock

    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    worker = threading.Thread(target=SD.make_dataset, args=(run,), kwargs=dict(num_videos=2, frames=4, size=16),
                              daemon=True)
    worker.start()
    worker.join(120)
    alive = worker.is_alive()
    lock.release()
    assert not alive and (run / "manifest.jsonl").is_file()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    SD.make_dataset(run, num_videos=2, frames=4, size=16)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_folder_of_somebody_elses_videos_is_refused_untouched(tmp_path):
    """data.synthetic_dir pointed at a user's own data set (a manifest the renderer did not write): refused,
    nothing rewritten (it replaced the manifest and the videos); a synthetic set killed between its info
    file and its manifest is still resumed."""
    from resampling_forcing.config import load_config
    from resampling_forcing.data.loader import DataError, synthetic_manifest

    mine = tmp_path / "mine"
    (mine / "videos").mkdir(parents=True)
    (mine / "manifest.jsonl").write_text('{"path": "videos/000000.mp4", "caption": "my cat"}\n')
    (mine / "videos" / "000000.mp4").write_bytes(b"my precious video")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="did not write"):
        SD.make_dataset(mine, num_videos=2, frames=4, size=16)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [f"data.synthetic_dir={mine}"])
    with pytest.raises(DataError, match=r"data.synthetic_dir: .* did not write \(no dataset.json\)"):
        synthetic_manifest(cfg)
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before
    ours = tmp_path / "ours"
    SD.make_dataset(ours, num_videos=2, frames=4, size=16)
    (ours / "manifest.jsonl").unlink()  # killed after the info file, before the manifest
    SD.make_dataset(ours, num_videos=2, frames=4, size=16)
    assert (ours / "manifest.jsonl").is_file()


def test_folder_lock_goes_on_unlocked_where_no_lock_can_be_had(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from resampling_forcing import io as rio

    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))
    with rio.folder_lock(tmp_path, ".x.lock", "busy") as locked:  # read-only folder, or another user's file
        assert locked is False
    monkeypatch.setattr(os, "open", real_open)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # NFS without its lock service
    with rio.folder_lock(tmp_path, ".x.lock", "busy") as locked:
        assert locked is False
    assert "no file locks here" in caplog.text
    monkeypatch.undo()
    stale = tmp_path / "videos" / ".000000.ab12cd34.tmp.mp4"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    SD.make_dataset(tmp_path, num_videos=1, frames=4, size=16)  # renders, but removes no temporary unlocked
    assert stale.exists() and (tmp_path / "manifest.jsonl").is_file()


def test_ctrl_c_while_rendering_stops_after_the_video_in_progress(tmp_path, monkeypatch):
    """A SIGINT is a flag while rendering (a KeyboardInterrupt raised in the parent's after-fork hooks of an
    ffmpeg writer was dropped by CPython): the video in progress is finished, then KeyboardInterrupt."""
    import signal

    from resampling_forcing import mp4 as rmp4

    real, calls = rmp4.write_mp4, []

    def write_mp4(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while video 1 is being written
        return real(path, *a, **k)

    monkeypatch.setattr(rmp4, "write_mp4", write_mp4)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        SD.make_dataset(out, num_videos=5, frames=4, size=16)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000.json", "000000.mp4", "000001.json",
                                                                  "000001.mp4"]  # whole, no temporaries
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    SD.make_dataset(out, num_videos=5, frames=4, size=16)  # a rerun renders the rest
    assert len(list((out / "videos").glob("*.mp4"))) == 5


def test_blackout_hides_objects_and_keeps_the_motion():
    plain, pm = S.generate_clip(5, frames=14)
    dark, dm = S.generate_clip(5, frames=14, blackout=(4, 5))
    bg = np.asarray(S.BACKGROUND, dtype=np.uint8)
    assert (dark[4:9] == bg).all() and not (plain[4:9] == bg).all()
    assert np.array_equal(dark[:4], plain[:4]) and np.array_equal(dark[9:], plain[9:])  # objects move on unseen
    assert dm["blackout"] == [4, 5] and pm["blackout"] is None
    assert all(o.get("visible") is False for t in range(4, 9) for o in dm["frames"][t])
    assert all("visible" not in o for t in (3, 9) for o in dm["frames"][t])
    with pytest.raises(ValueError, match="inside the clip"):
        S.generate_clip(5, frames=14, blackout=(12, 5))


def test_dataset_blackouts_follow_the_law_and_leave_scenes_unchanged(tmp_path):
    kw = dict(num_videos=8, frames=12, size=16, fps=8, seed=3)
    plain = SD.make_dataset(tmp_path / "plain", **kw)
    dark = SD.make_dataset(tmp_path / "dark", blackout_prob=1.0, blackout_frames=(4, 6), **kw)
    for a, b in zip(plain.read_text().splitlines(), dark.read_text().splitlines()):
        assert a == b  # same captions, paths and splits
    for i in range(8):
        pm = json.loads((tmp_path / "plain" / "videos" / f"{i:06d}.json").read_text())
        dm = json.loads((tmp_path / "dark" / "videos" / f"{i:06d}.json").read_text())
        assert "blackout" not in pm["spec"] and pm["spec"]["scene"] == dm["spec"]["scene"]
        start, length = dm["spec"]["blackout"]
        assert 4 <= length <= 6 and SD.BLACKOUT_MARGIN <= start and start + length <= 12 - SD.BLACKOUT_MARGIN
        v = read_mp4(tmp_path / "dark" / "videos" / f"{i:06d}.mp4")
        assert np.abs(v[start:start + length].astype(int) - np.asarray(S.BACKGROUND)).max() <= 3  # H.264 rounding
    with pytest.raises(ValueError, match="do not fit 8-frame clips"):
        SD.make_dataset(tmp_path / "bad", num_videos=1, frames=8, blackout_prob=0.5, blackout_frames=(4, 6))
