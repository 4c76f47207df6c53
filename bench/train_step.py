"""Benchmark one training step: teacher forcing vs self-resampling (1 and 4 Euler steps).

The step is the library's own computation (resampling.degrade_history -> forward_dual under the
dual mask -> velocity loss -> backward -> AdamW), on random latents of the configured shape,
without accelerate. Each (model, objective) runs in a FRESH subprocess so peak memory is its own:
CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS (ru_maxrss) minus the RSS before the model
was built. Not a test; prints a markdown table (and --json writes the rows).

    python bench/train_step.py                       # tiny + wan-100m, CPU
    python bench/train_step.py --models tiny --steps 10 --threads 2
    python bench/train_step.py --device cuda --models wan-100m,wan2.1-t2v-1.3b
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import (OneLineParser, doc_summary, check_device, check_out, choice_list, device_name, nonneg_int,  # noqa: E402
                          positive_int, run_main)

PROG = "bench/train_step.py"

# model preset -> (batch, latent [C, F, H, W], chunk_frames, prediction)
SHAPES = {
    "tiny": (16, (48, 12, 8, 8), 2, "x0"),                # configs/tiny.yaml: 32x32x12 -> 6 chunks x 32 tokens
    "wan-100m": (1, (16, 6, 16, 16), 2, "velocity"),      # 3 chunks x 128 tokens (CPU-sized)
    "wan2.1-t2v-1.3b": (1, (16, 21, 60, 104), 3, "velocity"),  # 5 s at 480x832: 7 chunks x 4680 tokens
}
OBJECTIVES = [("teacher_forcing", 1), ("resampling", 1), ("resampling", 4)]


def run_one(preset: str, objective: str, rsteps: int, steps: int, device: str, threads: int,
            checkpointing: bool) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from resampling_forcing.attention.backends import resolve_backend
    from resampling_forcing.attention.masks import MaskSpec
    from resampling_forcing.attention.ops import MaskedAttention
    from resampling_forcing.config import ModelConfig, resolve_model
    from resampling_forcing.diffusion import sample_logit_normal
    from resampling_forcing.models.wan import CausalWanModel
    from resampling_forcing.resampling import DegradeSettings, degrade_history
    from resampling_forcing.timing import Stopwatch, median, peak_memory, reset_peak_memory, rss_mib
    from resampling_forcing.diffusion import velocity_loss

    dev = torch.device(device)
    batch, (c, f, h, w), cf, pred = SHAPES[preset]
    mcfg = resolve_model(ModelConfig(preset=preset, chunk_frames=cf, prediction=pred,
                                     gradient_checkpointing=checkpointing))
    base_rss = rss_mib()
    torch.manual_seed(0)
    model = CausalWanModel(mcfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    backend = resolve_backend("auto", dev)
    n, tokens = f // cf, model.chunk_tokens(h, w)
    attn = MaskedAttention(MaskSpec("dual", n, tokens), backend)
    settings = DegradeSettings(objective=objective, steps=rsteps, backend=backend)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, c, f, h, w, device=dev, generator=g)
    text = torch.randn(batch, 16, mcfg.text_dim, device=dev, generator=g)
    reset_peak_memory(dev)

    times, res_times = [], []
    for i in range(steps + 1):  # the first step is warm-up
        with Stopwatch(dev) as resample:
            with amp:
                hist, _ = degrade_history(model, x, text, settings, generator=g)
        with Stopwatch(dev) as rest:
            t = sample_logit_normal((batch, n), generator=g, device=dev)
            eps = torch.randn(x.shape, generator=g, device=dev)
            tf = t.repeat_interleave(cf, 1)[:, None, :, None, None]
            with amp:
                v = model.forward_dual(hist, (1 - tf) * x + tf * eps, t, text, attn)
            loss, _ = velocity_loss(v, eps - x, cf)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i:
            times.append(resample.seconds + rest.seconds)
            res_times.append(resample.seconds)
    peak = peak_memory(dev)[0] - (0.0 if dev.type == "cuda" else base_rss)
    return {"model": preset, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": batch, "latent": [c, f, h, w], "chunks": n, "tokens_dual": attn.spec.seq_len,
            "objective": objective if objective == "teacher_forcing" else f"resampling ({rsteps} step{'s' * (rsteps > 1)})",
            "step_s": median(times), "resample_s": median(res_times),
            "peak_mem_MB": round(peak), "device": device, "threads": torch.get_num_threads()}


def _main(argv=None) -> int:
    ap = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    ap.add_argument("--models", type=choice_list(SHAPES), default="tiny,wan-100m",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--steps", type=positive_int, default=5, help="measured steps per case (median reported)")
    ap.add_argument("--device", type=device_name, default="cpu")
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    if args.device != "cpu":  # torch only for this check: the cases run in subprocesses
        check_device("--device", args.device)
    if args.one:
        preset, obj, rs = args.one.split(":")
        print(json.dumps(run_one(preset, obj, int(rs), args.steps, args.device, args.threads, args.checkpointing)))
        return 0
    check_out("--json", args.json)
    rows = []
    for preset in args.models.split(","):
        for obj, rs in OBJECTIVES:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{preset}:{obj}:{rs}", "--steps", str(args.steps),
                   "--device", args.device, "--threads", str(args.threads)] + (["--checkpointing"] if args.checkpointing else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {preset:>16} {rows[-1]['objective']:>22}: {rows[-1]['step_s']:.3f} s", file=sys.stderr)
    print(f"\nload average before/after: {os.getloadavg()[0]:.2f} (1 min)\n")
    print("| model | params | batch x latent | dual tokens | objective | step (s) | x TF | resample part (s) | peak mem (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    tf_time = {}
    for r in rows:
        if r["objective"] == "teacher_forcing":
            tf_time[r["model"]] = r["step_s"]
        ratio = r["step_s"] / tf_time[r["model"]]
        print(f"| {r['model']} | {r['params_M']}M | {r['batch']} x {r['latent']} | {r['tokens_dual']} | {r['objective']} "
              f"| {r['step_s']:.3f} | {ratio:.2f} | {r['resample_s']:.3f} | {r['peak_mem_MB']} |")
    if args.json:
        from resampling_forcing.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
