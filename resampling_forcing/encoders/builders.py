"""Build a VAE / text encoder from a kind string, a mapping, or the project's ``EncoderConfig``."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..config import TEXT_KINDS, VAE_KINDS, WAN_VAES, EncoderConfig  # declared once, with the config schema
from .codec import VideoCodec
from .common import DeviceLike, EncoderLoadError
from .pixel_shuffle import PixelShuffleVAE
from .text import HashTextEncoder, UMT5TextEncoder
from .wan_vae import WanVAE


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _has(cfg: Any, key: str) -> bool:
    if cfg is None:
        return False
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def _spec_head(cfg: Any, prefix: str) -> tuple[Any, bool, dict]:
    """-> (cfg, EncoderConfig style?, {"kind", "path"}). A kind string becomes ``{"kind": cfg}``; an
    ``EncoderConfig`` (no ``kind``) names the two ``{prefix}`` / ``{prefix}_path`` (vae / vae_path)."""
    if isinstance(cfg, str):
        cfg = {"kind": cfg}
    enc_style = not _has(cfg, "kind") and _has(cfg, prefix)
    return cfg, enc_style, {"kind": _get(cfg, prefix if enc_style else "kind"),
                            "path": _get(cfg, f"{prefix}_path" if enc_style else "path")}


def build_vae(cfg: Any = None, *, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32,
              **overrides: Any) -> VideoCodec:
    """Build a latent space from a spec.

    ``cfg`` may be: a kind string; a mapping / object with ``kind`` (+ ``path`` for wan, ``factor``,
    ``temporal_factor``, ``scale``, ``shift`` for pixel_shuffle); or the project's
    ``EncoderConfig`` (``vae``, ``vae_path``, ``vae_factor``). Keyword ``overrides`` win.
    kinds: "wan" / "wan2.2" (:class:`WanVAE`, needs a path; the VAE found there must have the kind's
    downsampling, config.WAN_VAES), "pixel_shuffle" (:class:`PixelShuffleVAE`).
    Unknown kind -> ValueError naming the accepted values.
    """
    cfg, enc_style, spec = _spec_head(cfg, "vae")
    spec.update({
        "factor": _get(cfg, "vae_factor") if enc_style else _get(cfg, "factor", _get(cfg, "vae_factor")),
        "temporal_factor": _get(cfg, "temporal_factor", 1),
        "scale": _get(cfg, "scale", 1.0),
        "shift": _get(cfg, "shift", 0.0),
    })
    spec.update(overrides)
    kind = spec["kind"]
    if kind in WAN_VAES:
        if not spec["path"]:
            raise ValueError(f"build_vae: kind {kind!r} needs a path (encoders.vae_path) to a local {WAN_VAES[kind]['checkpoint']} "
                             "diffusers repo or its vae/ folder")
        vae = WanVAE(spec["path"], device=device, dtype=dtype)
        _check_wan_kind(vae, kind, spec["path"])
        return vae
    if kind == "pixel_shuffle":
        return PixelShuffleVAE(factor=int(spec["factor"] or 4), temporal_factor=int(spec["temporal_factor"] or 1),
                               scale=spec["scale"], shift=spec["shift"], device=device, dtype=dtype)
    raise ValueError(f"build_vae: unknown vae kind {kind!r}; accepted: {', '.join(map(repr, VAE_KINDS))}")


def _check_wan_kind(vae: WanVAE, kind: str, path) -> None:
    """The config's geometry rules (resolution multiples, memory) follow the kind: the VAE must match it."""
    want, name = WAN_VAES[kind], WAN_VAES[kind]["checkpoint"]
    got = dict(spatial=vae.spatial_factor, temporal=vae.temporal_factor)
    if got != {k: want[k] for k in got}:
        other = [k for k, g in WAN_VAES.items() if g["spatial"] == got["spatial"] and g["temporal"] == got["temporal"]]
        fix = f"set encoders.vae={other[0]}" if other else f"give a {name} VAE"
        raise EncoderLoadError(f"encoders.vae={kind} expects {name}'s VAE ({want['temporal']}x{want['spatial']}x"
                               f"{want['spatial']} downsampling), {path} holds one with {got['temporal']}x{got['spatial']}x"
                               f"{got['spatial']}: {fix}")


def text_dtype(kind: str, device: DeviceLike) -> torch.dtype:
    """The text encoder's compute dtype, one rule for training, precompute, a store's empty-prompt
    embedding and sampling (so the unconditional branch of guidance sees what training saw): umT5 on CUDA
    in bf16 (its released weights' precision, as Wan's own code runs it), everything else in fp32."""
    return torch.bfloat16 if kind == "umt5" and torch.device(device).type == "cuda" else torch.float32


def build_text_encoder(cfg: Any = None, *, device: DeviceLike = "cpu", dtype: torch.dtype | None = None,
                       **overrides: Any):
    """Build a text encoder from a spec, computing in `dtype` (None: `text_dtype`'s rule).

    ``cfg`` may be: a kind string; a mapping / object with ``kind`` (+ ``path``, ``text_len``,
    ``dim`` / ``text_dim``, ``seed``, ``text_encoder_path``, ``tokenizer_path``); or the project's
    ``EncoderConfig`` (``text``, ``text_path``, ``text_len``, ``text_dim``). Keyword overrides win.
    kinds: "umt5" (:class:`UMT5TextEncoder`, needs a path) and "hash" (:class:`HashTextEncoder`;
    ``text_dim`` is used only here, umT5 reports its own). Unknown kind -> ValueError.
    """
    cfg, _, spec = _spec_head(cfg, "text")
    spec.update({
        "text_len": _get(cfg, "text_len"),
        "dim": _get(cfg, "dim", _get(cfg, "text_dim")),
        "seed": _get(cfg, "seed", 0),
        "ngram": _get(cfg, "ngram", _get(cfg, "text_ngram", 1)),
        "text_encoder_path": _get(cfg, "text_encoder_path"),
        "tokenizer_path": _get(cfg, "tokenizer_path"),
    })
    spec.update(overrides)
    kind = spec["kind"]
    dtype = text_dtype(kind, device) if dtype is None else dtype
    if kind == "umt5":
        if not (spec["path"] or spec["text_encoder_path"]):
            raise ValueError("build_text_encoder: kind 'umt5' needs a path (encoders.text_path) to a local "
                             "Wan diffusers repo with text_encoder/ and tokenizer/")
        return UMT5TextEncoder(spec["path"], text_len=int(spec["text_len"] or EncoderConfig.text_len), device=device,
                               dtype=dtype, text_encoder_path=spec["text_encoder_path"],
                               tokenizer_path=spec["tokenizer_path"])
    if kind == "hash":
        return HashTextEncoder(text_len=int(spec["text_len"] or EncoderConfig.text_len),
                               dim=int(spec["dim"] or EncoderConfig.text_dim),
                               seed=int(spec["seed"] or 0), ngram=int(spec["ngram"] or 1), device=device,
                               dtype=dtype)
    raise ValueError(
        f"build_text_encoder: unknown text encoder kind {kind!r}; accepted: {', '.join(map(repr, TEXT_KINDS))}")
