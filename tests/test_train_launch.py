"""`accelerate launch train/train.py` end to end on CPU: single process, 2-process DDP (gloo),
DeepSpeed ZeRO-2 (gloo), LoRA under ZeRO-2 and ZeRO-3 (export, exact resume), a 2-machine launch on the
loopback address, and kill -9 + resume.

Each launch trains the small config of train_helpers on a fixed batch; the loss must go down and
every process must end with the same weights. Marked slow (they still run in `make test`).
The first DeepSpeed run on a machine JIT-builds a small C++ op (cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from resampling_forcing.checkpoint import list_checkpoints, read_trainer_state
from resampling_forcing.models.loading import load_model
from train_helpers import REPO, TINY_YAML, child_env, read_log, small_overrides
from train_helpers import synth  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
ACC = REPO / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(accel_cfg: str, *launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACC / accel_cfg),
            *launch_args, str(REPO / "train" / "train.py"), "--config", str(TINY_YAML)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def assert_learns_in_step(run_dir, world: int):
    log = read_log(run_dir)
    losses = [r["loss"] for r in log]
    assert losses[-1] < 0.85 * losses[0], losses
    ckpt = list_checkpoints(run_dir)[-1][1]
    assert read_trainer_state(ckpt)["world_size"] == world
    load_model(ckpt)  # the exported model loads (gathered from all processes)
    reports = [(run_dir / "ranks" / f"rank_{r}.json").read_text() for r in range(world)]
    shas = {json.loads(t)["weights_sha256"] for t in reports}
    assert len(shas) == 1, "processes ended with different weights"


def test_ddp_cpu_two_processes(tmp_path, synth):
    run_dir = tmp_path / "run"
    proc = run(launch_cmd("ddp_cpu.yaml", "--main_process_port", str(free_port()))
               + small_overrides(run_dir, synth, **{"data.fixed_batch": True, "train.grad_accum": 2}))
    assert_learns_in_step(run_dir, 2)
    assert proc.stdout.count("completed at step") == 1, proc.stdout  # the main process's line, once


def test_ddp_signal_on_one_rank_within_a_step_stops_both_then_resumes(tmp_path, synth):
    """SIGTERM on rank 1 only, in the 2nd of 3 micro-batches of step 3: both ranks drop that step at the
    same micro-batch (they agree through the per-micro-batch collective), save step 2, exit; the same
    command resumes from there and ends with equal weights on both ranks."""
    run_dir = tmp_path / "run"
    args = small_overrides(run_dir, synth, steps_tf=2, steps_rf=2, **{"train.grad_accum": 3, "train.save_every": 100})

    def launch(script):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACC / "ddp_cpu.yaml"),
               "--main_process_port", str(free_port()), str(script), "--config", str(TINY_YAML)] + args
        env = dict(child_env(), RF_SIGNAL_RANK="1", RF_SIGNAL_AFTER_STEP="2")
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    first = launch(REPO / "tests" / "signal_in_step.py")
    assert first.returncode != 0 and "interrupted at step 2" in first.stdout, first.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert read_trainer_state(list_checkpoints(run_dir)[-1][1])["data_position"] == 6
    assert len(read_log(run_dir)) == 2
    run(launch_cmd("ddp_cpu.yaml", "--main_process_port", str(free_port())) + args)
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3, 4]
    assert_learns_in_step(run_dir, 2)


def test_ddp_two_processes_resampling_with_bad_videos(tmp_path, synth):
    """Corrupt videos between the good ones, found bad during training: a process's micro-batch then holds
    fewer videos, hence fewer resampling times t_s, than the other's. The step's metrics still combine over
    processes (the raw t_s were gathered before, which needs equal sizes: gloo aborted, NCCL hangs)."""
    import os

    from resampling_forcing.config import load_config
    from resampling_forcing.data.loader import synthetic_manifest

    run_dir = tmp_path / "run"
    manifest = synthetic_manifest(load_config(TINY_YAML, small_overrides(run_dir, synth)))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = []
    for k, r in enumerate(r for r in rows if r.get("split", "train") == "train"):
        out.append(dict(r, path=str(manifest.parent / r["path"])))
        if k % 2 == 0:
            junk = tmp_path / f"junk{k}.mp4"
            junk.write_bytes(os.urandom(2000))
            out.append({"path": str(junk), "caption": f"junk {k}"})
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in out))
    proc = run(launch_cmd("ddp_cpu.yaml", "--main_process_port", str(free_port()))
               + small_overrides(run_dir, synth, steps_tf=1, steps_rf=5, **{"data.source": "manifest",
                                                                            "data.manifest": str(man)}))
    assert "skipping video" in proc.stderr + proc.stdout
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(0.0 <= r["t_s_min"] <= r["t_s_mean"] <= r["t_s_max"] <= 1.0 for r in log[1:])


def test_deepspeed_zero2_two_processes(tmp_path, synth):
    run_dir = tmp_path / "run"
    run(launch_cmd("deepspeed_zero2.yaml", "--main_process_port", str(free_port()))
        + small_overrides(run_dir, synth, **{"data.fixed_batch": True, "train.grad_accum": 2}), timeout=600)
    assert_learns_in_step(run_dir, 2)
    ckpt = list_checkpoints(run_dir)[-1][1]
    assert (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own sharded state
    # the export is DeepSpeed's fp32 master, gathered from both partitions (under bf16 the module's own
    # weights are a bf16 copy; fp32 here, so this checks the gathering, not the rounding)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    master = {k[len("model."):]: v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}
    exported = load_file(str(ckpt / "model.safetensors"))
    assert set(exported) == set(master)
    for name, w in exported.items():
        assert w.dtype == torch.float32 and torch.equal(w, master[name]), name
    # rerunning the command on another number of processes: refused in one line before DeepSpeed's loader
    # raises (its ZeRO state is partitioned per process), naming both ways on, and before RUN/config.yaml
    # is rewritten (a refused resume changes nothing)
    run_config = (run_dir / "config.yaml").read_text()
    proc = subprocess.run(launch_cmd("deepspeed_zero2.yaml", "--num_processes", "1", "--main_process_port",
                                     str(free_port())) + small_overrides(run_dir, synth, steps_rf=6),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert f"written by 2 DeepSpeed processes and this launch has 1" in lines[0], lines
    assert "--num_processes 2" in lines[0] and f"train.init_from={ckpt}" in lines[0], lines
    assert list_checkpoints(run_dir)[-1][1] == ckpt  # nothing written
    assert (run_dir / "config.yaml").read_text() == run_config


def test_deepspeed_zero2_lora_exports_merged_weights_and_resumes_exactly(tmp_path, synth):
    """train.lora under DeepSpeed ZeRO-2 (2 processes): only the adapters are in DeepSpeed's optimizer,
    the export merges them into the frozen base, and a resume from the middle checkpoint (DeepSpeed
    restores the module, lora.safetensors the EMA) ends bit-identical to the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    base = _random_base(tmp_path / "base", synth)
    args = [f"train.init_from={base}", "train.lora.rank=4", "train.ema_decay=0.9", "train.save_every=2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = run(launch_cmd("deepspeed_zero2.yaml", "--main_process_port", str(free_port()))
               + small_overrides(ref, synth, steps_tf=2, steps_rf=2) + args, timeout=600)
    assert "trained: LoRA rank 4" in proc.stdout + proc.stderr
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000004")
    run(launch_cmd("deepspeed_zero2.yaml", "--main_process_port", str(free_port()))
        + small_overrides(cut, synth, steps_tf=2, steps_rf=2) + args, timeout=600)
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(ref)]
    a_dir, b_dir = (r / "checkpoints" / "step_0000004" for r in (ref, cut))
    for name in ("lora.safetensors", "ema.safetensors", "model.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    exported, start = load_file(str(a_dir / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert _changed_layers(exported, start) == _LORA_DEFAULT_CHANGES
    # DeepSpeed's own copy of the module leaves the frozen base out (the resume above reloaded it)
    module = torch.load(a_dir / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(".lora_" in k for k in module), sorted(module)[:3]


def _random_base(folder, synth):
    """A randomly initialised model of small_overrides' sizes, saved as a checkpoint folder."""
    from resampling_forcing.config import load_config
    from resampling_forcing.models.loading import save_model
    from resampling_forcing.models.wan import CausalWanModel

    torch.manual_seed(0)
    save_model(CausalWanModel(load_config(TINY_YAML, small_overrides(folder, synth)).model), folder)
    return folder


_LORA_DEFAULT_CHANGES = {f"blocks.{i}.{t}.weight" for i in range(2) for t in (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
    "cross_attn.o", "ffn.0", "ffn.2")}  # train.lora.targets' default on small_overrides' 2 blocks


def _changed_layers(exported, start) -> set:
    return {k for k in start if not torch.equal(exported[k], start[k])}


def test_deepspeed_zero3_lora_gathers_merges_and_resumes_exactly(tmp_path, synth):
    """Under ZeRO-3 the module's weights are partitioned placeholders: the export gathers the base and
    merges the adapters' fp32 master into exactly the targeted weights; a resume from the middle
    checkpoint (its DeepSpeed folder without the frozen base) ends bit-identical."""
    import shutil

    from safetensors.torch import load_file

    base = _random_base(tmp_path / "base", synth)
    args = [f"train.init_from={base}", "train.lora.rank=4", "train.save_every=1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(launch_cmd("deepspeed_zero3.yaml", "--main_process_port", str(free_port()))
        + small_overrides(ref, synth, steps_tf=1, steps_rf=1) + args, timeout=600)
    ckpt = list_checkpoints(ref)[-1][1]
    exported, start = load_file(str(ckpt / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert exported.keys() == start.keys() and _changed_layers(exported, start) == _LORA_DEFAULT_CHANGES
    adapters = load_file(str(ckpt / "lora.safetensors"))
    assert len(adapters) == 2 * len(_LORA_DEFAULT_CHANGES) and all(v.dtype == torch.float32 for v in adapters.values())
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / ckpt.name)
    run(launch_cmd("deepspeed_zero3.yaml", "--main_process_port", str(free_port()))
        + small_overrides(cut, synth, steps_tf=1, steps_rf=1) + args, timeout=600)
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(ref)]
    for name in ("lora.safetensors", "model.safetensors"):
        a, b = load_file(str(ckpt / name)), load_file(str(cut / "checkpoints" / ckpt.name / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_multinode_two_machines_on_loopback(tmp_path, synth):
    """README: the same command on each machine, --machine_rank 0/1, --main_process_ip of machine 0."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    overrides = small_overrides(run_dir, synth, **{"data.fixed_batch": True})
    procs = [subprocess.Popen(launch_cmd("multinode.yaml", "--machine_rank", str(r), "--num_machines", "2",
                                         "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                                         "--main_process_port", port) + overrides,
                              cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert_learns_in_step(run_dir, 2)


def test_single_process_launch_then_kill_and_resume_matches(tmp_path, synth):
    steps = dict(steps_tf=10, steps_rf=30)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    extra = {"data.fixed_batch": True, "train.save_every": 5, "train.keep_last": 3}
    run(launch_cmd("single.yaml") + small_overrides(ref_dir, synth, **steps, **extra))
    ref = read_log(ref_dir)
    assert len(ref) == 40 and ref[-1]["loss"] < 0.85 * ref[0]["loss"]

    cmd = [sys.executable, str(REPO / "train" / "train.py"), "--config", str(TINY_YAML)] + \
        small_overrides(run_dir, synth, **steps, **extra)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_0000010").exists():  # mid-way: after the stage switch
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = [s for s, _ in list_checkpoints(run_dir)]
    assert killed_at and killed_at[-1] < 40, killed_at
    for _, ckpt in list_checkpoints(run_dir):  # every complete-named checkpoint is whole
        load_model(ckpt)
        read_trainer_state(ckpt)
    run(cmd)  # the same command resumes from the latest checkpoint
    got = read_log(run_dir)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # exact, step for step
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 35, 40]
