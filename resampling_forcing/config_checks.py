"""The cross-field rules of a configuration: `validate` (the one validation pass of every value a loaded
config holds; config.load_config calls it) and the checks it shares with the places that build the same
values outside a config (check_model: a raw Wan checkpoint's sizes; check_sampling / check_cfg_scale:
SamplingOptions; check_degradation: resampling's settings; check_clip_frames: the VAE's frame rule).
Types alone are config.py's (typed_yaml walks the YAML against its dataclasses)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Optional

from .attention.spec import check_rope_horizon, routing_layers_problem
from .config import OBJECTIVES, RAMPS, RESAMPLING_OBJECTIVES, WAN_VAES, Config, ModelConfig, StageConfig
from .seeds import MAX_SEED
from .typed_yaml import ConfigError


def validate(cfg: Config, require_encoder_paths: bool = False, training: bool = False) -> None:
    """Cross-field checks that types alone cannot express (the one validation pass of every value;
    device- and file-system checks come later, training_utils.preflight). `training`: the config is about
    to train (the Trainer), so it needs steps to run and a routing mode for its routing stages (an
    inference config may keep a routing-trained run's stages with attention.routing.mode=dense)."""
    m = cfg.model
    check_model(m)
    for f in dataclasses.fields(cfg):  # every float's range, NaN and inf refused (the model's: check_model)
        if f.name != "model":
            check_floats(getattr(cfg, f.name), f"{f.name}.")
    problem = routing_layers_problem(cfg.attention.routing.layers, m.num_layers)
    if problem:
        raise ConfigError(f"attention.routing.layers={cfg.attention.routing.layers}: {problem}")
    try:
        a = cfg.attention
        check_rope_horizon(a.rope_horizon, a.rope_far_at, ("attention.rope_horizon", "attention.rope_far_at"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    d = cfg.diffusion
    check_sampling(d.sample_steps, d.sample_shift, d.cfg_scale, d.context_t,
                   names=("diffusion.sample_steps", "diffusion.sample_shift", "diffusion.cfg_scale", "diffusion.context_t"))
    if cfg.encoders.text_ngram < 1:
        raise ConfigError(f"encoders.text_ngram={cfg.encoders.text_ngram}: must be >= 1 (1 = words only)")
    for key, value in (("train.seed", cfg.train.seed), ("data.synthetic_seed", cfg.data.synthetic_seed)):
        if value is not None and not 0 <= value <= MAX_SEED:  # what torch and numpy seed without overflow
            raise ConfigError(f"{key}={value}: must be an int in [0, {MAX_SEED}]")
    if cfg.train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps}: must be >= 0 (0 = no warmup)")
    if cfg.data.synthetic_max_objects < 1:
        raise ConfigError(f"data.synthetic_max_objects={cfg.data.synthetic_max_objects}: must be >= 1")
    dc, t, e = cfg.data, cfg.train, cfg.encoders
    for key, value in (("data.num_frames", dc.num_frames), ("data.height", dc.height), ("data.width", dc.width),
                       ("data.synthetic_videos", dc.synthetic_videos), ("train.log_every", t.log_every),
                       ("train.save_every", t.save_every), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.max_bad_steps", t.max_bad_steps),
                       ("encoders.vae_factor", e.vae_factor), ("encoders.text_len", e.text_len),
                       ("encoders.text_dim", e.text_dim)):
        if value < 1:  # before the codec geometry below divides by vae_factor
            raise ConfigError(f"{key}={value}: must be >= 1")
    if require_encoder_paths:  # first: the encoder to build decides the frame and size rules below
        if e.vae in WAN_VAES and not e.vae_path:
            name = WAN_VAES[e.vae]["checkpoint"]
            raise ConfigError(f"encoders.vae={e.vae} needs encoders.vae_path (a local {name} VAE / diffusers "
                              f"folder), e.g. encoders.vae_path=checkpoints/{name}-Diffusers; or "
                              "encoders.vae=pixel_shuffle")
        if e.text == "umt5" and not e.text_path:
            raise ConfigError("encoders.text=umt5 needs encoders.text_path (a local umT5 / diffusers folder), "
                              "e.g. encoders.text_path=checkpoints/Wan2.1-T2V-1.3B-Diffusers; or encoders.text=hash")
    from .memory import codec_geometry  # the codecs' geometry (lazy: memory imports this)

    fit = [k for k, g in WAN_VAES.items() if g["channels"] == m.in_channels]
    # sizes from a preset (a raw checkpoint's come from its file later: Pipeline checks the VAE against them)
    if m.preset is not None and e.vae in WAN_VAES and fit and e.vae not in fit:
        raise ConfigError(f"encoders.vae={e.vae} gives {WAN_VAES[e.vae]['channels']} latent channels, model."
                          f"in_channels={m.in_channels} is {WAN_VAES[fit[0]]['checkpoint']}'s: set encoders.vae={fit[0]}")
    spatial = codec_geometry(cfg)["spatial"]
    for key, value, patch in (("data.height", cfg.data.height, m.patch_size[1]),
                              ("data.width", cfg.data.width, m.patch_size[2])):
        if value % (spatial * patch):
            raise ConfigError(f"{key}={value}: must be a multiple of {spatial * patch} (the VAE's {spatial}x "
                              f"downsampling times model.patch_size {patch}), e.g. {max(1, round(value / (spatial * patch))) * spatial * patch}")
    check_clip_frames(cfg, exact=require_encoder_paths or training)
    if len(dc.synthetic_blackout_frames) != 2:
        raise ConfigError(f"data.synthetic_blackout_frames={dc.synthetic_blackout_frames}: need [lo, hi] frames")
    try:
        from .data.synthetic_dataset import check_blackout_law

        check_blackout_law(dc.num_frames, dc.synthetic_blackout_prob, dc.synthetic_blackout_frames)
    except ValueError as e:
        raise ConfigError(f"data.synthetic_blackout_prob / data.synthetic_blackout_frames: {e}") from None
    if dc.num_workers < 0:
        raise ConfigError(f"data.num_workers={dc.num_workers}: must be >= 0 (0 = decode in the main process)")
    if t.keep_last < 0:
        raise ConfigError(f"train.keep_last={t.keep_last}: must be >= 0 (0 keeps every checkpoint)")
    g = cfg.train
    if g.gap_every < 0 or g.gap_clips < 1 or (g.gap_sample_steps is not None and g.gap_sample_steps < 1):
        raise ConfigError(f"train.gap_every={g.gap_every} (>= 0, 0 = off), train.gap_clips={g.gap_clips} (>= 1), "
                          f"train.gap_sample_steps={g.gap_sample_steps} (null or >= 1)")
    if g.global_batch_size is not None and g.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size={g.global_batch_size}: must be >= 1 (or null: use train.grad_accum)")
    if len(g.betas) != 2:
        raise ConfigError(f"train.betas={g.betas}: need two numbers [beta1, beta2] in [0, 1)")
    lo = g.lora
    if lo.rank < 0:
        raise ConfigError(f"train.lora.rank={lo.rank}: must be >= 0 (0 = train every weight)")
    if not lo.targets or len(set(lo.targets)) != len(lo.targets):
        raise ConfigError(f"train.lora.targets={lo.targets}: need distinct linear-layer names, "
                          "e.g. [self_attn.q, ffn.0]")
    if training and lo.rank and not g.init_from:
        raise ConfigError(f"train.lora.rank={lo.rank} adapts the weights of train.init_from, which is not set; "
                          "set it to a Wan2.1 / Wan2.2 folder or a run, or train.lora.rank=0 to train every weight")
    if training and (not g.stages or sum(st.steps for st in g.stages) < 1):
        raise ConfigError("train.stages: need at least one stage with steps >= 1")
    for i, st in enumerate(g.stages):
        where = f"train.stages[{i}]."
        if st.steps < 0:
            raise ConfigError(f"{where}steps={st.steps}: must be >= 0")
        check_degradation(st.objective, st.resample_steps, st.ramp, where, cfg_scale=st.resample_cfg)
        if st.ramp_steps < 0:
            raise ConfigError(f"{where}ramp_steps={st.ramp_steps}: must be >= 0 (0 = hard switch)")
        if st.ramp != "none" and st.objective == "teacher_forcing":
            raise ConfigError(f"{where}ramp={st.ramp}: a teacher_forcing stage has no history "
                              "degradation to ramp; set it to none (ramp the stage after the warmup)")
        # settings the stage would ignore: a typo of intent, refused like an unknown key
        unused = [f"{k}={getattr(st, k)}" for k in ("resample_steps", "resample_cfg")
                  if getattr(st, k) != getattr(StageConfig, k)]
        if unused and st.objective not in RESAMPLING_OBJECTIVES:
            raise ConfigError(f"{where}{unused[0]}: only a resampling stage runs the model on its history "
                              f"(this one is {st.objective}); remove it")
        if training and st.ramp != "none" and st.ramp_steps > st.steps > 0:
            raise ConfigError(f"{where}ramp_steps={st.ramp_steps} is longer than the stage (steps={st.steps}): the "
                              f"ramp would stop at r={st.steps / st.ramp_steps:.2f}; set ramp_steps <= {st.steps}")
        if training and st.routing and cfg.attention.routing.mode == "dense":
            raise ConfigError(f"{where}routing=true needs attention.routing.mode topk or window "
                              "(e.g. attention.routing.mode=topk attention.routing.top_k=5)")


def check_model(m: ModelConfig, prefix: str = "model.") -> None:
    """The rules of the model section, for both of its sources: the config (`validate`) and a
    checkpoint's model_config.json (models/loading.config_from_checkpoint, `prefix` ""), so a bad size
    is refused at load, not in the first forward. ConfigError naming `prefix` + the key."""
    for name in ("dim", "num_heads", "num_layers", "ffn_dim", "text_dim", "freq_dim", "in_channels",
                 "out_channels", "chunk_frames"):
        if getattr(m, name) < 1:
            raise ConfigError(f"{prefix}{name}={getattr(m, name)}: must be >= 1")
    check_floats(m, "model.", prefix)
    if m.dim % m.num_heads:
        raise ConfigError(f"{prefix}dim={m.dim} is not divisible by {prefix}num_heads={m.num_heads}")
    head_dim = m.head_dim
    if head_dim % 2 or head_dim < 6:
        raise ConfigError(f"{prefix}dim / {prefix}num_heads: head dim {head_dim} must be even and >= 6 for 3-axis RoPE")
    if len(m.patch_size) != 3 or min(m.patch_size) < 1:
        raise ConfigError(f"{prefix}patch_size={m.patch_size}: expected three positive ints [t, h, w]")
    if m.chunk_frames % m.patch_size[0]:  # a chunk's tokens are whole temporal patches
        raise ConfigError(f"{prefix}chunk_frames={m.chunk_frames}: must be a multiple of "
                          f"{prefix}patch_size[0]={m.patch_size[0]}")


def check_clip_frames(cfg: Config, exact: bool = True) -> None:
    """data.num_frames must give (memory.latent_frames / pixel_frames: the codec's frame rule, e.g. the
    Wan VAE's 1 + 4k frames -> 1 + k) whole chunks of model.chunk_frames latent frames (whole temporal
    patches too: check_model): refused at load, not after the data set is rendered or encoded. `exact`:
    the clips are about to be encoded, so they must fit the codec's rule exactly (the Wan VAE refuses
    12 frames; the default config keeps 12 = 3 latent frames for sampling, where nothing is encoded)."""
    from .memory import codec_geometry, latent_frames, pixel_frames

    geo, n, cf = codec_geometry(cfg), cfg.data.num_frames, cfg.model.chunk_frames
    f = latent_frames(geo, n)
    fits = pixel_frames(geo, f) == n or not exact
    if fits and f % cf == 0:
        return
    near = " or ".join(str(pixel_frames(geo, k * cf)) for k in (f // cf, f // cf + 1) if k >= 1)
    if not fits:
        rule = f"1 + {geo['temporal']}k" if geo["causal"] else f"a multiple of {geo['temporal']}"
        raise ConfigError(f"data.num_frames={n}: the {cfg.encoders.vae} VAE encodes {rule} frames; use "
                          f"data.num_frames={near} (whole chunks of model.chunk_frames={cf} latent frames)")
    raise ConfigError(f"data.num_frames={n}: gives {f} latent frames, not a multiple of model.chunk_frames={cf}; "
                      f"use data.num_frames={near}")


# ----------------------------------------------------------------------------- float ranges

# The allowed range of every float field by key path ("[]": each item of a list), then an optional hint
# after "; ". NaN and inf are outside every range. None: the rule is shared with public options and
# lives with them (check_sampling, check_degradation, data.synthetic_dataset.check_blackout_law).
# tests/test_config.py checks that every float field of the schema is listed and refuses NaN and inf.
FLOAT_RANGES: dict[str, Optional[str]] = {
    "model.eps": "(0, inf); the norm epsilon, e.g. 1e-6",
    "model.rope_theta": "(0, inf); the RoPE base, Wan: 10000",
    "model.x0_min_t": "(0, 1); the smallest t of v = (x_t - x0) / t",
    "diffusion.train_t_mean": "(-inf, inf); the mean of the logit-normal t, e.g. 0",
    "diffusion.train_t_std": "[0, inf); the std of the logit-normal t, e.g. 1",
    "diffusion.train_t_shift": "(0, inf)",
    "diffusion.resample_shift": "(0, inf); the paper uses 0.6",
    "diffusion.sample_shift": None, "diffusion.cfg_scale": None, "diffusion.context_t": None,
    "data.synthetic_blackout_prob": None,
    "data.fps": "(0, inf); frames per second of the clips, e.g. 8",
    "data.text_dropout": "[0, 1]",
    "train.stages[].resample_cfg": None,
    "train.stages[].noise_aug_scale": "[0, inf)",
    "train.lr": "(0, inf)",
    "train.betas[]": "[0, 1)",
    "train.weight_decay": "[0, inf)",
    "train.min_lr_ratio": "[0, 1]",
    "train.grad_clip": "(-inf, inf); <= 0 = no clipping",
    "train.ema_decay": "(0, 1); or null for no EMA",
    "train.lora.alpha": "(0, inf); or null for alpha = rank",
    "train.lora.dropout": "[0, 1)",
}


def float_fields(section: Any, key: str, path: Optional[str] = None):
    """(FLOAT_RANGES key, key path, value) of every float value of a config section, nested sections and
    list items included; `key` / `path` (default `key`) prefix the field names, e.g. "train."."""
    path = key if path is None else path
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        items = ([(v, f"{key}{f.name}[]", f"{path}{f.name}[{i}]") for i, v in enumerate(value)]
                 if isinstance(value, list) else [(value, key + f.name, path + f.name)])
        for v, k, p in items:
            if dataclasses.is_dataclass(v):
                yield from float_fields(v, k + ".", p + ".")
            elif v is not None and float in (tp, *typing.get_args(tp)):
                yield k, p, v


def check_floats(section: Any, key: str, path: Optional[str] = None) -> None:
    """Each float of `section` in its FLOAT_RANGES range (an unlisted one: finite). ConfigError naming the
    key path and the range."""
    for k, p, value in float_fields(section, key, path):
        spec = FLOAT_RANGES.get(k, "(-inf, inf)")
        if spec is None:
            continue
        interval, _, hint = spec.partition("; ")
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        above = value >= lo if interval[0] == "[" else value > lo
        below = value <= hi if interval[-1] == "]" else value < hi
        if not (above and below and math.isfinite(value)):
            if math.isinf(hi):  # (0, inf) reads "a finite number > 0"
                words = "a finite number" + ("" if math.isinf(lo) else f" {'>=' if interval[0] == '[' else '>'} {lo:g}")
            else:
                words = f"in {interval}"
            raise ConfigError(f"{p}={value}: must be {words}" + (f" ({hint})" if hint else ""))


MAX_CFG_SCALE = 100.0  # far above any useful guidance (1-20); larger values only saturate the video


def check_cfg_scale(value: float, name: str, usual: str) -> None:
    """The classifier-free guidance rule, shared by sampling (check_sampling) and the resampling of a
    training stage (check_degradation); `usual`: the hint after the rule (the value to try)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= MAX_CFG_SCALE:
        raise ConfigError(f"{name} must be in [0, {MAX_CFG_SCALE:g}] (got {value!r}); {usual}")


# Euler steps of a sampling run: far above any useful count (the paper 32, Wan 50); a larger one is a typo
# whose schedule alone would not fit in memory.
MAX_SAMPLE_STEPS = 1000


def check_sampling(steps: int, shift: float, cfg_scale: float, context_t: float,
                   names: tuple[str, str, str, str] = ("steps", "shift", "cfg_scale", "context_t")) -> None:
    """The rules of the sampling settings, for both of their spellings: the config (`validate`, names
    diffusion.sample_steps, ...) and options.SamplingOptions (public, user values: steps, shift, ...).
    ConfigError (a ValueError) whose message starts with the name."""
    n_steps, n_shift, n_cfg, n_ctx = names
    for name, value in ((n_shift, shift), (n_cfg, cfg_scale), (n_ctx, context_t)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number (got {type(value).__name__} {value!r})")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_SAMPLE_STEPS:
        raise ConfigError(f"{n_steps} must be in [1, {MAX_SAMPLE_STEPS}] (got {steps!r}; an int, the paper uses 32)")
    if not (shift > 0 and math.isfinite(shift)) or shift > 1e6:
        raise ConfigError(f"{n_shift} must be in (0, 1e6] (got {shift!r}; the paper uses 5.0)")
    check_cfg_scale(cfg_scale, n_cfg, "the paper samples with 5.0; 1.0 switches guidance off")
    if not 0.0 <= context_t < 1.0:
        raise ConfigError(f"{n_ctx} must be in [0, 1) (got {context_t!r}); 0 writes clean chunks")


def check_degradation(objective: str, resample_steps: int, ramp: str, where: str = "",
                      cfg_scale: float = 1.0) -> None:
    """The rules of one history degradation, for both of its spellings: a stage of the config (from
    `validate`, `where` = "train.stages[i].") and resampling.DegradeSettings (public, user values).
    ConfigError (a ValueError) naming the key."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}objective {objective!r} is unknown; choose one of {list(OBJECTIVES)}")
    if resample_steps < 1:
        raise ConfigError(f"{where}resample_steps={resample_steps}: must be >= 1")
    if ramp not in RAMPS:
        raise ConfigError(f"{where}ramp {ramp!r} is unknown; choose one of {list(RAMPS)}")
    check_cfg_scale(cfg_scale, f"{where}resample_cfg" if where else "cfg_scale",
                    "the default 1.0 resamples without guidance")
