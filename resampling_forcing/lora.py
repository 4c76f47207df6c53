"""Low-rank adapters for fine-tuning a causal Wan DiT (train.lora, config.LoraConfig).

With `train.lora.rank > 0` the weights of `train.init_from` stay frozen and each targeted linear layer
learns W + (alpha / rank) B A (peft's LoRA layers; B starts at zero, so step 0 is the base model). The
optimizer, gradients and EMA then hold only A and B (a 14B model's adapters at rank 64: ~0.3B numbers).

What a checkpoint holds (file names: checkpoint.py):
- model.safetensors (and ema.safetensors): the MERGED weights under the plain model's names, so sampling,
  evaluation and a next stage's `train.init_from` read a LoRA run exactly as any other run;
- lora.safetensors: the adapters (and their EMA under "ema."), the training state a resume reads, with
  the base's source and fingerprint in its metadata: a resume reloads the base from that source (from
  `train.init_from` when it is gone) and refuses other weights;
- under DeepSpeed, DeepSpeed's own folder without the frozen base.
With `train.lora.merged_checkpoints: false` a checkpoint keeps no merged weights (model_config.json and
lora.safetensors only: 2.5 GB for the 14B at rank 64 with the EMA, where its two merged copies are 112 GB
in fp32); whatever reads it (sampling, evaluation, init_from, a resume's checks) gets its base merged with
its adapters (`merged_weights`): the base found at its recorded absolute path, else among the checkpoints its
config's train.init_from names, by identity (`weights_identity`: for a base that keeps only adapters too,
from its files, since merging again on another machine may round otherwise).
Under bf16/fp16 mixed precision the frozen base is held in that dtype (HOLD_DTYPES).

Shapes: a targeted layer's base weight W [out, in], A [rank, in], B [out, rank].
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import ConfigError, LoraConfig, ModelConfig
from .models.loading import CheckpointError

ADAPTER = "default"  # peft's adapter name: one adapter per model
# Under DeepSpeed a LoRA run's checkpoints leave out the frozen base (a resume reloads it from
# train.init_from; the 14B in bf16: 28 GB a checkpoint), so its loads are not strict about it.
DEEPSPEED_SAVE = {"exclude_frozen_parameters": True}
DEEPSPEED_LOAD = {"load_module_strict": False}
# Under mixed precision the frozen base is held in the compute dtype (as DeepSpeed holds its module):
# half the memory of the largest tensors, and the autocast matmuls read the same bf16 values.
HOLD_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BASE, _A, _B = ".base_layer.", f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}."
EMA_PREFIX = "ema."  # the EMA shadows of the adapters, in the same file


def enabled(cfg: LoraConfig) -> bool:
    return cfg.rank > 0


def alpha(cfg: LoraConfig) -> float:
    """train.lora.alpha, whose null means = rank."""
    return cfg.alpha if cfg.alpha is not None else cfg.rank


def scale(cfg: LoraConfig) -> float:
    """alpha / rank: what B A is multiplied by (peft's rule without rsLoRA)."""
    return alpha(cfg) / cfg.rank


def merge_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """W [out, in] + s B [out, rank] A [rank, in], in fp32 on the CPU: the one merge rule (the export and
    `merge_file` give the same bits; a GPU-held base never meets CPU-held master adapters)."""
    return w.detach().float().cpu() + s * (b.detach().float().cpu() @ a.detach().float().cpu())


def _matches(name: str, target: str) -> bool:  # peft's rule for a target_modules entry
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError (one line) for a target naming no linear layer of `model`, or also another module
    (peft would refuse it later, in several lines)."""
    modules = dict(model.named_modules())
    linears = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n
                      for n, m in modules.items() if isinstance(m, nn.Linear)})
    for t in targets:
        hits = [n for n in modules if n and _matches(n, t)]
        other = next((n for n in hits if not isinstance(modules[n], nn.Linear)), None)
        if not hits or other is not None:
            what = (f"also names {other} ({type(modules[other]).__name__})" if other
                    else "names no linear layer of the model")
            raise ConfigError(f"train.lora.targets: {t!r} {what}; name linear layers only: {linears}")


def check_model_targets(model_cfg: ModelConfig, targets: list[str]) -> None:
    """check_targets on a weightless (meta-device) model of `model_cfg`: before anything loads."""
    from .models.wan import CausalWanModel

    with torch.device("meta"):
        check_targets(CausalWanModel(model_cfg), targets)


def adapter_count(model_cfg: ModelConfig, cfg: LoraConfig) -> int:
    """Numbers the adapters of `cfg` add to a model of `model_cfg` (rank x (in + out) per target linear
    layer), counted on a weightless (meta-device) model: for the memory estimate, before anything loads."""
    from .models.wan import CausalWanModel

    with torch.device("meta"):
        model = CausalWanModel(model_cfg)
    return sum(cfg.rank * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and any(_matches(name, t) for t in cfg.targets))


def add_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """Wrap the target layers of `model` (in place) and freeze every other weight."""
    from peft import LoraConfig as PeftLora
    from peft import inject_adapter_in_model

    check_targets(model, cfg.targets)
    inject_adapter_in_model(PeftLora(r=cfg.rank, lora_alpha=alpha(cfg),
                                     lora_dropout=cfg.dropout, target_modules=list(cfg.targets)),
                            model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return _A in name or _B in name


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a wrapped model's state dict."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def merged_state(state: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A wrapped model's state -> the plain model's state: W + scale B A (fp32, CPU) under W's plain name;
    the other tensors as they are. With EMA shadows for A and B this is W + scale EMA(B) EMA(A), not the
    EMA of the merged weight."""
    s = scale(cfg)
    out = {}
    for k, v in state.items():
        if is_adapter(k):
            continue
        if _BASE in k:
            layer, _, leaf = k.partition(_BASE)
            if leaf == "weight":
                v = merge_weight(v, state[layer + _A + "weight"], state[layer + _B + "weight"], s)
            k = f"{layer}.{leaf}"
        out[k] = v
    return out


@torch.no_grad()
def load_merged_into(model: nn.Module, plain: dict[str, torch.Tensor], source: str = "merged weights") -> None:
    """Put plain (merged) weights into a wrapped model: base = merged, B = 0 (A as it is), so the wrapped
    model computes what the plain one would. The base weights are overwritten."""
    from .models.loading import load_state_into

    own = model.state_dict()
    renamed = {}
    for k in own:
        if is_adapter(k):
            renamed[k] = torch.zeros_like(own[k]) if _B in k else own[k]
        else:
            renamed[k] = plain.get(k.replace(_BASE, "."), plain.get(k))
    missing = [k for k, v in renamed.items() if v is None]
    if missing:
        raise CheckpointError(f"{source} does not fit the model: {len(missing)} missing (first: {missing[0]})")
    load_state_into(model, renamed, source=source)


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a set of weights: names, shapes and a strided sample (4096 to 8191 numbers
    of a large tensor, as fp32) of each tensor, hashed. The stride is coprime with the last dimension, so
    the sample visits every column of a matrix. Tells two different checkpoints apart; equal weights give
    equal prints, also when one copy is stored in another dtype that holds them exactly (bf16 in fp32)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach()
        h.update(f"{k}{list(v.shape)}".encode())
        flat = v.reshape(-1)
        step = max(1, flat.numel() // 4096)
        while v.dim() > 1 and math.gcd(step, v.shape[-1]) != 1:
            step += 1
        sample = flat[::step].float().cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapters(path: Path, adapters: dict[str, torch.Tensor], ema: Optional[dict[str, torch.Tensor]],
                  cfg: LoraConfig, base: dict) -> None:
    """lora.safetensors: the adapters, their EMA ("ema." + name), and in the metadata the LoRA settings
    and `base` ({"source", "fingerprint"}: what the adapters sit on)."""
    from safetensors.torch import save_file

    from .io import atomic_path

    tensors = {k: v.detach().contiguous().cpu() for k, v in adapters.items()}
    tensors.update({EMA_PREFIX + k: v.detach().contiguous().cpu() for k, v in (ema or {}).items()})
    meta = {"lora": json.dumps({"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets)}),
            "base": json.dumps(base)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_adapters(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(adapters, EMA adapters, metadata {"lora": settings, "base": {"source", "fingerprint"}}) from
    lora.safetensors (`tensors=False`: the header only, two empty dicts); CheckpointError (one line)
    when missing, unreadable or no adapter file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a LoRA run's checkpoint keeps its adapters there; "
                              "resume from another checkpoint or start a new train.run_dir")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k in ("lora", "base")}
            found = {k: f.get_tensor(k) for k in names} if tensors else {}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; the file is damaged") from None
    if set(meta) != {"lora", "base"} or not names:
        raise CheckpointError(f"{path} is not an adapter file of this toolkit (no LoRA settings in its metadata)")
    ema = {k[len(EMA_PREFIX):]: v for k, v in found.items() if k.startswith(EMA_PREFIX)}
    return {k: v for k, v in found.items() if not k.startswith(EMA_PREFIX)}, ema, meta


def base_source(ckpt: Path, configured) -> str:
    """Where a LoRA resume reads its base: the checkpoint the adapters were trained on (train.init_from may
    name a run that has written newer checkpoints since), found as `find_base` finds it, else `configured()`
    (what train.init_from names now; check_base then says whether it is the one)."""
    try:
        return str(find_base(ckpt, read=False)[0])
    except CheckpointError:
        return configured()


def check_base(base: dict, print_now: str, source: str) -> None:
    """The base weights loaded now (from `source`) are those the adapters were trained on, else
    CheckpointError."""
    if base.get("fingerprint") != print_now:
        raise CheckpointError(
            f"the base weights in {source} are not those these adapters were trained on ({base.get('source')}, "
            f"fingerprint {base.get('fingerprint')}; now {print_now}); point train.init_from at those weights")


@torch.no_grad()
def load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor], source: str) -> None:
    """Copy `adapters` into the wrapped `model` (every adapter of the model, shapes checked)."""
    own = adapter_state(model.state_dict())
    missing = [k for k in own if k not in adapters]
    if missing or len(adapters) != len(own):
        raise CheckpointError(f"{source} does not fit the model's adapters ({len(adapters)} tensors for {len(own)}, "
                              f"first missing: {missing[0] if missing else 'none'}); check train.lora")
    for k, v in own.items():
        if v.shape != adapters[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {list(adapters[k].shape)}, the model expects "
                                  f"{list(v.shape)}; check train.lora.rank")
        v.copy_(adapters[k].to(v.dtype))


def adapters_only(folder: str | Path) -> bool:
    """Whether a checkpoint folder keeps only LoRA adapters (train.lora.merged_checkpoints: false):
    lora.safetensors and model_config.json, no model.safetensors."""
    from .checkpoint import LORA_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS

    f = Path(folder)
    return (f / LORA_WEIGHTS).is_file() and (f / MODEL_CONFIG).is_file() and not (f / MODEL_WEIGHTS).is_file()


def has_ema(file: str | Path) -> bool:
    """Whether an adapter file holds the adapters' EMA (header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return any(k.startswith(EMA_PREFIX) for k in f.keys())
    except Exception as e:  # noqa: BLE001 - a damaged header
        raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}; the file is damaged") from None


def _recorded_base(file: Path) -> dict:
    base = read_adapters(file, tensors=False)[2].get("base")
    if not isinstance(base, dict) or not base.get("fingerprint"):
        raise CheckpointError(f"{file} records no base (source and fingerprint); it was not written by this toolkit")
    return base


def weights_identity(source: str | Path, state: Optional[dict[str, torch.Tensor]] = None) -> str:
    """What a LoRA run records as its base's fingerprint: `fingerprint(state)` of the weights read from
    `source`, or, for a checkpoint keeping only adapters, an identity from its files alone (its base's
    recorded fingerprint and its adapters' own): merging them again on another machine's BLAS may round
    differently, the files do not."""
    folder = Path(source)
    if folder.is_dir() and adapters_only(folder):
        from .checkpoint import LORA_WEIGHTS

        adapters, ema, _ = read_adapters(folder / LORA_WEIGHTS)
        h = hashlib.sha256(_recorded_base(folder / LORA_WEIGHTS)["fingerprint"].encode())
        h.update(fingerprint({**adapters, **{EMA_PREFIX + k: v for k, v in ema.items()}}).encode())
        return "adapters:" + h.hexdigest()[:16]
    if state is None:
        from .models.loading import read_state_dict

        state = read_state_dict(source)
    return fingerprint(state)


def _base_candidates(folder: Path, base: dict) -> list[Path]:
    """Where the base of `folder`'s adapters may be: the recorded path (absolute, then as it was given), then
    what the checkpoint's config.yaml train.init_from names now (relative to the current folder; a run
    folder: each of its checkpoints, newest first)."""
    import yaml

    from .checkpoint import config_file, list_checkpoints

    out = [Path(p) for p in (base.get("source"), base.get("given")) if isinstance(p, str) and p]
    try:
        init = (yaml.safe_load(config_file(folder).read_text()) or {}).get("train", {}).get("init_from")
        if isinstance(init, str) and init:  # a run folder: its checkpoints; a checkpoint or Wan2.1 folder: itself
            out += [c for _, c in reversed(list_checkpoints(init))] or [Path(init)]
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return [c for c in dict.fromkeys(out) if c.is_dir()]


def find_base(folder: str | Path, read: bool = True) -> tuple[Path, Optional[dict[str, torch.Tensor]]]:
    """(the base of `folder`'s adapters, its weights when they were read to check it, else None): the first
    candidate (_base_candidates) whose identity is the recorded fingerprint. `read=False` (preflight):
    an existing recorded path is taken without reading it. Each candidate is read at most once, and its
    weights are handed on. CheckpointError (one line) when none is the base, naming why the recorded one
    is not (gone, unreadable, other weights)."""
    from .checkpoint import LORA_WEIGHTS
    from .models.loading import read_state_dict

    folder = Path(folder)
    base = _recorded_base(folder / LORA_WEIGHTS)
    recorded = Path(base["source"]) if isinstance(base.get("source"), str) else None
    if not read and recorded is not None and recorded.is_dir():
        return recorded, None
    why = "gone"
    for cand in _base_candidates(folder, base):
        try:
            if adapters_only(cand):
                if weights_identity(cand) == base["fingerprint"]:
                    return cand, None
            else:
                state = read_state_dict(cand)
                if fingerprint(state) == base["fingerprint"]:
                    return cand, state
                del state
            bad = "other weights now"
        except Exception as e:  # noqa: BLE001 - a damaged or foreign candidate: say so, try the next
            bad = f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if cand == recorded:
            why = bad
    raise CheckpointError(f"{folder} keeps only LoRA adapters (train.lora.merged_checkpoints: false) and the base they "
                          f"were trained on is not found: {base.get('source')} is {why}, and none of the checkpoints "
                          "its config's train.init_from names is it; restore that base (and keep it: a base run's "
                          "keep_last may rotate it away)")


def _not_a_loop(folder: str | Path, seen: frozenset) -> Path:
    here = Path(os.path.abspath(folder))
    if here in seen:
        raise CheckpointError(f"{here}: the LoRA bases recorded from it lead back to it; point train.init_from of "
                              "the run at the weights it was trained on")
    return here


def chain_files(folder: str | Path, _seen: frozenset = frozenset()) -> list[Path]:
    """The weight files reading a checkpoint that keeps only adapters needs: its adapter file and its
    base's (models.loading.weight_files, in turn). CheckpointError (one line) as merged_weights."""
    from .checkpoint import LORA_WEIGHTS
    from .models.loading import detect_layout, weight_files

    here = _not_a_loop(folder, _seen)
    base = find_base(here, read=False)[0]
    below = chain_files(base, _seen | {here}) if adapters_only(base) else weight_files(*detect_layout(base))
    return [here / LORA_WEIGHTS, *below]


def merged_weights(folder: str | Path, use_ema: bool = False, _seen: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint that keeps only adapters: its base (find_base; a base keeping only adapters
    merges in turn) merged with its adapters (their EMA with `use_ema`) by merge_file's rule, in place (the
    base's tensors are replaced one by one: one model in memory, not two). CheckpointError (one line) when the
    base is gone or a chain of bases leads back to itself."""
    from .checkpoint import LORA_WEIGHTS
    from .models.loading import read_state_dict

    here = _not_a_loop(folder, _seen)
    base, state = find_base(here)
    if state is None:
        state = merged_weights(base, False, _seen | {here}) if adapters_only(base) else read_state_dict(base)
    return merge_file(state, here / LORA_WEIGHTS, use_ema=use_ema, in_place=True)[0]


class LoraRun:
    """The trainer's side of LoRA: wraps the model once its base weights are loaded (remembering what
    they were), writes a checkpoint's files and reads them back on a resume."""

    def __init__(self, cfg: LoraConfig, model: nn.Module, source: str, mixed_precision: str = "no"):
        """`model`: the plain model holding the base weights read from `source` (train.init_from);
        `mixed_precision`: the accelerator's ("no", "bf16", "fp16"), the dtype the frozen base is held in."""
        self.cfg, self.source = cfg, source
        # absolute: a checkpoint that keeps only adapters is read from anywhere (sampling, a next stage)
        where = os.path.abspath(source) if Path(source).exists() else source
        self.base = {"source": where, "given": str(source), "fingerprint": weights_identity(source, model.state_dict())}
        add_adapters(model, cfg)
        hold = HOLD_DTYPES.get(mixed_precision)
        if hold is not None:
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(hold)
        self.trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    load_merged = staticmethod(load_merged_into)

    def export(self, folder: Path, state: dict[str, torch.Tensor], ema) -> tuple[Optional[dict], Optional[dict]]:
        """Write `folder`/lora.safetensors from the wrapped model's `state` (and the EMA's adapter
        shadows); return the merged (plain) weights and merged EMA weights the caller saves (None, None
        with train.lora.merged_checkpoints false: the folder keeps only the adapters)."""
        from .checkpoint import LORA_WEIGHTS

        shadow = ema.state_dict() if ema is not None else None
        save_adapters(folder / LORA_WEIGHTS, adapter_state(state), shadow, self.cfg, self.base)
        if not self.cfg.merged_checkpoints:
            return None, None
        merged_ema = merged_state({**state, **shadow}, self.cfg) if shadow is not None else None
        return merged_state(state, self.cfg), merged_ema

    def resume(self, ckpt: Path, model: nn.Module, load_weights: bool) -> dict[str, torch.Tensor]:
        """Check that the base loaded now is the one `ckpt`'s adapters were trained on; load the adapters
        into `model` when `load_weights` (DeepSpeed restores its module itself). Returns the EMA shadows
        ({} when the run kept none)."""
        from .checkpoint import LORA_WEIGHTS

        adapters, ema, meta = read_adapters(Path(ckpt) / LORA_WEIGHTS)
        check_base(meta["base"], self.base["fingerprint"], self.source)
        if load_weights:
            load_adapters(model, adapters, str(Path(ckpt) / LORA_WEIGHTS))
        return ema


# ----------------------------------------------------------------------------- sampling with an adapter file


def adapter_file(path: str | Path) -> Path:
    """`path` as an adapter file: lora.safetensors itself, a checkpoint folder holding one, or a LoRA run
    (its latest checkpoint's); its header is read. CheckpointError (one line) otherwise."""
    from .checkpoint import LORA_WEIGHTS, resolve_trainer_checkpoint

    p = Path(path)
    if p.is_file():
        read_adapters(p, tensors=False)
        return p
    if not p.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a lora.safetensors file or a LoRA run / checkpoint folder")
    file = (p if (p / LORA_WEIGHTS).is_file() else resolve_trainer_checkpoint(p)) / LORA_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {LORA_WEIGHTS}: it is not a LoRA run (train.lora.rank > 0)")
    read_adapters(file, tensors=False)
    return file


def merge_file(state: dict[str, torch.Tensor], path: str | Path, use_ema: bool = True,
               strength: float = 1.0, in_place: bool = False, identity: Optional[str] = None) -> tuple[dict, dict]:
    """Merge the adapters of `path` (adapter_file) into a plain model `state`: W + strength (alpha / rank) B A
    for each adapted layer (their EMA when the file has one and `use_ema`). Returns (the merged state, what
    was applied: {"file", "ema", "base_matches", "strength"}); `base_matches` is False when `state` is not the
    base the adapters were trained on (the caller warns: applying them elsewhere is allowed). `in_place`:
    replace the tensors of `state` itself (a caller that owns it: one model in memory, not two). `identity`:
    what `state` is (weights_identity of where it was read; None = fingerprint(state)), which a base that
    keeps only adapters needs (its merged bits vary with the machine's BLAS)."""
    file = adapter_file(path)
    adapters, ema, meta = read_adapters(file)
    use = ema if use_ema and ema else adapters
    s = strength * scale(LoraConfig(rank=meta["lora"]["rank"], alpha=meta["lora"]["alpha"]))
    matches = (fingerprint(state) if identity is None else identity) == meta["base"].get("fingerprint")
    out = state if in_place else dict(state)
    for key in use:
        if _A not in key:
            continue
        layer = key.split(_A)[0]
        weight, b = layer + ".weight", use.get(layer + _B + "weight")
        if weight not in out or b is None:
            raise CheckpointError(f"{file} adapts {layer}, which this model has not; the adapters were trained for "
                                  "another model")
        shape = [b.shape[0], use[key].shape[-1]]
        if shape != list(out[weight].shape):
            raise CheckpointError(f"{file}: the adapters of {layer} make a {shape} update for a "
                                  f"{list(out[weight].shape)} weight; they were trained for other model sizes")
        out[weight] = merge_weight(out[weight], use[key], b, s)
    return out, {"file": str(file), "ema": use_ema and bool(ema), "base_matches": matches, "strength": strength}
