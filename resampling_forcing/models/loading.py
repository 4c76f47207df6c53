"""Load Wan2.1 transformer weights from local files; save and load our own format.

Recognised layouts (no network, `path` is a local directory):
- ours:      model.safetensors + model_config.json (what `save_model` writes).
- diffusers: config.json with `num_attention_heads` (+ `diffusion_pytorch_model*.safetensors`,
             sharded with an index or single); a repo root with `transformer/` also works
             (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
- original:  the Wan2.1 release: config.json with `dim`/`num_heads` and
             `diffusion_pytorch_model*.safetensors` with Wan's own key names (ours too).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..config_checks import check_model
from ..dtypes import DTYPE_NAMES
from ..io import atomic_path, atomic_write_text
from ..typed_yaml import ConfigError, build
from .wan import CausalWanModel

OUR_WEIGHTS, OUR_CONFIG = "model.safetensors", "model_config.json"
# The dtype names of configs and command lines (weights, caches, benches).
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))

# diffusers name -> original Wan name (regex, replacement), applied in order.
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is the cross-attn norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file/tensor and the fix."""


def diffusers_to_wan_key(key: str) -> str:
    for pattern, repl in _DIFFUSERS_TO_WAN:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# ----------------------------------------------------------------------------- detection


def _weight_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError("a shard name is not a string")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index[0]} is not a readable shard index ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]}); re-download the checkpoint") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index[0]} lists shard {missing[0]} which is missing; re-download the checkpoint")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}; expected a Wan2.1 / diffusers / "
                              "resampling-forcing checkpoint directory")
    return files


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """-> (layout, folder) with layout in {ours, diffusers, original}."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} " + ("is not a directory" if folder.exists() else "does not exist"))
    if (folder / OUR_CONFIG).is_file():
        return "ours", folder
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has neither {OUR_CONFIG} nor config.json; point to a Wan2.1 / Wan2.2 checkpoint, "
                              "its diffusers `transformer/` folder, or a resampling-forcing run/checkpoint")
    raw = _read_json(cfg_file)
    if "num_attention_heads" in raw:
        return "diffusers", folder
    if "num_heads" in raw and "dim" in raw:
        return "original", folder
    raise CheckpointError(f"{cfg_file} is not a Wan2.1 transformer config (no num_heads/num_attention_heads)")


def _read_json(file: Path) -> dict:
    """A checkpoint's JSON config: an object, else CheckpointError naming the file."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{file} is not readable JSON ({str(e).splitlines()[0]}); "
                              "the checkpoint is damaged: copy it again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object of model settings, got {type(raw).__name__}; "
                              "the checkpoint is damaged: copy it again")
    return raw


def config_from_checkpoint(path: str | Path, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a checkpoint's config; fields not stored there come from `base`. The values go
    through the config's typed construction and model rules (config_checks.check_model), so a bad size is one
    CheckpointError naming the file and key here, not a traceback in the first forward."""
    layout, folder = detect_layout(path)
    base = base or ModelConfig()
    file = folder / (OUR_CONFIG if layout == "ours" else "config.json")
    raw = _read_json(file)
    if layout == "ours":
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        values = {k: v for k, v in raw.items() if k in names and k != "preset"}  # unknown keys: other versions
    else:
        try:
            values = _wan_values(raw, layout)
        except (KeyError, TypeError) as e:
            what = f"has no key {e}" if isinstance(e, KeyError) else f"has a value of the wrong type ({e})"
            raise CheckpointError(f"{file} {what}; it is not a complete Wan2.1 transformer config") from None
        if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("model_type") in ("i2v", "flf2v"):
            raise CheckpointError(f"{folder}: image-to-video Wan checkpoints are not supported; use a T2V checkpoint")
    try:
        cfg = build(ModelConfig, {**dataclasses.asdict(base), **values, "preset": None}, "")
        check_model(cfg, prefix="")
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}; the file is damaged or edited: restore it from the run that "
                              "saved the weights") from None
    return cfg


def _wan_values(raw: dict, layout: str) -> dict:
    """The ModelConfig sizes of a diffusers or original Wan2.1 config.json; a key it leaves out takes
    ModelConfig's default (Wan2.1-T2V-1.3B's, what Wan's own code defaults to)."""
    d = ModelConfig()
    if layout == "diffusers":
        heads = raw["num_attention_heads"]
        return dict(dim=heads * raw["attention_head_dim"], num_heads=heads, ffn_dim=raw["ffn_dim"],
                    num_layers=raw["num_layers"], in_channels=raw["in_channels"],
                    out_channels=raw.get("out_channels") or raw["in_channels"], text_dim=raw["text_dim"],
                    freq_dim=raw["freq_dim"], patch_size=list(raw.get("patch_size", d.patch_size)),
                    eps=raw.get("eps", d.eps), cross_attn_norm=raw.get("cross_attn_norm", d.cross_attn_norm),
                    qk_norm=raw.get("qk_norm") is not None)
    return dict(dim=raw["dim"], num_heads=raw["num_heads"], ffn_dim=raw["ffn_dim"],
                num_layers=raw["num_layers"], in_channels=raw.get("in_dim", d.in_channels),
                out_channels=raw.get("out_dim", d.out_channels), text_dim=raw.get("text_dim", d.text_dim),
                freq_dim=raw.get("freq_dim", d.freq_dim), patch_size=list(raw.get("patch_size", d.patch_size)),
                eps=raw.get("eps", d.eps), cross_attn_norm=raw.get("cross_attn_norm", d.cross_attn_norm),
                qk_norm=raw.get("qk_norm", d.qk_norm))


def weight_files(layout: str, folder: Path) -> list[Path]:
    """The files read_state_dict loads from a checkpoint of `layout` in `folder` (detect_layout); of a LoRA
    checkpoint without merged weights, its adapter file and its base's (lora.chain_files)."""
    if layout == "ours":
        from ..lora import adapters_only, chain_files

        return chain_files(folder) if adapters_only(folder) else [folder / OUR_WEIGHTS]
    return _weight_files(folder)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, renamed to our (original Wan) names; a LoRA checkpoint without merged
    weights: its base merged with its adapters (lora.merged_weights)."""
    layout, folder = detect_layout(path)
    if layout == "ours":
        from ..lora import adapters_only, merged_weights

        if adapters_only(folder):
            return merged_weights(folder)
    files = weight_files(layout, folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # truncated or foreign file
            raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}; the file is corrupt or not safetensors") from None
    if layout == "diffusers":
        state = {diffusers_to_wan_key(k): v for k, v in state.items()}
    # Some original releases prefix keys with "model." (e.g. trained with a wrapper).
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def load_state_into(model: CausalWanModel, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load with errors that name the first missing/unexpected/mismatched tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"{source} does not fit the model: {', '.join(parts)}; check model.preset / sizes")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {list(state[k].shape)}, the model expects "
                                  f"{list(v.shape)}; the checkpoint was made for other model sizes")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def load_model(path: str | Path, base: ModelConfig | None = None, device="cpu",
               dtype: torch.dtype = torch.float32) -> CausalWanModel:
    """Build the model from a checkpoint's own config and load its weights."""
    cfg = config_from_checkpoint(path, base)
    model = CausalWanModel(cfg)
    load_state_into(model, read_state_dict(path), source=str(path))
    return model.to(device=device, dtype=dtype)


def save_model(model: CausalWanModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None,
               weights: bool = True) -> None:
    """Our format: model.safetensors + model_config.json, each written atomically (`weights=False`: the config
    only, for a LoRA checkpoint that keeps only its adapters)."""
    folder = Path(folder)
    if weights:
        tensors = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
        with atomic_path(folder / OUR_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
    atomic_write_text(folder / OUR_CONFIG, json.dumps(dataclasses.asdict(model.cfg), indent=2))
