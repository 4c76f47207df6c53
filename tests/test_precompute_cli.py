"""train/precompute.py: manifest -> latent store, resumable, bad files skipped, bad input exit 2."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


SMALL = ["data.height=16", "data.width=16", "data.num_frames=8", "--split", "", "--device", "cpu"]


def _one_line(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_usage_errors_are_one_line(tmp_path):
    """argparse printed its usage block (6 lines) as no other tool does."""
    for flag, value, msg in (("--shard-size", "abc", "invalid int value: 'abc'"), ("--dtype", "fp64", "invalid choice")):
        r = run("--manifest", "M", "--out", str(tmp_path / "o"), flag, value)
        line = _one_line(r)
        assert r.returncode == 2 and line.startswith("precompute: error: argument " + flag) and msg in line, r.stderr
    assert not (tmp_path / "o").exists()


def test_overrides_may_follow_a_later_flag(tmp_path):
    """`... data.height=16 --out O data.fps=0`: the last override was refused as an unrecognized argument;
    now it is read (and refused by the config's own check)."""
    r = run("--manifest", str(tmp_path / "m.jsonl"), "data.height=16", "--out", str(tmp_path / "o"), "data.fps=0")
    line = _one_line(r)
    assert r.returncode == 2 and "data.fps" in line and "unrecognized" not in line, r.stderr
    assert not (tmp_path / "o").exists()


def test_store_mismatch_names_only_the_differences(tmp_path):
    manifest = make_dataset(tmp_path / "data", num_videos=2, frames=8, size=16, fps=8, held_out_fraction=0.0)
    out = tmp_path / "latents"
    assert run("--manifest", str(manifest), "--out", str(out), *SMALL).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run("--manifest", str(manifest), "--out", str(out), *SMALL, "data.fps=4")
    line = _one_line(r)
    assert r.returncode == 2 and "data.fps=8.0 (now 4.0)" in line and "--out NEW_DIR or --overwrite" in line, line
    assert "num_frames" not in line and len(line) < 300, line  # was two ~900-character dicts
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the store is untouched


def _interrupting(mod, monkeypatch, after_rows: int, exc: BaseException = KeyboardInterrupt()):
    """precompute.py's `precompute` with Ctrl+C (or `exc`) arriving when row `after_rows` is read (shards of
    2 rows)."""
    real = mod.precompute

    def interrupted(dataset, *a, **kw):
        get = dataset.try_get

        def try_get(i):
            if i == after_rows:
                raise exc
            return get(i)

        dataset.try_get = try_get
        return real(dataset, *a, **kw)

    monkeypatch.setattr(mod, "precompute", interrupted)


def test_ctrl_c_is_one_line_and_keeps_the_shards(tmp_path, monkeypatch, capsys):
    """Ctrl+C printed a KeyboardInterrupt traceback; now one line, exit 130, the finished shards kept (a
    rerun encodes only the rest) and nothing left by a run that wrote no shard."""
    from helpers import load_script

    mod = load_script("train/precompute.py", "precompute_cli")
    manifest = make_dataset(tmp_path / "data", num_videos=5, frames=8, size=16, fps=8, held_out_fraction=0.0)
    out = tmp_path / "latents"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--manifest", str(manifest), "--out", str(out),
            "--shard-size", "2", *SMALL]
    def main():  # an escaping Ctrl+C would end the whole pytest session: a failure of this test instead
        try:
            return mod.main(argv)
        except KeyboardInterrupt:
            pytest.fail("Ctrl+C escaped train/precompute.py (a KeyboardInterrupt traceback)")

    def messages():  # stderr without the progress bar's lines (tqdm: "precompute:  40%|####  | 2/5 ...")
        lines = [ln.split("\r")[-1] for ln in capsys.readouterr().err.splitlines()]
        return [ln for ln in lines if ln.strip() and not re.match(r"precompute:\s+\d+%\|", ln)]

    _interrupting(mod, monkeypatch, 0)
    assert main() == 130
    assert messages() == ["precompute: interrupted (Ctrl+C) before any shard was written; rerun the same command"]
    assert not out.exists()
    monkeypatch.undo()
    _interrupting(mod, monkeypatch, 4)
    assert main() == 130
    assert messages() == [f"precompute: interrupted (Ctrl+C); 2 shard(s) kept in {out}, rerun the same command to "
                          "continue"]
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.undo()
    assert main() == 0
    assert "1 shard(s)" in capsys.readouterr().out  # only the missing shard was encoded
    assert len(LatentDataset(out)) == 5


def test_an_error_follows_the_ctrl_c_rule_for_what_is_kept(tmp_path, monkeypatch, capsys):
    """A failure (disk full) before the first shard left a new store folder with its index and empty-prompt
    embedding (only an empty folder was removed); now it goes as after Ctrl+C, and finished shards stay."""
    import errno

    from helpers import load_script

    mod = load_script("train/precompute.py", "precompute_cli_err")
    manifest = make_dataset(tmp_path / "data", num_videos=5, frames=8, size=16, fps=8, held_out_fraction=0.0)
    out = tmp_path / "latents"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--manifest", str(manifest), "--out", str(out),
            "--shard-size", "2", *SMALL]
    full = OSError(errno.ENOSPC, "No space left on device")
    _interrupting(mod, monkeypatch, 0, full)
    assert mod.main(argv) == 2
    assert "precompute: error: no space left on" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    _interrupting(mod, monkeypatch, 4, full)
    assert mod.main(argv) == 2
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.undo()
    assert mod.main(argv) == 0 and len(LatentDataset(out)) == 5
