"""Every bench script refuses bad input the project's way: ONE line on stderr, ``<prog>: error: ...``
naming the flag, exit code 2, before any expensive work, and no output file (bench/common.py).

Only the argument checks run here (no timing): each script's main(argv) in-process, bench/kernels.py
(which parses its flags at import, before torch) as a subprocess.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from train_helpers import REPO

_MODULES: dict = {}


def _bench(name: str):
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"bench_args_{name}", REPO / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[name] = mod
    return _MODULES[name]


# (script, bad arguments, what the one line must name); the output flag is added by the test
CASES = [
    ("rollout", ["--presets", "bogus"], "--presets"),
    ("rollout", ["--modes", "topkx"], "--modes"),
    ("rollout", ["--modes", "dense,bogus"], "--modes"),  # was: failed only after dense was timed
    ("rollout", ["--modes", "replay2"], "--replay"),
    ("rollout", ["--chunks", "0"], "--chunks"),
    ("rollout", ["--steps", "0"], "--steps"),
    ("rollout", ["--shift", "nan"], "--shift"),
    ("rollout", ["--shift", "0"], "--shift"),
    ("rollout", ["--cfg", "inf"], "--cfg"),
    ("rollout", ["--latent", "8by8"], "--latent"),
    ("rollout", ["--latent", "7x7", "--presets", "tiny"], "--latent"),
    ("rollout", ["--chunk-frames", "0"], "--chunk-frames"),
    ("rollout", ["--threads", "-1"], "--threads"),
    ("rollout", ["--device", "tpu"], "--device"),
    ("rollout", ["--device", "cuda:99", "--presets", "tiny"], "--device"),
    ("rollout", ["--attention-backend", "bogus"], "--attention-backend"),
    ("rollout", ["--replay", "/nonexistent"], "--replay"),
    ("rollout", ["--vae", "pixel_shuffle", "--presets", "wan-100m"], "--vae"),
    ("routed_attention", ["--k", "0"], "--k"),
    ("routed_attention", ["--history", "0"], "--history"),
    ("routed_attention", ["--heads", "0"], "--heads"),
    ("routed_attention", ["--repeats", "0"], "--repeats"),
    ("routed_attention", ["--pattern", "bogus"], "--pattern"),  # was: silently timed as "random"
    ("routed_attention", ["--gap", "nan"], "--gap"),  # was: reported as a result
    ("routed_attention", ["--backend", "bogus"], "--backend"),
    ("routed_attention", ["--cpu-kernels", "auto,bogus"], "--cpu-kernels"),
    ("kv_offload", ["--checkpoint", "/nonexistent"], "--checkpoint"),
    ("kv_offload", ["--chunks", "0"], "--chunks"),
    ("kv_offload", ["--resident", "0"], "--resident"),
    ("kv_offload", ["--steps", "0"], "--steps"),
    ("long_rollout", ["--checkpoint", "/nonexistent"], "--checkpoint"),
    ("long_rollout", ["--chunks", "0"], "--chunks"),
    ("long_rollout", ["--steps", "0"], "--steps"),
    ("long_rollout", ["--modes", "dense,bogus"], "--modes"),
    ("long_rollout", ["--set", "data.heigth=64"], "--set"),
    ("long_rollout", ["--set", "model.dim=64"], "--set"),
    ("train_step", ["--models", "bogus"], "--models"),
    ("train_step", ["--steps", "0"], "--steps"),
    ("train_step", ["--threads", "-1"], "--threads"),
    ("train_forward", ["--latent", "8x8"], "--latent"),
    ("train_forward", ["--latent", "7x8x8", "--presets", "tiny"], "--latent"),
    ("train_forward", ["--batch", "0"], "--batch"),
    ("train_forward", ["--repeats", "0"], "--repeats"),
    ("train_forward", ["--presets", "tiny", "bogus"], "--presets"),  # was: failed after the tiny runs
    ("train_forward", ["--backends", "bogus"], "--backends"),  # was: silently ran sdpa, reported as "bogus"
    ("prompt_switch", ["--seeds", "x"], "--seeds"),
    ("prompt_switch", ["--seeds", "5-2"], "--seeds"),
    ("prompt_switch", ["--switch", "9"], "--switch"),
    ("prompt_switch", ["--chunks", "0"], "--chunks"),
    ("quality_sweep", ["--settings", "[1]"], "--settings"),
    ("quality_sweep", ["--settings", '{"bogus": 1}'], "--settings"),
    ("quality_sweep", ["--length-factor", "0"], "--length-factor"),
    ("quality_sweep", ["--seeds", "0,x"], "--seeds"),
    ("rope_period", ["--routing", "bogus"], "--routing"),
    ("rope_period", ["--frames", "0"], "--frames"),
    ("rope_period", ["--rope-horizon", "0"], "--rope-horizon"),
    ("far_positions", ["--histories", "3"], "--histories"),  # not beyond the horizon: nothing to time
    ("far_positions", ["--horizon", "0"], "--horizon"),
    ("sink_attention", ["--distances", "0-3"], "--distances"),
    ("sink_attention", ["--chunk", "5"], "--chunk"),  # not beyond sink + window: the sink is not far
    ("rope_period", ["--rope-horizon", "none,far"], "--rope-horizon"),
    ("rope_period", ["--rope-horizon", "4:0"], "--rope-horizon"),
    ("rope_period", ["--checkpoint", "/nonexistent"], "--checkpoint"),
    ("pixel_drift", ["--runs", "/nonexistent"], "--runs"),
    ("pixel_drift", ["--runs", "/nonexistent", "--arms", "tf"], "--arms"),
    ("pixel_cost", ["--size", "8by8"], "--size"),
    ("pixel_cost", ["--frames", "0"], "--frames"),
    ("kernels", ["--pattern", "bogus"], "--pattern"),  # was: exit 1
    ("kernels", ["--methods", "bogus"], "--methods"),  # was: silently timed nothing for it
    ("kernels", ["--histories", "0"], "--histories"),
    ("kernels", ["--smoke", "--histories", "5", "--reps", "2"], "--histories"),  # was: silently ignored
]
OUT_FLAG = {"train_step": "--json"}


def _run(script: str, argv: list[str], capsys) -> tuple[int, str]:
    if script == "kernels":  # parses at import, before torch: only as a process
        r = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), *argv], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr
    rc = _bench(script).main(argv)
    return rc, capsys.readouterr().err


def _check(script: str, argv: list[str], flag: str, tmp_path, capsys) -> None:
    before = sorted(tmp_path.rglob("*"))
    rc, err = _run(script, argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"bench/{script}.py: error: "), lines[0]
    assert flag in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no temporary left


@pytest.mark.parametrize("script,args,flag", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_argument_is_one_line_exit_2(script, args, flag, tmp_path, capsys):
    out = tmp_path / "out.json"
    _check(script, [*args, OUT_FLAG.get(script, "--out"), str(out)], flag, tmp_path, capsys)
    assert not out.exists()


SCRIPTS = ["rollout", "routed_attention", "kv_offload", "long_rollout", "train_step", "train_forward", "prompt_switch",
           "quality_sweep", "kernels", "rope_period", "far_positions",
           "sink_attention", "pixel_cost"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_unwritable_output_is_refused_up_front(script, where, tmp_path, capsys):
    """--out/--json that is a folder, or whose parent is a file: refused before any work."""
    if where == "folder":
        out = tmp_path / "results"
        out.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "out.json"
    flag = OUT_FLAG.get(script, "--out")
    _check(script, [flag, str(out)], flag, tmp_path, capsys)


def test_entry_guard_one_line_exit_codes(capsys):
    """cli.guarded, the entry guard of every tool (run_cli) and bench script (run_main): a BadInput with a
    multi-line message is ONE line naming the program, exit 2; Ctrl+C one line naming it, 130; None is 0."""
    from resampling_forcing.cli import BadInput, guarded

    _bench("routed_attention")  # puts the repository on sys.path, as every bench script does
    from bench.common import run_main

    def bad(argv):
        raise BadInput("--x is wrong\n  use --y")

    def stop(argv):
        raise KeyboardInterrupt

    assert run_main(bad, "bench/x.py", []) == 2
    assert capsys.readouterr().err.splitlines() == ["bench/x.py: error: --x is wrong use --y"]
    assert run_main(stop, "bench/x.py", []) == 130
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("bench/x.py: interrupted (Ctrl+C)"), err
    assert guarded(lambda: bad(None)) == 2 and capsys.readouterr().err.startswith("error: --x is wrong")
    assert guarded(lambda: None, "tool") == 0
    with pytest.raises(ValueError):  # anything else is a bug: a traceback, not a one-line error
        guarded(lambda: int("x"), "tool")


@pytest.mark.parametrize("preset, vae, want", [("tiny", "auto", "PixelShuffleVAE"), ("wan-100m", "auto", (8, 16)),
                                               ("wan2.2-ti2v-5b", "auto", (16, 48)), ("wan-100m", "none", None)])
def test_rollout_bench_vae_follows_the_preset(preset, vae, want):
    """bench/rollout.py --vae auto: the preset's own kind (48 channels are the tiny preset's pixel shuffle and
    Wan2.2's VAE: the preset decides), random weights."""
    from argparse import Namespace

    from resampling_forcing.config import ModelConfig, resolve_model

    mod = _bench("rollout")
    vae = mod.build_vae(resolve_model(ModelConfig(preset=preset)), Namespace(vae=vae, vae_base_dim=8), "cpu")
    if want is None or isinstance(want, str):
        assert type(vae).__name__ == str(want) if want else vae is None
    else:
        assert (vae.spatial_factor, vae.latent_channels) == want
