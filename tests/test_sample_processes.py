"""sample.py under a launcher (torchrun, accelerate launch): process r of W samples prompts r, r + W, ...;
together the processes write the files of one process sampling them all, frame for frame."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resampling_forcing.mp4 import read_mp4

from helpers import load_sample_cli, save_checkpoint_for_tests

CLI = load_sample_cli()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)


def cli(*args):
    return CLI.main([str(a) for a in args])


@pytest.mark.parametrize("batch, shares", [(1, {0: [0, 2], 1: [1]}), (2, {0: [0, 1], 1: [2]})])
def test_launcher_processes_share_the_batches(run_dir, tmp_path, monkeypatch, capsys, batch, shares):
    """Under torchrun / accelerate launch (RANK, WORLD_SIZE) the batches of one process are dealt round-robin:
    together the processes write the files of one process sampling them all, frame for frame (also with
    --batch 2: the same batches, so the same arithmetic); a process with none says so and exits 0."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na blue square\na green disc\n")
    base = ("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 2, "--steps", 2, "--seed", 1,
            "--batch", batch, "--device", "cpu", "--quiet")
    one = tmp_path / "one"
    assert cli(*base, "--output", f"{one}/") == 0
    shared = tmp_path / "shared"
    names = sorted(p.name for p in one.iterdir())
    for rank, want in shares.items():
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        made = sorted(p.name for p in shared.iterdir()) if shared.exists() else []
        assert cli(*base, "--output", f"{shared}/") == 0
        new = sorted(set(p.name for p in shared.iterdir()) - set(made))
        assert [n for n in new if n.endswith(".mp4")] == [n for n in names if n.endswith(".mp4")
                                                          and int(n[:3]) in want], (rank, new)
        for n in new:
            if n.endswith(".json"):  # the batch one process would have made it in
                i = int(n[:3])
                assert json.loads((shared / n).read_text())["resume_key"]["batch_indices"] == \
                    list(range(i // batch * batch, min(3, i // batch * batch + batch)))
    assert sorted(p.name for p in shared.iterdir()) == names
    for n in names:
        if n.endswith(".mp4"):
            np.testing.assert_array_equal(read_mp4(shared / n), read_mp4(one / n))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    capsys.readouterr()
    assert cli(*[a for a in base if a != "--quiet"], "--output", f"{tmp_path / 'none'}/") == 0
    assert "process 3 of 4: no batch falls to it (3 prompts in all)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_process_device(monkeypatch):
    import torch

    from resampling_forcing.sampling_run import _process_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [_process_device(d) for d in ("auto", "cuda", "cpu")] == ["cuda:2", "cuda:2", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible per process (Slurm)
    assert _process_device("cuda") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _process_device("auto") == "auto"  # resolve_device makes it the CPU
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _process_device("cuda") == "cuda"


@pytest.mark.parametrize("env, device, words", [
    (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"), "cpu", "RANK=2 with WORLD_SIZE=2"),
    (dict(RANK="x", WORLD_SIZE="2", LOCAL_RANK="0"), "cpu", "RANK='x'"),
    (dict(RANK="\u00b2", WORLD_SIZE="2", LOCAL_RANK="0"), "cpu", "a launcher sets it to an int"),
    (dict(WORLD_SIZE="2", LOCAL_RANK="0"), "cpu", "WORLD_SIZE=2 but RANK is not set"),
    (dict(WORLD_SIZE="2", RANK="1"), "cpu", "WORLD_SIZE=2 but LOCAL_RANK is not set"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"), "cuda:1", "would put every one on the same device"),
])
def test_launcher_environment_mistakes_are_one_line(run_dir, tmp_path, monkeypatch, capsys, env, device, words):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
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
    assert r.stderr.count("wrote ") == 3, r.stderr[-2000:]  # each video once, by one process
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    for p in one.glob("*.mp4"):
        np.testing.assert_array_equal(read_mp4(out / p.name), read_mp4(p))


def test_the_memory_check_counts_the_processes_of_a_node(monkeypatch):
    """Under a launcher the processes of one node share its RAM: each one's host need counts LOCAL_WORLD_SIZE
    times (a CPU rollout's device memory is RAM too)."""
    import types

    import torch

    import resampling_forcing.memory as memory
    from resampling_forcing.config import load_config
    from resampling_forcing.options import SamplingOptions
    from resampling_forcing.cli import BadInput

    cfg = load_config(REPO / "assets" / "tiny-pretrained" / "config.yaml")
    args = types.SimpleNamespace(batch=1, max_history_chunks=None, init_video=None, init_image=None, num_chunks=8,
                                 dtype="fp32", quiet=True)
    opts = SamplingOptions(steps=1)
    need = memory.rollout_need(cfg, opts, 8, 1, 4, 0, streamed=True)
    one = need["host"] + need["device"]
    monkeypatch.setattr(memory, "available_host_bytes", lambda: int(one * 2.5))
    CLI.check_memory(cfg, torch.device("cpu"), args, 1, opts)  # one process: fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    CLI.check_memory(cfg, torch.device("cpu"), args, 1, opts)  # two: fit
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(BadInput, match="in each of 3 processes on this node"):
        CLI.check_memory(cfg, torch.device("cpu"), args, 1, opts)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(BadInput, match="LOCAL_WORLD_SIZE='two'"):
        CLI.check_memory(cfg, torch.device("cpu"), args, 1, opts)
