#!/usr/bin/env python
"""Encode a video manifest to VAE latents + text embeddings once, in resumable shards.

    python train/precompute.py --config configs/wan1.3b_stage1_tf.yaml \
        --manifest data/videos/manifest.jsonl --out data/latents_5s_480p --device cuda --dtype bf16

Clip length, resolution and fps come from the config's `data` section; the encoders from its
`encoders` section. Rerunning the same command after an interruption encodes only what is
missing. Bad videos are skipped (one warning each) and counted in the closing summary. Training
then reads the store with `data.source=latents data.latents_dir=OUT`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from resampling_forcing.config import ConfigError, load_config  # noqa: E402
from resampling_forcing.data.latents import precompute  # noqa: E402
from resampling_forcing.data.video import VideoClipDataset  # noqa: E402
from resampling_forcing.encoders import build_text_encoder, build_vae  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--manifest", default=None, help="CSV/JSONL manifest (default: config data.manifest)")
    p.add_argument("--out", default=None, help="store directory (default: config data.latents_dir)")
    p.add_argument("--split", default="train", help="manifest split to encode ('' for all rows)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="encoder dtype and stored dtype")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store in --out")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        manifest = args.manifest or cfg.data.manifest
        out = args.out or cfg.data.latents_dir
        if not manifest or not out:
            raise ValueError("give --manifest and --out (or data.manifest / data.latents_dir in the config)")
        d = cfg.data
        dataset = VideoClipDataset(manifest, d.num_frames, d.height, d.width, fps=d.fps,
                                   split=args.split or None, random_start=False)
        dtype = DTYPES[args.dtype]
        vae = build_vae(cfg.encoders, device=args.device, dtype=dtype)
        text = build_text_encoder(cfg.encoders, device=args.device, dtype=dtype)
        index = precompute(dataset, vae, text, out, shard_size=args.shard_size, device=args.device,
                           dtype=dtype, overwrite=args.overwrite)
    except (ConfigError, ValueError, OSError) as e:
        print(f"precompute: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"precompute: {index.get('num_items', '?')} clips in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
