"""train/precompute.py: manifest -> latent store, resumable, bad files skipped, bad input exit 2."""
import json
import subprocess
import sys
from pathlib import Path

from resampling_forcing.data.latents import LatentDataset
from resampling_forcing.data.synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "precompute.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(REPO / "configs" / "tiny.yaml"), *args],
                          capture_output=True, text=True, timeout=300)


def test_precompute_manifest(tmp_path):
    manifest = make_dataset(tmp_path / "data", num_videos=5, frames=12, size=32, fps=8, held_out_fraction=0.0)
    (tmp_path / "data" / "videos" / "broken.mp4").write_bytes(b"not a video")
    with open(manifest, "a") as f:
        f.write(json.dumps({"path": "videos/broken.mp4", "caption": "x", "split": "train"}) + "\n")
    out = tmp_path / "latents"
    r = run("--manifest", str(manifest), "--out", str(out), "--shard-size", "2", "--split", "")
    assert r.returncode == 0, r.stderr
    ds = LatentDataset(out)
    assert len(ds) == 5
    item = ds[0]
    assert tuple(item["latents"].shape) == (48, 12, 8, 8) and tuple(item["text"].shape) == (16, 32)
    assert "corrupt" in r.stdout + r.stderr or "unreadable" in r.stdout + r.stderr
    # the warning has its own line, not glued onto the progress bar's
    warned = [ln.split("\r")[-1] for ln in r.stderr.split("\n") if "skipping video" in ln]
    assert warned and all(ln.startswith("WARNING") for ln in warned), r.stderr
    # a second run finds everything done and keeps the shards
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    r2 = run("--manifest", str(manifest), "--out", str(out), "--shard-size", "2", "--split", "")
    assert r2.returncode == 0, r2.stderr
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}


def test_precompute_bad_input(tmp_path):
    r = run("--manifest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "precompute: error:" in lines[0] and "missing.jsonl" in lines[0]
    r = run("--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "give --manifest" in r.stderr
