"""The prepared GPU run (bench/gpu_session.sh) fits the device tool's limits, and the bench scripts it
runs keep what they measured. No GPU here: the GPU steps run against a stub "python" that only logs its
arguments (and writes `{}` to --out); the smoke mode itself runs in tests/test_kernels.py::test_bench_smoke.

The device tool (/work/.library/device/README.md) brings back at most 8 files from $OUT and stops a
command after 600 s, so the steps' time limits must add up to well under that (<= 540 s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import pytest
import torch

from train_helpers import REPO

SCRIPT = REPO / "bench" / "gpu_session.sh"
STEPS = ["install", "kernels", "routed_attention", "rollout", "kv_offload", "tests_cuda"]
STUB = """#!/usr/bin/env bash
# stub python: log the arguments, write {} to --out; exec sleep when the arguments contain $STUB_SLOW
echo "stub $*"
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); echo '{}' > "${!j}"; fi
done
if [ -n "${STUB_SLOW:-}" ] && [[ "$*" == *"$STUB_SLOW"* ]]; then exec sleep 60; fi
exit 0
"""


def _env(tmp_path, **extra) -> dict:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    return dict(os.environ, OUT=str(out), PYTHON=str(stub), SMOKE="0", **extra)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_session_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_session_fits_the_device_tool(tmp_path):
    """GPU mode (stubbed): <= 8 files in $OUT (gpu.txt, the JSONs, session.log, logs.tar.gz), step limits
    summing to <= 540 s, the most important step (bench/kernels.py, docs/benchmarks.md section 4) first
    after the install, and the CUDA tests without the test that re-runs this script on CPU."""
    env = _env(tmp_path)
    r = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert set(files) == {"gpu.txt", "session.log", "logs.tar.gz", "kernels.json", "routed_attention.json",
                          "rollout.json", "kv_offload.json"}, files
    limits = re.findall(r"^== (\w+) \(limit (\d+)s\)", r.stdout, re.M)
    assert [name for name, _ in limits] == STEPS
    assert sum(int(s) for _, s in limits) <= 540, limits
    session = (out / "session.log").read_text()
    for name in STEPS:
        assert f"===== {name} exit 0" in session, name
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {os.path.basename(m.name) for m in tar.getmembers() if m.isfile()} == {f"{s}.log" for s in STEPS}
    pytest_line = next(line for line in r.stdout.splitlines() if line.startswith("stub -m pytest"))
    assert "tests/test_kernels.py" in pytest_line and "not test_bench_smoke" in pytest_line
    assert "def test_bench_smoke(" in (REPO / "tests" / "test_kernels.py").read_text()  # the name -k skips


def test_gpu_session_killed_keeps_its_logs(tmp_path):
    """A TERM mid-step (the device tool's limit, say): the script ends at once, session.log holds the
    tails of the finished steps and of the one cut short, logs.tar.gz every log so far, <= 8 files."""
    env = _env(tmp_path, STUB_SLOW="bench/rollout.py")
    p = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        deadline = time.time() + 60
        log = tmp_path / "out" / "session.log"
        while "===== routed_attention" not in (log.read_text() if log.exists() else ""):
            assert time.time() < deadline and p.poll() is None, "the stubbed steps did not start"
            time.sleep(0.1)
        time.sleep(0.5)  # into the rollout step (the stub sleeps there)
        p.send_signal(signal.SIGTERM)
        stdout, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, stdout
    out = tmp_path / "out"
    assert len(list(out.iterdir())) <= 8
    session = (out / "session.log").read_text()
    assert "===== kernels exit 0" in session and "===== rollout (cut short by a signal)" in session
    assert "stub bench/rollout.py" in session  # the cut step's own output
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "rollout.log" in {os.path.basename(m.name) for m in tar.getmembers()}


def test_kernels_json_is_written_before_the_end(tmp_path):
    """bench/kernels.py rewrites its JSON (atomically) after the checks and after each history length: a
    run killed at its time limit leaves valid JSON holding the numbers so far."""
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(REPO / "bench" / "kernels.py"), "--smoke", "--methods", "triton,torch",
                          "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        deadline = time.time() + 300
        while not out.exists() and p.poll() is None:
            assert time.time() < deadline, "no JSON after 300 s"
            time.sleep(0.05)
        finished_first = p.poll() is not None
        p.send_signal(signal.SIGTERM)
        log, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    data = json.loads(out.read_text())  # complete or not, never half a file
    assert data["checks"] and all(c["ok"] for c in data["checks"]), log[-3000:]
    assert finished_first or data["complete"] is False  # the first write came before the end
    assert not [f for f in tmp_path.iterdir() if f.name != "kernels.json"]  # no temporary left


def test_rollout_warms_every_distinct_mode_on_cuda():
    """bench/rollout.py: on CUDA one full untimed rollout per distinct mode (replayK apart from topkK, same
    spec, other picks); on CPU none of them (the 2-chunk dense warm-up only)."""
    mod = _bench("rollout")
    args = SimpleNamespace(top_k=5, sink=0, window=5, window_sink=False)
    names = ["dense", "topk5", "replay5", "topk5", "sink1+window4", "window4", "topk"]  # topk = topk5 (--top-k)
    specs = {n: mod.parse_mode(n, args) for n in names}
    assert mod.warmup_modes(names, specs, "cuda") == ["dense", "topk5", "replay5", "sink1+window4", "window4"]
    assert mod.warmup_modes(names, specs, "cpu") == []


def test_rollout_full_warmup_runs(tmp_path, monkeypatch):
    """The CUDA warm-up path end to end, on CPU (warmup_modes patched to pick every mode)."""
    mod = _bench("rollout")
    real = mod.warmup_modes
    monkeypatch.setattr(mod, "warmup_modes", lambda names, specs, device: real(names, specs, "cuda"))
    out = tmp_path / "r.json"
    assert mod.main(["--presets", "tiny", "--latent", "4x4", "--chunks", "3", "--chunk-frames", "1", "--threads", "1",
                     "--modes", "dense,topk1,replay1", "--replay", str(REPO / "assets" / "ablation" / "ar_0.6"),
                     "--vae", "none", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["warmup"] == ["dense", "topk1", "replay1"]
    assert set(res["presets"]["tiny"]["modes"]) == {"dense", "topk1", "replay1"}


def test_routed_attention_inputs_drawn_once_per_history():
    """bench/routed_attention.py: one draw per history length (on CPU the values one CPU generator gives);
    a coherent case copies only q and the history keys, a random case is the draw itself."""
    mod = _bench("routed_attention")
    Hh, N, T, D = 2, 4, 64, 16
    base = mod.draw_base(Hh, N, T, D, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    want = [torch.randn(*s, generator=g) for s in [(1, Hh, T, D), (1, Hh, N * T, D), (1, Hh, N * T, D),
                                                  (1, Hh, T, D), (1, Hh, T, D)]]
    assert all(torch.equal(a, b) for a, b in zip(base, want))
    cast = [t.to(torch.float16) for t in base]
    rnd = mod.make_inputs(base, 1, "random", torch.float16, cast=cast)
    assert all(a is b for a, b in zip(rnd, cast))
    coh = mod.make_inputs(base, 2, "coherent", torch.float16, cast=cast)
    assert all(a is b for a, b in zip(coh[2:], cast[2:]))  # vh, kc, vc shared
    assert not torch.equal(coh[0], cast[0]) and not torch.equal(coh[1], cast[1])
    assert torch.equal(base[0], want[0]) and torch.equal(base[1], want[1])  # the draw itself unchanged
    sel = mod.select_chunks(coh[0].float(), mod.chunk_means(coh[1].float(), T), mod.RoutingSpec("topk", top_k=2))
    assert mod.coherence(sel) > 0.9 and bool(sel[..., [0, N - 1]].float().mean() > 0.9)  # sink + most recent
