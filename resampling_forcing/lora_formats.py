"""LoRA files of other tools for Wan2.1 (the community's style and distillation LoRAs), merged into a model's
weights at load time: `sample/sample.py --lora FILE [--lora-scale S]`, `Pipeline.from_pretrained(base,
lora=..., lora_scale=...)`. A LoRA run of this toolkit (lora.safetensors) goes through lora.merge_file.

Recognised keys, each `<prefix><module>.<kind>`:
- prefix: none, `diffusion_model.` (Wan's own release, ComfyUI), `model.diffusion_model.`, `transformer.`
  (diffusers), `base_model.model.` (peft), or `lora_unet_` (kohya / musubi-tuner: the module path with its
  dots written as underscores, `lora_unet_blocks_0_self_attn_q`);
- module: Wan's names (`blocks.0.self_attn.q`, the names of this toolkit's model) or diffusers' names
  (`blocks.0.attn1.to_q`, mapped by models.loading.diffusers_to_wan_key; a file uses one or the other);
- kind: `lora_A.weight` / `lora_down.weight` (A [rank, in, ...]) with `lora_B.weight` / `lora_up.weight`
  (B [out, rank, ...]) and an optional `alpha` (scale alpha / rank; without it, or kohya's alpha 0, 1;
  diffusers' / peft's header `lora_adapter_metadata` gives lora_alpha and use_rslora for pairs without one);
  `diff` (a full difference of a weight or of a parameter such as a modulation), `diff_b` / `lora_B.bias`
  (a bias difference) and `diff_m` (a modulation difference), as in distillation LoRAs (lightx2v's,
  CausVid's).
The merge is W + strength * scale * B A (conv weights flattened to [out, in * k]) and W + strength * diff,
in fp32 on the CPU (lora.merge_weight's rule). Other LoRA kinds (LoHa, LoKr, LoCon's mid weights, DoRA),
per-layer ranks, two values for one thing, and modules the model lacks (an image-to-video LoRA's img_emb /
k_img, a 14B LoRA on the 1.3B) are refused in one line naming the key: a silently partial merge would change
the video in ways nobody asked for.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models.loading import CheckpointError, diffusers_to_wan_key

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
KOHYA_PREFIX = "lora_unet_"
# key suffix -> the ModuleUpdate field it fills
KINDS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "alpha": "alpha", "diff": "diff", "diff_b": "diff_b", "lora_B.bias": "diff_b", "diff_m": "diff_m"}
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' / peft's LoRA config in the safetensors header
OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon (mid weights)", "dora_scale": "DoRA"}
DIFFUSERS_HINTS = ("attn1.", "attn2.", "ffn.net.", "proj_out", "condition_embedder.")


@dataclass
class ModuleUpdate:
    """What a file changes in one module (Wan names): a low-rank pair, a full difference, a bias difference."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    diff_m: torch.Tensor | None = None  # a modulation difference (lightx2v's distillation LoRAs)
    rslora: bool = False  # scale alpha / sqrt(rank) (peft's use_rslora, from the header)
    keys: list = field(default_factory=list)  # the file's keys, for messages


def is_toolkit_file(path: str | Path) -> bool:
    """Whether `path` is an adapter file of this toolkit (lora.safetensors: LoRA settings in its header) or a
    folder (a LoRA run / checkpoint); anything else is read as another tool's file."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        return True
    if not p.is_file():
        raise CheckpointError(f"{path} does not exist; pass a LoRA .safetensors file (this toolkit's lora.safetensors "
                              "or another tool's) or a LoRA run / checkpoint folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; is it a .safetensors LoRA?") from None
    return {"lora", "base"} <= set(meta)


def _split(key: str) -> tuple[str, str, bool]:
    """(module path without prefix, kind, kohya-style) of one key; CheckpointError for other LoRA kinds."""
    for marker, name in OTHER_KINDS.items():
        if marker in key:
            raise CheckpointError(f"{key} is a {name} weight; only plain LoRA (lora_A/B, lora_down/up, alpha, "
                                  "diff, diff_b, diff_m) can be merged: convert the file to a plain LoRA")
    kohya = key.startswith(KOHYA_PREFIX)
    rest = key[len(KOHYA_PREFIX):] if kohya else next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
    for suffix, kind in KINDS.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], kind, kohya
    raise CheckpointError(f"{key}: not a LoRA key (expected <module>.lora_A.weight / .lora_B.weight / "
                          ".lora_down.weight / .lora_up.weight / .alpha / .diff / .diff_b / .diff_m)")


def _wan_name(module: str, diffusers: bool) -> str:
    """A module or parameter path in Wan's names (diffusers' mapped: a parameter such as scale_shift_table
    as itself, a module through its weight)."""
    if not diffusers:
        return module
    mapped = diffusers_to_wan_key(module)
    return mapped if mapped != module else diffusers_to_wan_key(module + ".weight")[: -len(".weight")]


def _peft_config(meta: dict, path) -> dict | None:
    """diffusers / peft write the LoRA config into the header (`lora_adapter_metadata`: lora_alpha, r, per
    component prefix such as "transformer."): the scale of its pairs, which carry no alpha tensor."""
    raw = meta.get(PEFT_METADATA)
    if raw is None:
        return None
    try:
        cfg = {k.rsplit(".", 1)[-1]: v for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError):
        raise CheckpointError(f"{path}: its {PEFT_METADATA} header is not a JSON object") from None
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not supported; "
                              "merge it with diffusers and load the merged weights")
    return cfg


def read_updates(path: str | Path, targets: list[str] | None = None,
                 tensors: bool = True) -> tuple[dict[str, ModuleUpdate], str]:
    """(the updates of another tool's LoRA file keyed by Wan module name, its naming: "wan" | "diffusers" |
    "kohya"). `targets`: the model's module and parameter names (needed to read kohya's underscored names;
    None = only check the keys). `tensors=False` reads the header only (key names; updates without tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in keys} if tensors else {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; is it a .safetensors LoRA?") from None
    if not keys:
        raise CheckpointError(f"{path} holds no tensors: not a LoRA file")
    try:
        parts = [(k, *_split(k)) for k in keys]
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    peft = _peft_config(meta, path)
    diffusers = any(h in m for _, m, _, kohya in parts if not kohya for h in DIFFUSERS_HINTS)
    naming = "kohya" if any(kohya for *_, kohya in parts) else ("diffusers" if diffusers else "wan")
    by_underscore = {m.replace(".", "_"): m for m in targets or []}
    out: dict[str, ModuleUpdate] = {}
    for key, module, kind, kohya in parts:
        if kohya:
            if targets is None:
                name = module
            elif module in by_underscore:
                name = by_underscore[module]
            else:
                raise CheckpointError(f"{path}: {key} names a module this model has not ({module}); a LoRA for "
                                      "another model (an image-to-video one, another size)?")
        else:
            name = _wan_name(module, diffusers)
        u = out.setdefault(name, ModuleUpdate())
        u.keys.append(key)
        if not tensors:
            continue
        if getattr(u, kind) is not None:
            raise CheckpointError(f"{path}: {key} is a second {kind} for {name} ({u.keys[0]} gave one); which one "
                                  "applies is not clear: remove one of them")
        value = raw[key]
        if kind == "alpha":
            if value.numel() != 1:
                raise CheckpointError(f"{path}: {key} has {value.numel()} values; an alpha is one number")
            u.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(u, kind, value)
    if tensors:
        for name, u in out.items():
            if (u.down is None) != (u.up is None):
                raise CheckpointError(f"{path}: {u.keys[0]} has no {'up' if u.up is None else 'down'} half "
                                      f"(lora_B/lora_up with lora_A/lora_down); the file is incomplete")
            if u.alpha is not None and u.down is None:
                raise CheckpointError(f"{path}: {u.keys[0]} gives an alpha for {name} without its lora_A/B pair")
            if u.down is not None and u.alpha is None and peft is not None and "lora_alpha" in peft:
                u.alpha, u.rslora = float(peft["lora_alpha"]), bool(peft.get("use_rslora", False))
    return out, naming


def _target(state: dict, name: str, kind: str) -> str | None:
    """The parameter an update of `kind` changes: the module's weight (a pair; a diff, or a bare parameter
    such as a modulation), its bias (diff_b) or its modulation (diff_m); None when the model has none."""
    if kind == "diff":
        return next((k for k in (name + ".weight", name) if k in state), None)
    key = name + {"pair": ".weight", "diff_b": ".bias", "diff_m": ".modulation"}[kind]
    return key if key in state else None


def merge_updates(state: dict[str, torch.Tensor], path: str | Path, strength: float = 1.0) -> tuple[dict, dict]:
    """Merge another tool's LoRA file into a plain model `state` (Wan names). Returns (the merged state, what
    was applied: {"file", "format", "strength", "modules"}). CheckpointError (one line) for a module the model
    lacks or a shape that does not fit."""
    from .lora import merge_weight

    targets = sorted({k.rsplit(".", 1)[0] for k in state} | set(state))
    updates, naming = read_updates(path, targets)
    out = dict(state)
    for name, u in updates.items():
        for kind, delta in (("pair", u.down), ("diff", u.diff), ("diff_b", u.diff_b), ("diff_m", u.diff_m)):
            if delta is None:
                continue
            target = _target(out, name, kind)
            if target is None:
                raise CheckpointError(f"{path}: {u.keys[0]} changes {name}, which this model has not; a LoRA for "
                                      "another model (an image-to-video one, another size)?")
            w = out[target]
            if kind != "pair":
                if delta.shape != w.shape:
                    raise CheckpointError(f"{path}: {u.keys[0]}: a {list(delta.shape)} difference for {target} "
                                          f"({list(w.shape)} in this model)")
                out[target] = w.detach().float().cpu() + strength * delta.detach().float().cpu()
                continue
            rank = u.down.shape[0]
            if (tuple(u.up.shape[:2]) != (w.shape[0], rank) or u.up[0, 0].numel() != 1
                    or u.down[0].numel() != w[0].numel()):
                raise CheckpointError(f"{path}: the LoRA of {name} (A {list(u.down.shape)}, B {list(u.up.shape)}) "
                                      f"does not fit its {list(w.shape)} weight; a LoRA for another model size?")
            # alpha / rank (rsLoRA: / sqrt(rank)); no alpha, or kohya's alpha 0: 1
            s = strength * (u.alpha / (math.sqrt(rank) if u.rslora else rank) if u.alpha else 1.0)
            flat = merge_weight(w.reshape(w.shape[0], -1), u.down.reshape(rank, -1), u.up.reshape(w.shape[0], rank), s)
            out[target] = flat.reshape(w.shape)
    return out, {"file": str(path), "format": naming, "strength": strength, "modules": len(updates)}


def lora_list(lora, lora_scale=None) -> list[tuple[str, float]]:
    """The LoRAs to merge, in order, as (path, strength): `lora` one path or a list; `lora_scale` None (1 each),
    one number for all, or one per LoRA. ValueError (one line) otherwise: the one rule of the CLI and the API."""
    if lora is None:
        if lora_scale is not None:
            raise ValueError("lora_scale without lora: give the LoRA files it scales")
        return []
    paths = [lora] if isinstance(lora, (str, Path)) else list(lora) if isinstance(lora, (list, tuple)) else None
    if not paths or any(not isinstance(p, (str, Path)) or not str(p).strip() for p in paths):
        raise ValueError(f"give a LoRA file or a LoRA run / checkpoint folder (or a list of them), got {lora!r:.80}")
    scales = [1.0] * len(paths) if lora_scale is None else (
        [lora_scale] * len(paths) if not isinstance(lora_scale, (list, tuple)) else list(lora_scale))
    if len(scales) == 1 and len(paths) > 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"{len(scales)} LoRA scales for {len(paths)} LoRAs: give one for all or one per LoRA")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not -100 <= s <= 100 or s != s:
            raise ValueError(f"lora_scale {s!r}: a number in [-100, 100] (1 = as trained, 0 = off)")
    return [(str(p), float(s)) for p, s in zip(paths, scales)]


def check_file(path: str | Path) -> None:
    """Header check of one LoRA before anything loads: a toolkit adapter file / run / checkpoint
    (lora.adapter_file) or another tool's file with LoRA keys. CheckpointError (one line)."""
    from .lora import adapter_file

    if is_toolkit_file(path):
        adapter_file(path)
    else:
        read_updates(path, tensors=False)
