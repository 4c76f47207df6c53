"""sample.py under a launcher (torchrun, accelerate launch): process r of W samples prompts r, r + W, ...;
together the processes write the files of one process sampling them all, frame for frame."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resampling_forcing.io import read_mp4

from helpers import load_sample_cli, save_checkpoint_for_tests

CLI = load_sample_cli()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)


def cli(*args):
    return CLI.main([str(a) for a in args])


def test_launcher_processes_share_the_prompts(run_dir, tmp_path, monkeypatch, capsys):
    """Under torchrun / accelerate launch (RANK, WORLD_SIZE) process r samples prompts r, r + W, ...: together
    the files of one process sampling them all, frame for frame; a process with none says so and exits 0."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\na green disc\n")
    base = ("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 2, "--steps", 2, "--seed", 1,
            "--device", "cpu", "--quiet")
    one = tmp_path / "one"
    assert cli(*base, "--output", f"{one}/") == 0
    shared = tmp_path / "shared"
    names = sorted(p.name for p in one.iterdir())
    for rank, want in ((0, [0, 2]), (1, [1])):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        made = sorted(p.name for p in shared.iterdir()) if shared.exists() else []
        assert cli(*base, "--output", f"{shared}/") == 0
        new = sorted(set(p.name for p in shared.iterdir()) - set(made))
        assert [n for n in new if n.endswith(".mp4")] == [n for n in names if n.endswith(".mp4")
                                                          and int(n[:3]) in want], (rank, new)
    assert sorted(p.name for p in shared.iterdir()) == names
    for n in names:
        if n.endswith(".mp4"):
            np.testing.assert_array_equal(read_mp4(shared / n), read_mp4(one / n))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    capsys.readouterr()
    assert cli(*base, "--output", f"{tmp_path / 'none'}/", "--quiet") == 0
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("env, device, words", [
    (dict(RANK="2", WORLD_SIZE="2"), "cpu", "RANK=2 with WORLD_SIZE=2"),
    (dict(RANK="x", WORLD_SIZE="2"), "cpu", "RANK='x'"),
    (dict(RANK="0", WORLD_SIZE="2"), "cuda:1", "would put every one on the same device"),
])
def test_launcher_environment_mistakes_are_one_line(run_dir, tmp_path, monkeypatch, capsys, env, device, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "p", "--num-chunks", 1, "--device", device,
               "--output", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err


def test_torchrun_two_processes(run_dir, tmp_path):
    """As a user launches it: torchrun sets the variables, each process writes its share."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\na green disc\n")
    args = ["--checkpoint", str(run_dir), "--prompts-file", str(pf), "--num-chunks", "1", "--steps", "1",
            "--device", "cpu", "--quiet"]
    one = tmp_path / "one"
    assert cli(*args, "--output", f"{one}/") == 0
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                        str(REPO / "sample" / "sample.py"), *args, "--output", f"{out}/"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    for p in one.glob("*.mp4"):
        np.testing.assert_array_equal(read_mp4(out / p.name), read_mp4(p))
