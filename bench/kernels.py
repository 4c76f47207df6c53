#!/usr/bin/env python
"""Check and time history-routed attention (one run, one GPU).

    python bench/kernels.py --out outputs/bench/kernels.json          # GPU (H100/H200 class)
    TRITON_INTERPRET=1 python bench/kernels.py --smoke --out x.json   # CPU plumbing check, tiny shapes

Stage 1, correctness (small shapes; exits 1 at the end if any check fails, after timing and writing):
  * fused routing kernel == select_chunks_reference, exactly (inference and training `allowed`);
  * routed attention kernel vs routed_attention_reference (fp32 math) in bf16 and fp16, tokens per
    chunk not a multiple of the tile; the torch fallback too; top-k >= history == dense SDPA;
  * FlexAttention with routed_block_mask == reference;
  * training: routed_training_attention flex vs sdpa, forward and gradients (GPU only).
Stage 2, timing (CUDA events, warmup, median), Wan2.1-1.3B shape by default: 12 heads x 128, chunk =
3 latent frames x 1560 tokens = 4680 tokens, queries = one chunk, histories of 5/10/20/40/60 chunks,
top-k 1 and 5, bf16, batch 1. Methods:
  select       fused routing kernel (scores + top-k), Triton
  triton       routed attention kernel (history in place + current chunk), Triton
  dense_sdpa   SDPA over all history + current (what routing replaces)
  flex         compiled FlexAttention over [history | current] with routed_block_mask (mask build timed apart)
  gather_sdpa  per 512-query block: gather the block's union of selected chunks, SDPA with a bool mask
  torch        the library's torch fallback (routed_attention(backend="torch"))
  auto         routed_attention(backend="auto"): the per-call choice between the two (one host sync)
After the timings, the torch path's slowdown per (query, key) pair relative to the kernel's is fitted
from each (pattern, N, k) with both rows (attention.backends.TORCH_PATH_SLOWDOWN: the kernel runs when
its visited pairs <= slowdown x the exact pairs) and printed with how often the current value picks the
faster path.
TFLOP/s counts 4*D flops per (query, attended key): the routed work for routed methods, the full
dense work for dense_sdpa. `blk_chunks` = mean number of history chunks a query block of the
kernel (`block_rows`: 128 queries on GPU) visits (its real cost), `tok_chunks` = chunks attended per query token (= k + nothing else here).

The JSON (--out) is rewritten atomically after the checks and after each history length, so a run killed
at a time limit keeps what it measured (`complete`: false until the end).

Query/key synthesis (`--pattern`, a comma list; default both, timed one after the other): "coherent" gives each 520-token region of the chunk its
own preference over history chunks (real routing is spatially coherent: neighbouring tokens pick the
same chunks); "random" is i.i.d. noise (per-token picks are uncorrelated: worst case for block skipping).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (wan13b_shape, OneLineParser, BadInput, add_attention_shape_args, check_out, choice_list,  # noqa: E402
                          given_flags, nonneg_int, positive_int, report_bad_input, torch_dtype)  # torch-free

PROG = "bench/kernels.py"
METHODS = ("select", "triton", "dense_sdpa", "flex", "gather_sdpa", "torch", "auto")
# --smoke runs fixed tiny shapes in fp32 on CPU: these flags would be silently ignored, so they are refused
SMOKE_IGNORES = ("histories", "topk", "heads", "head_dim", "chunk_tokens", "dtype", "warmup", "reps", "tune")


def parse_args(argv=None):
    """The flags, all checked before torch is imported (BadInput: one line naming the flag)."""
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny fixed shapes in fp32 on CPU through the Triton interpreter; refuses the shape and timing "
                        "flags it would ignore (--histories, --topk, --heads, --head-dim, --chunk-tokens, --dtype, "
                        "--warmup, --reps, --tune)")
    p.add_argument("--out", default="outputs/bench/kernels.json", help="where to write the JSON results")
    add_attention_shape_args(p, history_flag="--histories", history="5,10,20,40,60", topk_flag="--topk")
    p.add_argument("--chunk-tokens", type=positive_int, default=wan13b_shape(3)[2],
                   help="tokens per chunk (default: the paper's 3 latent frames of Wan2.1 at 480p)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--pattern", type=choice_list(("coherent", "random")), default="coherent,random",
                   help="comma list of coherent, random: the timings run for each (the checks use the first)")
    p.add_argument("--warmup", type=nonneg_int, default=3)
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument(
        "--methods", type=choice_list(METHODS), default="select,triton,dense_sdpa,flex,gather_sdpa,torch,auto",
        help="comma list of: select,triton,dense_sdpa,flex,gather_sdpa,torch,auto",
    )
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--tune", action="store_true", help="also time a few kernel tile configs at the largest shape")
    args = p.parse_args(argv)
    if args.smoke:
        ignored = [d for d in SMOKE_IGNORES if d in given_flags(p, argv)]
        if ignored:
            flags = ", ".join("--" + d.replace("_", "-") for d in ignored)
            raise BadInput(f"{flags}: not used with --smoke (fixed tiny shapes, fp32, one rep); drop them or --smoke")
    check_out("--out", args.out)
    return args


try:
    ARGS = parse_args()
except BadInput as _e:
    sys.exit(report_bad_input(PROG, _e))
PATTERNS = [x.strip() for x in ARGS.pattern.split(",") if x.strip()]
if ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


from resampling_forcing.attention import routing as R  # noqa: E402
from resampling_forcing.attention.backends import flex_fn as _flex_fn, kernels  # noqa: E402
from resampling_forcing.attention.masks import MaskSpec  # noqa: E402
from resampling_forcing.io import atomic_write_text  # noqa: E402
from resampling_forcing.timing import Stopwatch, time_fn  # noqa: E402

# `resampling_forcing.kernels` is the repo folder kernels/routing/ (pyproject package-dir): `pip install -e .` first.
K = kernels()
if K is None:
    sys.exit("bench/kernels.py: the Triton kernels do not import; install the package (pip install -e ., which maps "
             "kernels/routing/ to resampling_forcing.kernels) and triton")
try:  # one compiled flex graph per history length (+ checks): stay under dynamo's recompile limit
    import torch._dynamo

    for _name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, _name):
            setattr(torch._dynamo.config, _name, max(64, getattr(torch._dynamo.config, _name)))
except Exception:
    pass
DEV = torch.device("cuda" if torch.cuda.is_available() and not ARGS.smoke else "cpu")
CHECKS: list[dict] = []
TIMINGS: list[dict] = []


# ------------------------------------------------------------------------------------------------
# utilities
# ------------------------------------------------------------------------------------------------
def record_check(name, ok, **info):
    row = dict(name=name, ok=bool(ok), **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
    CHECKS.append(row)
    extras = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in ("name", "ok"))
    print(f"[{'ok' if ok else 'FAIL'}] {name} {extras}", flush=True)


def guarded_check(name, fn):
    try:
        fn()
    except Exception as e:  # a crash is a failed check, not a dead benchmark
        record_check(name, False, error=f"{type(e).__name__}: {str(e)[:300]}")


def max_err(a, b):
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return float("inf")
    return float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0


def flex_fn():
    return _flex_fn(DEV)


def make_inputs(B, Hh, N, T, Lc, D, dtype, pattern, gen):
    """q [B,Hh,Lc,D], k/v history [B,Hh,N*T,D], k/v current. Unit-variance entries."""
    def rn(*shape):
        return torch.randn(*shape, device=DEV, dtype=torch.float32, generator=gen)

    if pattern == "coherent" and N > 0:
        region = max(1, min(520, Lc // 4 or 1))
        n_reg = -(-Lc // region)
        # each history chunk has its own mean direction; each query region prefers a few chunks
        mu = rn(B, Hh, N, D) * 0.7
        kh = (mu.repeat_interleave(T, dim=2) + rn(B, Hh, N * T, D) * 0.7)
        pref = rn(B, Hh, n_reg, D)
        q = pref.repeat_interleave(region, dim=2)[:, :, :Lc] * 0.8 + rn(B, Hh, Lc, D) * 0.6
    else:
        kh = rn(B, Hh, N * T, D)
        q = rn(B, Hh, Lc, D)
    vh, kc, vc = rn(B, Hh, N * T, D), rn(B, Hh, Lc, D), rn(B, Hh, Lc, D)
    return [t.to(dtype).contiguous() for t in (q, kh, vh, kc, vc)]


def attended_flops(sel, T, Lc, D):
    """4*D per (query, attended key): routed useful work."""
    keys = sel.sum(dim=-1).double() * T + Lc  # [B,Hh,Lq]
    return float(4 * D * keys.sum())


def block_union_chunks(sel, block_m=128):
    """Mean number of history chunks visited by a block of `block_m` queries (kernel's real work), from
    the library's count (routing.routed_work with 1-token chunks and no current chunk: visited x block_m)."""
    B, Hh, Lq, N = sel.shape
    if N == 0:
        return 0.0
    visited_rows = R.routed_work(sel, 1, 0, block_m)[0].item()
    return visited_rows / block_m / (B * Hh * -(-Lq // block_m))


def gather_sdpa(q, kh, vh, kc, vc, sel, T, block=512):
    """Baseline: per query block, gather the block's union of selected chunks + current, SDPA with a mask."""
    B, Hh, Lq, D = q.shape
    N = sel.shape[-1]
    outs = []
    khc, vhc = kh.unflatten(2, (N, T)), vh.unflatten(2, (N, T))
    for s0 in range(0, Lq, block):
        sb = sel[:, :, s0:s0 + block]
        idx = sb.reshape(-1, N).any(0).nonzero().squeeze(1)  # host sync per block
        kk = torch.cat([khc.index_select(2, idx).flatten(2, 3), kc], dim=2)
        vv = torch.cat([vhc.index_select(2, idx).flatten(2, 3), vc], dim=2)
        m = torch.cat(
            [sb.index_select(3, idx).repeat_interleave(T, dim=-1),
             torch.ones(B, Hh, sb.shape[2], kc.shape[2], dtype=torch.bool, device=q.device)], dim=-1,
        )
        outs.append(F.scaled_dot_product_attention(q[:, :, s0:s0 + block], kk, vv, attn_mask=m))
    return torch.cat(outs, dim=2)


# ------------------------------------------------------------------------------------------------
# stage 1: correctness
# ------------------------------------------------------------------------------------------------
def run_checks():
    smoke = ARGS.smoke
    gen = torch.Generator(device=DEV).manual_seed(0)
    dtypes = [torch.float32, torch.float16] if smoke else [torch.bfloat16, torch.float16]
    Hh, D = (2, 16) if smoke else (ARGS.heads, ARGS.head_dim)
    T, N = (13, 3) if smoke else (300, 6)
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 1e-3), torch.bfloat16: (2e-2, 1e-3)}

    # -- fused routing kernel == reference (exact)
    def check_select():
        Lq, Nn = (40, 5) if smoke else (512, 20)
        q, kh, _, _, _ = make_inputs(1, Hh, Nn, 16 if smoke else 64, Lq, D, dtypes[0], PATTERNS[0], gen)
        mk = R.chunk_means(kh, 16 if smoke else 64)
        specs = [R.RoutingSpec("topk", top_k=1), R.RoutingSpec("topk", top_k=5, sink_chunks=1, window_chunks=1),
                 R.RoutingSpec("window", window_chunks=2)]
        allowed = torch.rand(Lq, Nn, device=DEV, generator=gen) > 0.3
        bad = 0
        for spec in specs:
            for al in (None, allowed):
                got = K.routing_select(q, mk, spec, allowed=al)
                bad += int((got != R.select_chunks_reference(q, mk, spec, al)).sum())
        record_check("routing_select == reference (exact)", bad == 0, mismatches=bad)

    guarded_check("routing_select == reference (exact)", check_select)

    # -- routed attention kernel / torch fallback vs reference
    for dt in dtypes:
        def check_attn(dt=dt):
            q, kh, vh, kc, vc = make_inputs(2 if smoke else 1, Hh, N, T, T, D, dt, PATTERNS[0], gen)
            sel = R.select_chunks(q, R.chunk_means(kh, T), R.RoutingSpec("topk", top_k=2), backend="triton")
            sel = sel | (torch.rand(sel.shape, device=DEV, generator=gen) > 0.8)  # per-token variety
            ref_o, ref_l = R.routed_attention_reference(q, kh, vh, kc, vc, sel, T)
            out, lse = K.routed_attention_fwd(q, kh, vh, kc, vc, sel, T)
            eo, el = max_err(out, ref_o), max_err(lse, ref_l)
            atol, ltol = tol[dt]
            record_check(f"triton kernel vs reference {str(dt)[6:]}", eo <= atol and el <= ltol, err_out=eo, err_lse=el)
            out_t, lse_t = R.routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
            eo, el = max_err(out_t, ref_o), max_err(lse_t, ref_l)
            record_check(f"torch fallback vs reference {str(dt)[6:]}", eo <= atol and el <= ltol, err_out=eo, err_lse=el)

        guarded_check(f"attention vs reference {dt}", check_attn)

    # -- top-k >= history equals dense SDPA; flex with routed_block_mask equals reference
    def check_dense_and_flex():
        dt = dtypes[0]
        q, kh, vh, kc, vc = make_inputs(1, Hh, N, T, T, D, dt, PATTERNS[0], gen)
        sel = R.select_chunks(q, R.chunk_means(kh, T), R.RoutingSpec("topk", top_k=N + 1), backend="triton")
        out, _ = K.routed_attention_fwd(q, kh, vh, kc, vc, sel, T)
        dense = F.scaled_dot_product_attention(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2))
        e = max_err(out, dense)
        record_check("k >= history == dense SDPA", bool(sel.all()) and e <= 2 * tol[dt][0], err_out=e)
        sel = R.select_chunks(q, R.chunk_means(kh, T), R.RoutingSpec("topk", top_k=2), backend="triton")
        bm = R.routed_block_mask(sel, T, T, 128)
        fo = flex_fn()(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2), block_mask=bm)
        ref_o, _ = R.routed_attention_reference(q, kh, vh, kc, vc, sel, T)
        e = max_err(fo, ref_o)
        record_check("flex(routed_block_mask) vs reference", e <= 2 * tol[dt][0], err_out=e)

    guarded_check("dense / flex checks", check_dense_and_flex)

    # -- training: flex vs sdpa, forward (+ gradients on GPU)
    def check_training():
        Nt, Tt, Ht, Dt = (3, 7, 2, 16) if smoke else (5, 67, 4, 64)
        L = MaskSpec("dual", Nt, Tt).seq_len  # [H_1..H_{N-1} | Q_1..Q_N]
        dt = torch.float32
        q, k, v = (torch.randn(1, Ht, L, Dt, device=DEV, generator=gen, dtype=dt).requires_grad_(not smoke) for _ in range(3))
        spec = R.RoutingSpec("topk", top_k=1, sink_chunks=1)
        with torch.set_grad_enabled(not smoke):
            o_s = R.routed_training_attention(q, k, v, Nt, Tt, spec, backend="sdpa")
            o_f = R.routed_training_attention(q, k, v, Nt, Tt, spec, backend="flex")
        e = max_err(o_f, o_s)
        ok = e <= 1e-3
        info = dict(err_out=e)
        if not smoke:
            g = torch.randn_like(o_s)
            gs = torch.autograd.grad(o_s, (q, k, v), g)
            gf = torch.autograd.grad(o_f, (q, k, v), g)
            eg = max(max_err(a, b) for a, b in zip(gf, gs))
            info["err_grad"] = eg
            ok = ok and eg <= 5e-3
        record_check("training flex vs sdpa" + ("" if smoke else " (+grads)"), ok, **info)

    guarded_check("training flex vs sdpa", check_training)


# ------------------------------------------------------------------------------------------------
# stage 2: timing
# ------------------------------------------------------------------------------------------------
def run_timings(on_progress=lambda: None):
    """Time every (pattern, history length) case; `on_progress()` after each (saves the JSON so far)."""
    smoke = ARGS.smoke
    dtype = torch.float32 if smoke else torch_dtype(ARGS.dtype)
    Hh, D, T = (2, 16, 13) if smoke else (ARGS.heads, ARGS.head_dim, ARGS.chunk_tokens)
    histories = [2, 3] if smoke else [int(x) for x in ARGS.histories.split(",")]
    topks = [1, 2] if smoke else [int(x) for x in ARGS.topk.split(",")]
    warmup, reps = (0, 1) if smoke else (ARGS.warmup, ARGS.reps)
    methods = [m.strip() for m in ARGS.methods.split(",") if m.strip()]
    B, Lc = 1, T
    gen = torch.Generator(device=DEV).manual_seed(1)
    for pattern, N in ((p, n) for p in PATTERNS for n in histories):
        try:
            q, kh, vh, kc, vc = make_inputs(B, Hh, N, T, Lc, D, dtype, pattern, gen)
        except torch.OutOfMemoryError as e:  # type: ignore[attr-defined]
            print(f"skip N={N}: {e}")
            continue
        mk = R.chunk_means(kh, T)
        k_all = v_all = None
        if "dense_sdpa" in methods or "flex" in methods:
            k_all, v_all = torch.cat([kh, kc], 2), torch.cat([vh, vc], 2)
        dense_flops = 4.0 * D * B * Hh * Lc * (N * T + Lc)
        dense_row = None
        for k in topks:
            spec = R.RoutingSpec("topk", top_k=k)
            sel = K.routing_select(q, mk, R.RoutingSpec("topk", top_k=k))
            useful = attended_flops(sel, T, Lc, D)
            kernel_pairs, exact_pairs = R.routed_work(sel, T, Lc, K.block_rows(D)).tolist()
            base = dict(history_chunks=N, top_k=k, heads=Hh, head_dim=D, chunk_tokens=T, dtype=str(dtype)[6:],
                        pattern=pattern, tok_chunks=float(sel.sum(-1).double().mean()),
                        blk_chunks=block_union_chunks(sel, K.block_rows(D)), routed_tflop=useful / 1e12,
                        dense_tflop=dense_flops / 1e12, kernel_pairs=kernel_pairs, exact_pairs=exact_pairs)

            def add(method, fn, flops, reps_=reps, extra=None):
                row = dict(base, method=method)
                try:
                    ms = time_fn(fn, DEV, warmup, reps_)
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                except Exception as e:  # OOM or missing feature: record, keep going
                    row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:200]}")
                    if DEV.type == "cuda":
                        torch.cuda.empty_cache()
                if extra:
                    row.update(extra)
                TIMINGS.append(row)
                print(f"  N={N:3d} k={k} {method:12s} " + (f"{row['ms']:9.3f} ms" if row.get("ms") is not None else row["error"]), flush=True)
                return row

            if "select" in methods:
                add("select", lambda: K.routing_select(q, mk, R.RoutingSpec("topk", top_k=k)), 4.0 * D * B * Hh * Lc * N / 2)
            if "triton" in methods:
                add("triton", lambda: K.routed_attention_fwd(q, kh, vh, kc, vc, sel, T), useful)
            if "dense_sdpa" in methods:
                if dense_row is None:
                    dense_row = add("dense_sdpa", lambda: F.scaled_dot_product_attention(q, k_all, v_all), dense_flops)
                else:  # independent of k: reuse the measurement (or its error)
                    TIMINGS.append(dict(base, **{c: dense_row.get(c) for c in ("method", "ms", "tflops", "error") if c in dense_row}))
            if "flex" in methods:
                with Stopwatch(DEV) as sw:
                    bm = R.routed_block_mask(sel, T, Lc, 128)
                mask_ms = sw.seconds * 1e3
                add("flex", lambda: flex_fn()(q, k_all, v_all, block_mask=bm), useful,
                    extra=dict(mask_build_ms=mask_ms))
                del bm
            if "gather_sdpa" in methods:
                add("gather_sdpa", lambda: gather_sdpa(q, kh, vh, kc, vc, sel, T), useful)
            if "torch" in methods:
                add("torch", lambda: R.routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch"), useful,
                    reps_=max(1, reps // 5))
            if "auto" in methods:
                add("auto", lambda: R.routed_attention(q, kh, vh, kc, vc, sel, T, backend="auto"), useful,
                    reps_=max(1, reps // 5))
                TIMINGS[-1]["auto_path"] = R.last_routed_path()
        del q, kh, vh, kc, vc, k_all, v_all
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        on_progress()


def add_speedups():
    """Each row's speed-up over the dense_sdpa row of its (pattern, N, k), where there is one."""
    for row in TIMINGS:
        d = next((r for r in TIMINGS if r["method"] == "dense_sdpa" and r["history_chunks"] == row["history_chunks"]
                  and r["top_k"] == row["top_k"] and r["pattern"] == row["pattern"] and r.get("ms")), None)
        row["speedup_vs_dense"] = (d["ms"] / row["ms"]) if d and row.get("ms") and row["method"] != "select" else None


def fit_choice(verbose=True):
    """The torch path's slowdown per (query, key) pair relative to the kernel's, per case with both
    timings: the break-even value of attention.backends.TORCH_PATH_SLOWDOWN for that case (the kernel
    wins there iff kernel_pairs <= slowdown * exact_pairs). Returns the cases, their median and how many
    the library's current value decides right."""
    from resampling_forcing.attention.backends import TORCH_PATH_SLOWDOWN, kernel_is_cheaper

    cases = []
    for r in TIMINGS:
        if r["method"] != "triton" or not r.get("ms"):
            continue
        t = next((x for x in TIMINGS if x["method"] == "torch" and x.get("ms") and all(
            x[c] == r[c] for c in ("pattern", "history_chunks", "top_k"))), None)
        if t is None:
            continue
        breakeven = (t["ms"] / r["exact_pairs"]) / (r["ms"] / r["kernel_pairs"])
        kernel_faster = r["ms"] <= t["ms"]
        cases.append(dict(pattern=r["pattern"], history_chunks=r["history_chunks"], top_k=r["top_k"],
                          inflation=r["kernel_pairs"] / r["exact_pairs"], breakeven_slowdown=breakeven,
                          kernel_faster=kernel_faster,
                          current_right=kernel_is_cheaper(r["kernel_pairs"], r["exact_pairs"]) == kernel_faster))
    if not cases:
        return dict(cases=[])
    vals = sorted(c["breakeven_slowdown"] for c in cases)
    fit = dict(cases=cases, median_breakeven=vals[len(vals) // 2], current=TORCH_PATH_SLOWDOWN,
               current_right=sum(c["current_right"] for c in cases), n=len(cases))
    if verbose:
        print(f"TORCH_PATH_SLOWDOWN: break-even per case {', '.join(f'{v:.2f}' for v in vals)}; median "
              f"{fit['median_breakeven']:.2f}; the current {TORCH_PATH_SLOWDOWN} picks the faster path in "
              f"{fit['current_right']}/{fit['n']} cases", flush=True)
    return fit


def run_tune():
    """Kernel tile configs at the largest history and the largest k (GPU only)."""
    if DEV.type != "cuda":
        return []
    Hh, D, T = ARGS.heads, ARGS.head_dim, ARGS.chunk_tokens
    N = max(int(x) for x in ARGS.histories.split(","))
    k = max(int(x) for x in ARGS.topk.split(","))
    dtype = torch_dtype(ARGS.dtype)
    gen = torch.Generator(device=DEV).manual_seed(2)
    q, kh, vh, kc, vc = make_inputs(1, Hh, N, T, T, D, dtype, PATTERNS[0], gen)
    sel = K.routing_select(q, R.chunk_means(kh, T), R.RoutingSpec("topk", top_k=k))
    rows = []
    for bm_, bn_, nw, ns in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)]:
        try:
            ms = time_fn(lambda: K.routed_attention_fwd(q, kh, vh, kc, vc, sel, T, block_m=bm_, block_n=bn_,
                                                       num_warps=nw, num_stages=ns), DEV, ARGS.warmup, ARGS.reps)
            rows.append(dict(block_m=bm_, block_n=bn_, num_warps=nw, num_stages=ns, ms=ms,
                             blk_chunks=block_union_chunks(sel, bm_)))
        except Exception as e:
            rows.append(dict(block_m=bm_, block_n=bn_, num_warps=nw, num_stages=ns, error=str(e)[:200]))
        print("  tune", rows[-1], flush=True)
    return rows


def markdown(rows):
    cols = ["pattern", "history_chunks", "top_k", "method", "ms", "tflops", "speedup_vs_dense", "tok_chunks", "blk_chunks",
            "auto_path"]
    head = "| " + " | ".join(["pattern", "N hist", "k", "method", "ms", "TFLOP/s", "x dense", "chunks/token", "chunks/block",
                              "auto ran"]) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if v is None:
                vals.append(r.get("error", "-")[:40] if c == "ms" else "-")
            elif isinstance(v, float):
                vals.append(f"{v:.3f}" if c == "ms" else f"{v:.2f}")
            else:
                vals.append(str(v))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def env_info():
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(DEV), smoke=ARGS.smoke,
                triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if DEV.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
    return info


def main():
    if DEV.type != "cuda" and not ARGS.smoke:
        return report_bad_input(PROG, "no CUDA device here: run with --smoke (CPU, Triton interpreter, tiny shapes)")
    if K is None:
        return report_bad_input(PROG, "triton (or the kernels/ folder) is not importable")
    if DEV.type == "cpu" and not K.is_interpreted():
        return report_bad_input(PROG, "--smoke needs TRITON_INTERPRET=1 before the kernels are imported")
    t0 = time.time()
    info = env_info()
    out = Path(ARGS.out)
    tune: list = []

    def save(complete=False):
        """The JSON of everything measured so far, written atomically (temp file + rename): rewritten after
        the checks and after each history length, so a run killed at its time limit keeps its numbers
        (`complete` false: cut short; the table and the fit cover the rows so far)."""
        add_speedups()
        result = dict(env=info, args=vars(ARGS), complete=complete, checks=CHECKS, timings=TIMINGS, tune=tune,
                      table=markdown(TIMINGS), choice_fit=fit_choice(verbose=complete), wall_s=time.time() - t0)
        atomic_write_text(out, json.dumps(result, indent=1, default=str))

    print(json.dumps(info))
    if not ARGS.skip_checks:
        print("== correctness ==", flush=True)
        run_checks()
        save()
    print("== timing ==", flush=True)
    run_timings(on_progress=save)
    if ARGS.tune:
        tune = run_tune()
    add_speedups()
    print(markdown(TIMINGS))
    save(complete=True)  # prints the fit's line
    print(f"wrote {out} ({time.time() - t0:.1f} s)")
    failed = [c["name"] for c in CHECKS if not c["ok"]]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
