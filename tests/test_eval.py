import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from resampling_forcing import eval as E
from resampling_forcing.data import synthetic as S
from resampling_forcing.data import synthetic_dataset as SD
from resampling_forcing.mp4 import read_mp4, write_mp4

SEEDS = (0, 2, 5, 9)  # one- and two-object scenes, circles, squares and triangles


def _clip(seed, frames=36, size=32):
    return S.generate_clip(seed, frames=frames, size=size, shapes=S.SHAPES)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Overall scores of real clips (raw and through mp4) and of broken versions of them."""
    d = tmp_path_factory.mktemp("ev")
    rng = np.random.default_rng(0)
    out = {k: [] for k in ("raw", "mp4", "noise", "frozen", "shuffled")}
    for seed in SEEDS:
        v, m = _clip(seed)
        write_mp4(d / f"{seed}.mp4", v, fps=8)
        variants = {
            "raw": v,
            "mp4": read_mp4(d / f"{seed}.mp4"),
            "noise": rng.integers(0, 256, v.shape, dtype=np.uint8),
            "frozen": np.repeat(v[:1], len(v), 0),
            "shuffled": v[rng.permutation(len(v))],
        }
        for k, x in variants.items():
            out[k].append(E.evaluate_video(x, m["caption"], segment_frames=12)["overall"])
    return out


def _worst(results, key):
    return min(r[key] for r in results)


def _best(results, key):
    return max(r[key] for r in results)


def test_real_clips_score_near_perfect(scored):
    for kind in ("raw", "mp4"):
        res = scored[kind]
        assert _worst(res, "object_fidelity") >= 0.95
        assert _worst(res, "count_acc") >= 0.95 and _worst(res, "color_acc") >= 0.95
        assert _worst(res, "shape_acc") >= 0.9
        assert _worst(res, "identity_consistency") >= 0.95
        assert _worst(res, "motion_score") >= 0.9
        assert _worst(res, "background_clean") >= 0.97
        assert _worst(res, "quality") >= 0.95


def test_noise_scores_badly(scored):
    res = scored["noise"]
    assert _best(res, "object_fidelity") <= 0.1
    assert _best(res, "background_clean") <= 0.2
    assert _best(res, "quality") <= 0.2


def test_frozen_clip_is_caught_by_motion(scored):
    res = scored["frozen"]
    # everything looks right in each frame ...
    assert _worst(res, "object_fidelity") >= 0.95
    # ... but nothing moves, while the generator always moves
    assert _best(res, "moving_fraction") <= 0.05 and _best(res, "motion_score") <= 0.05
    assert _worst(scored["raw"], "motion_score") - _best(res, "motion_score") >= 0.85
    assert _best(res, "quality") <= _worst(scored["raw"], "quality") - 0.2


def test_shuffled_frames_break_identity_and_physics(scored):
    res = scored["shuffled"]
    assert _best(res, "motion_score") <= 0.3
    assert _best(res, "identity_consistency") <= 0.6
    assert _best(res, "quality") <= _worst(scored["raw"], "quality") - 0.2


def _random_walk(objects, frames=48, size=32, speed=1.0, seed=1):
    """Objects that take a new random direction every frame at a constant speed (inside the frame),
    drawn as the generator draws them: not the generator's physics."""
    rng = np.random.default_rng(seed)
    img = np.empty((frames, size, size, 3), np.float32)
    img[:] = np.asarray(S.BACKGROUND, np.float32)
    for color, shape, r in objects:
        p, path = rng.uniform(r + 1, size - 2 - r, 2), []
        for _ in range(frames):
            path.append(p)
            while True:
                a = rng.uniform(0, 2 * np.pi)
                q = p + speed * np.array([np.cos(a), np.sin(a)])
                if r <= q.min() and q.max() <= size - 1 - r:
                    break
            p = q
        path = np.array(path)
        cov = S.shape_coverage(shape, path[:, 0], path[:, 1], np.full(frames, r), size, size)[..., None]
        img = img * (1 - cov) + np.asarray(S.PALETTE[color], np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_physics_rejects_random_walks_near_other_objects(scored):
    """A random walk at the generator's speed fails the physics also with several objects nearby: an
    object-object contact must mirror the velocity about the contact normal (any turn at constant speed
    near any object passed, so random walks of two / three objects scored 0.79 / 0.87), while the true
    clips, contacts included, stay near 1."""
    two = [("red", "square", 4.0), ("blue", "circle", 4.0)]
    for objects in (two, two + [("green", "circle", 4.0)]):
        caption = S.make_caption([(c, sh) for c, sh, _ in objects])
        scores = [E.evaluate_video(_random_walk(objects, seed=k), caption)["overall"]["physics_consistency"]
                  for k in range(3)]
        assert np.mean(scores) < 0.7, scores
    truth = [E.evaluate_video(*(lambda v, m: (v, m["caption"]))(*S.generate_clip(
        S.HELD_OUT_SEED_BASE + i, frames=96, size=(32, 32), max_objects=2)))["overall"]["physics_consistency"]
        for i in range(8)]
    assert min(truth) > 0.99, truth


def test_segments_reference_and_drift():
    v, m = _clip(5, frames=40)
    rep = E.evaluate_video(v, m["caption"], segment_frames=12, reference=v, reference_meta=m)
    segs = rep["segments"]
    assert [(s["start"], s["stop"]) for s in segs] == [(0, 12), (12, 24), (24, 36), (36, 40)]
    assert all(s["psnr"] >= 60 and s["center_error"] < 0.3 and s["center_missing"] == 0 for s in segs)
    json.dumps(rep)  # JSON-serialisable
    # float [3,F,H,W] input in [-1,1] is accepted
    t = torch.from_numpy(v).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert E.evaluate_video(t, m["caption"], 12)["overall"]["quality"] >= 0.95
    # a rollout that degrades over time: later segments score lower, against the reference too
    rng = np.random.default_rng(0)
    d = v.astype(np.float32)
    for k in range(4):
        d[12 * k : 12 * (k + 1)] += rng.normal(0, 30 * k, d[12 * k : 12 * (k + 1)].shape)
    bad = E.evaluate_video(np.clip(d, 0, 255).astype(np.uint8), m["caption"], 12, reference=v, reference_meta=m)
    q = [s["quality"] for s in bad["segments"]]
    p = [s["psnr"] for s in bad["segments"]]
    assert q[0] > 0.95 and q[-1] < 0.5 and q[0] > q[1] > q[2]
    assert p[0] > p[1] > p[2]
    # a wrong caption is caught by colour
    wrong = E.evaluate_video(v, "a green circle bouncing", 12)["overall"]
    assert wrong["color_acc"] == 0 and wrong["object_fidelity"] == 0


def test_cli_sidecars_and_bad_input(tmp_path, capsys):
    ds = tmp_path / "ds"
    SD.make_dataset(ds, num_videos=3, frames=20, size=32, fps=8, seed=3, held_out_fraction=0.0)
    vids = ds / "videos"
    out, plot = tmp_path / "metrics.json", tmp_path / "drift.png"
    rc = E.main(["--videos", str(vids), "--segment-frames", "8", "--out", str(out), "--plot", str(plot)])
    assert rc == 0 and plot.stat().st_size > 0
    rep = json.loads(out.read_text())
    assert len(rep["videos"]) == 3 and len(rep["mean"]) == 3
    assert rep["overall"]["object_fidelity"] >= 0.95 and rep["overall"]["quality"] >= 0.95
    # a generated-looking folder: mp4 + sidecar with "prompt"; reference folder matched by name
    gen = tmp_path / "gen"
    v = read_mp4(vids / "000001.mp4")
    write_mp4(gen / "000001.mp4", v, fps=8)
    (gen / "000001.json").write_text(json.dumps({"prompt": json.loads((vids / "000001.json").read_text())["prompt"]}))
    rc = E.main(["--videos", str(gen / "000001.mp4"), "--reference", str(vids), "--segment-frames", "10",
                 "--out", str(out), "--overwrite"])
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["mean"][0]["psnr"] > 25 and rep["mean"][0]["center_error"] < 0.5
    # one reference FILE: taken whatever its name for one video, refused (one line) for several whose
    # names differ (every video was compared with it)
    rc = E.main(["--videos", str(gen / "000001.mp4"), "--reference", str(vids / "000000.mp4"),
                 "--out", str(out), "--overwrite"])
    assert rc == 0
    write_mp4(gen / "000002.mp4", read_mp4(vids / "000002.mp4"), fps=8)
    (gen / "000002.json").write_text(json.dumps({"prompt": json.loads((vids / "000002.json").read_text())["prompt"]}))
    capsys.readouterr()
    assert E.main(["--videos", str(gen), "--reference", str(vids / "000001.mp4"),
                   "--out", str(out), "--overwrite"]) == 2
    assert "no reference video named 000002.mp4" in capsys.readouterr().err
    (gen / "000002.mp4").unlink()
    (gen / "000002.json").unlink()
    # captions from a map file
    cmap = tmp_path / "caps.json"
    cmap.write_text(json.dumps({"000001.mp4": "a blue square bouncing"}))
    (gen / "000001.json").unlink()
    assert E.main(["--videos", str(gen), "--captions", str(cmap), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    for argv in (
        ["--videos", str(tmp_path / "nothing")],
        ["--videos", str(gen)],  # no sidecar, no captions
        ["--videos", str(gen), "--caption", "a dog"],
        ["--videos", str(gen), "--captions", str(tmp_path / "missing.json")],
        ["--videos", str(vids), "--segment-frames", "0"],
    ):
        (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
        assert E.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eval: error:") and "\n" not in err
    assert E.main(["--videos", str(tmp_path / "junk.mp4"), "--caption", "a red circle"]) == 2
    assert "no video could be decoded (1 skipped" in capsys.readouterr().err
    # one undecodable file among good ones is skipped with a warning, not the end of the evaluation
    mixed = tmp_path / "mixed"
    shutil.copytree(vids, mixed)
    (mixed / "000001.mp4").write_bytes(b"\x00" * 100)
    assert E.main(["--videos", str(mixed), "--segment-frames", "8", "--out", str(out), "--overwrite"]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["videos"]) == 2 and [s["video"] for s in rep["skipped"]] == [str(mixed / "000001.mp4")]
    assert f"warning: skipping {mixed / '000001.mp4'}" in capsys.readouterr().err
    # the module runs as a program
    r = subprocess.run([sys.executable, "-m", "resampling_forcing.eval", "--videos", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nothing" in r.stderr


def test_reference_with_a_sample_sidecar_is_refused_before_scoring(tmp_path, monkeypatch, capsys):
    """--reference at sample.py outputs: its sidecar's "frames" is a count, not per-frame objects; it
    crashed in metrics.py (TypeError). Now one line, exit 2, before any video is scored."""
    import resampling_forcing.eval.cli as eval_cli

    v, m = _clip(0, frames=8)
    vids = tmp_path / "vids"
    write_mp4(vids / "a.mp4", v, fps=8)
    (vids / "a.json").write_text(json.dumps({"prompt": m["caption"], "frames": 8, "fps": 8}))  # PipelineOutput.save
    scored = []
    monkeypatch.setattr(eval_cli, "evaluate_video", lambda *a, **k: scored.append(a) or {})
    out = tmp_path / "m.json"
    assert E.main(["--videos", str(vids), "--reference", str(vids), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"eval: error: --reference {vids / 'a.json'}: not generator metadata (no per-frame objects"), err
    assert "move it aside" in err[0] and not scored and not out.exists()
    # the API refuses it too (it was the TypeError)
    with pytest.raises(E.EvalInputError, match="not generator metadata"):
        E.evaluate_video(v, m["caption"], reference=v, reference_meta={"frames": 8})
