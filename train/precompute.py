#!/usr/bin/env python
"""Encode a video manifest to VAE latents + text embeddings once, in resumable shards.

    python train/precompute.py --config configs/wan1.3b_stage1_tf.yaml \\
        --manifest data/videos/manifest.jsonl --out data/latents_5s_480p --device cuda --dtype bf16

Clip length, resolution and fps come from the config's `data` section; the encoders from its
`encoders` section. Rerunning the same command after an interruption encodes only what is
missing. Bad videos are skipped (one warning each) and counted in the closing summary. Training
then reads the store with `data.source=latents data.latents_dir=OUT`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from resampling_forcing.cli import EXIT_INTERRUPTED, BadInput, OneLineParser, report_bad_input  # noqa: E402
from resampling_forcing.config import ConfigError, load_config  # noqa: E402
from resampling_forcing.data.latents import SHARD_GLOB, precompute, remove_store_files  # noqa: E402
from resampling_forcing.data.video import VideoClipDataset  # noqa: E402
from resampling_forcing.encoders import build_text_encoder, build_vae  # noqa: E402
from resampling_forcing.io import is_no_space, probe_writable_dir  # noqa: E402
from resampling_forcing.models.loading import DTYPES  # noqa: E402
from resampling_forcing.pipeline import resolve_device  # noqa: E402


def _shards_kept(out, existed) -> int:
    """The complete shards in --out after a stop (every shard is written atomically: a rerun encodes only
    the rest). A folder this run created without a shard holds only what it wrote (index, empty-prompt
    embedding), which is no result: it is removed."""
    if out is None or not Path(out).is_dir():
        return 0
    kept = len(list(Path(out).glob(SHARD_GLOB)))
    if not kept and existed is False:
        shutil.rmtree(out, ignore_errors=True)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="train/precompute.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--manifest", default=None, help="CSV/JSONL manifest (default: config data.manifest)")
    p.add_argument("--out", default=None, help="store directory (default: config data.latents_dir)")
    p.add_argument("--split", default="train", help="manifest split to encode (default: train; rows of other "
                   "splits are not encoded; '' for all rows)")
    p.add_argument("--shard-size", type=int, default=256, help="clips per shard file (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="stored dtype; the VAE encodes in fp32 (Wan's recommendation), the text encoder in "
                        "training's and sampling's dtype (umT5 on CUDA: bf16; else fp32)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store in --out")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    try:  # intermixed: key=value overrides may follow a later flag (`... data.fps=4 --out O data.height=16`)
        args = p.parse_intermixed_args(argv)
    except BadInput as e:
        return report_bad_input("precompute", e)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = out_existed = None
    try:
        args.device = resolve_device(args.device, what="--device", kinds=("cpu", "cuda"))
        if args.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1 (got {args.shard_size})")
        cfg = load_config(args.config, args.overrides, require_encoder_paths=True)
        manifest = args.manifest or cfg.data.manifest
        out = args.out or cfg.data.latents_dir
        if not manifest or not out:
            raise ValueError("give --manifest and --out (or data.manifest / data.latents_dir in the config)")
        out_existed = Path(out).exists()
        problem = probe_writable_dir(out)
        if problem:
            raise ValueError(f"--out {out}: {problem}; choose a folder you can write")
        d = cfg.data
        dataset = VideoClipDataset(manifest, d.num_frames, d.height, d.width, fps=d.fps,
                                   split=args.split or None, random_start=False)
        dtype = DTYPES[args.dtype]
        vae = build_vae(cfg.encoders, device=args.device, dtype=torch.float32)  # latents cast to dtype when stored
        text = build_text_encoder(cfg.encoders, device=args.device)  # the one dtype rule (encoders.text_dtype())
        index = precompute(dataset, vae, text, out, shard_size=args.shard_size, device=args.device,
                           dtype=dtype, overwrite=args.overwrite, encoders=dataclasses.asdict(cfg.encoders))
        if not index.get("num_items"):
            # an empty store is no use and would only be mistaken for a result: leave nothing behind
            if not out_existed:
                shutil.rmtree(out, ignore_errors=True)
            else:
                remove_store_files(out)
            bad = index.get("bad_files") or {}
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "none"
            raise ValueError(f"{manifest}: no usable video: all {index.get('num_rows', len(dataset))} files skipped "
                             f"({detail}); check the paths (relative to the manifest) and the files")
    except KeyboardInterrupt:
        kept = _shards_kept(out, out_existed)
        if kept:
            print(f"precompute: interrupted (Ctrl+C); {kept} shard(s) kept in {out}, rerun the same command to "
                  "continue", file=sys.stderr)
        else:
            print("precompute: interrupted (Ctrl+C) before any shard was written; rerun the same command",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, ValueError, OSError) as e:
        _shards_kept(out, out_existed)
        if isinstance(e, OSError) and is_no_space(e):
            msg = f"no space left on {args.out or 'the store folder'} ({str(e).splitlines()[0]}); free some space and rerun"
        else:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"precompute: error: {msg}", file=sys.stderr)
        return 2
    print(f"precompute: {index.get('num_items', '?')} clips in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
