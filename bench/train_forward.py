"""Training forward(+backward) of the [history | noisy] sequence: time, peak memory, sparsity.

Measures, per model size and attention backend:
- forward+backward time per step and peak memory (CUDA: max_memory_allocated; CPU: peak RSS of
  a fresh subprocess, which includes the Python/torch baseline, reported separately),
- forward-only time for SDPA with a dense mask vs FlexAttention with the BlockMask,
- the block sparsity of the dual mask (fraction of 128x128 tiles FlexAttention skips).

CPU:  python bench/train_forward.py --presets tiny wan-100m --out outputs/bench/train_forward.json
GPU:  python bench/train_forward.py --device cuda --dtype bf16 --presets wan2.1-t2v-1.3b \\
        --latent 21x60x104 --chunk-frames 3 --backends sdpa flex --layers 2
      (the 1.3B shape at 5 s: 7 chunks x 3 latent frames x 1560 tokens, two streams; --layers
      keeps only a few blocks so time per block can be scaled to 30 blocks)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (OneLineParser, DTYPE_NAMES, BadInput, check_device, check_out, device_name,  # noqa: E402
                          nonneg_int, positive_int, run_main, torch_dtype)
from resampling_forcing.attention.backends import resolve_backend  # noqa: E402
from resampling_forcing.attention.masks import MaskSpec, block_sparsity  # noqa: E402
from resampling_forcing.attention.ops import MaskedAttention  # noqa: E402
from resampling_forcing.attention.spec import BACKENDS  # noqa: E402
from resampling_forcing.config import MODEL_PRESETS, ModelConfig, resolve_model  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.models.wan import CausalWanModel, count_parameters  # noqa: E402
from resampling_forcing.timing import Stopwatch, median, peak_memory, reset_peak_memory, sync  # noqa: E402

PROG = "bench/train_forward.py"
DEFAULTS = {"tiny": ("12x8x8", 2), "wan-100m": ("12x16x16", 3)}  # preset -> (latent FxHxW, chunk frames)

def _measure(args_dict: dict) -> dict:
    a = argparse.Namespace(**args_dict)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), torch_dtype(a.dtype)
    cfg = resolve_model(ModelConfig(preset=a.preset, chunk_frames=a.chunk_frames))
    if a.layers:
        cfg.num_layers = a.layers
    model = CausalWanModel(cfg).to(device=device, dtype=dtype)
    f, h, w = a.latent
    n = f // cfg.chunk_frames
    x = torch.randn(a.batch, cfg.in_channels, f, h, w, device=device, dtype=dtype)
    ctx = torch.randn(a.batch, a.text_len, cfg.text_dim, device=device, dtype=dtype)
    t = torch.rand(a.batch, n, device=device)
    spec = MaskSpec("dual", n, model.chunk_tokens(h, w))
    op = MaskedAttention(spec, a.backend)

    def step():
        if a.mode == "fwd":
            with torch.no_grad():
                return model.forward_dual(x, x, t, ctx, op)
        out = model.forward_dual(x, x, t, ctx, op)
        out.float().square().mean().backward()
        return out

    for _ in range(a.warmup):
        step()
    sync(device)
    reset_peak_memory(device)
    times = []
    for _ in range(a.repeats):
        with Stopwatch(device) as sw:
            step()
        times.append(sw.seconds)
    peak_mib = peak_memory(device)[0]
    return dict(preset=a.preset, params_m=round(count_parameters(model) / 1e6, 1), layers=cfg.num_layers,
                mode=a.mode, backend=a.backend, tokens=spec.seq_len, batch=a.batch,
                step_s=round(median(times), 4), peak_mem_mb=round(peak_mib, 1))


def run_isolated(args_dict: dict) -> dict:
    """One measurement per fresh process, so CPU peak RSS belongs to that measurement alone."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (args_dict,))


def latent_of(preset: str, args) -> tuple[list[int], int]:
    """(latent [F, H, W], chunk frames) of one preset: --latent / --chunk-frames or its defaults, F a whole
    number of chunks and H, W of patches. BadInput naming the flag."""
    lat, cf = DEFAULTS.get(preset, ("21x60x104", 3))
    text = args.latent or lat
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(v.strip().isdigit() and int(v) > 0 for v in parts):
        raise BadInput(f"--latent {text}: expected FxHxW, three positive whole numbers (frames x height x width), "
                       "e.g. 12x16x16")
    lat = [int(v) for v in parts]
    cf = args.chunk_frames or cf
    if lat[0] % cf:
        raise BadInput(f"--latent {text}: {lat[0]} latent frames are not a whole number of {cf}-frame chunks "
                       f"(--chunk-frames {cf}) for {preset}")
    _, ph, pw = MODEL_PRESETS[preset]["patch_size"]
    if lat[1] % ph or lat[2] % pw:
        raise BadInput(f"--latent {text}: height and width must be multiples of the {preset} patch {ph}x{pw}")
    return lat, cf


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "wan-100m"], choices=list(MODEL_PRESETS), metavar="PRESET",
                   help=f"model presets: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--backends", nargs="+", default=["sdpa", "flex"], choices=BACKENDS, metavar="BACKEND",
                   help=f"attention backends: {', '.join(BACKENDS)}")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--latent", default=None, help="FxHxW latent size (default per preset)")
    p.add_argument("--chunk-frames", type=positive_int, default=None)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--text-len", type=positive_int, default=16)
    p.add_argument("--layers", type=nonneg_int, default=0, help="override the number of blocks (0 = preset)")
    p.add_argument("--warmup", type=nonneg_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = {preset: latent_of(preset, args) for preset in args.presets}  # every flag before the first run
    check_out("--out", args.out)
    device = check_device("--device", args.device)
    for backend in args.backends:
        try:
            resolve_backend(backend, device)
        except ValueError as e:
            raise BadInput(f"--backends: {e}") from None

    rows = []
    for preset in args.presets:
        lat, cf = shapes[preset]
        base = dict(preset=preset, device=args.device, dtype=args.dtype, latent=lat, chunk_frames=cf,
                    batch=args.batch, text_len=args.text_len, layers=args.layers, warmup=args.warmup,
                    repeats=args.repeats, threads=args.threads)
        tpf = (lat[1] // 2) * (lat[2] // 2)
        spec = MaskSpec("dual", lat[0] // cf, cf * tpf)
        sparsity = block_sparsity(spec)
        # Backward needs sdpa on CPU (FlexAttention has no CPU backward).
        for backend in args.backends:
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd+bwd" and backend == "flex" and args.device == "cpu":
                    continue
                row = run_isolated(dict(base, backend=backend, mode=mode))
                row["block_sparsity"] = round(sparsity, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    baseline = run_isolated(dict(preset="tiny", device="cpu", dtype="fp32", latent=[2, 2, 2], chunk_frames=1,
                                 batch=1, text_len=1, layers=1, warmup=0, repeats=1, threads=1,
                                 backend="sdpa", mode="fwd")) if args.device == "cpu" else None
    print("\n| preset | params (M) | backend | mode | tokens | step (s) | peak mem (MB) | block sparsity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params_m']} | {r['backend']} | {r['mode']} | {r['tokens']} | "
              f"{r['step_s']} | {r['peak_mem_mb']} | {r['block_sparsity']} |")
    if baseline:
        print(f"\nCPU peak memory is process RSS; an empty process with torch uses {baseline['peak_mem_mb']} MB.")
    if args.out:
        atomic_write_json(args.out, dict(rows=rows, rss_baseline=baseline))
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
