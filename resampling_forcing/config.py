"""Typed configuration: the sections (dataclasses), model presets and loading (the cross-field rules
every loaded config passes: config_checks.py).

Every field has a type; loading walks the YAML against the dataclasses (typed_yaml.py), so a typo or a
wrong type fails at load with the full key path (`train.lr: expected float, got str 'abc'`).
Nested sections are plain dataclasses; `load_config(path, overrides)` is the one entry point.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from .attention.spec import AttentionBackend, RoutingSpec
from .typed_yaml import ConfigError, apply_overrides, build


# The history-degradation objectives and ramps (resampling.py), declared once: StageConfig's field
# types, and the name tuples the rest of the package checks against.
Objective = Literal["teacher_forcing", "resampling", "noise_augmentation", "parallel_resampling"]
Ramp = Literal["none", "probability", "strength"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
RESAMPLING_OBJECTIVES = ("resampling", "parallel_resampling")  # the OBJECTIVES that run the model on the history
RAMPS: tuple[str, ...] = typing.get_args(Ramp)
# The encoder kinds (encoders/builders.py builds them), declared once the same way.
VaeKind = Literal["wan", "wan2.2", "pixel_shuffle"]
TextKind = Literal["umt5", "hash"]
VAE_KINDS: tuple[str, ...] = typing.get_args(VaeKind)
# The Wan VAE kinds: a checkpoint holding each and its geometry (latent channels, spatial and temporal downsampling,
# Wan2.2's 16 with its 2x2 patchify; causal: 1 + 4k frames -> 1 + k latents), read by memory and encoders.builders.
WAN_VAES = {"wan": dict(checkpoint="Wan2.1-T2V-1.3B", channels=16, spatial=8, temporal=4, causal=True),
            "wan2.2": dict(checkpoint="Wan2.2-TI2V-5B", channels=48, spatial=16, temporal=4, causal=True)}
TEXT_KINDS: tuple[str, ...] = typing.get_args(TextKind)


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Sizes of the causal Wan2.1 DiT. `preset` fills every size; explicit keys override it."""

    preset: Optional[str] = None
    # The sizes a preset fills; these defaults are Wan2.1-T2V-1.3B's (MODEL_PRESETS["wan2.1-t2v-1.3b"]).
    in_channels: int = 16  # latent channels in (Wan VAE: 16)
    out_channels: int = 16  # latent channels out
    dim: int = 1536  # hidden width of the blocks
    ffn_dim: int = 8960  # feed-forward width
    num_heads: int = 12  # attention heads (head dim = dim / num_heads)
    num_layers: int = 30  # transformer blocks
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # [t, h, w] latent patch
    text_dim: int = 4096  # text embedding width (umT5: 4096)
    freq_dim: int = 256  # sinusoidal timestep embedding width
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    # Latent frames per chunk: the unit of per-chunk timesteps, the causal mask and the KV cache.
    chunk_frames: int = 3
    # What the network outputs: "velocity" (eps - x, what Wan weights predict) or "x0" (the clean
    # sample, converted to velocity; needed by tiny pixel-space models whose patch is wider than the model, e.g.
    # configs/tiny.yaml: 192 values per patch, dim 128).
    prediction: Literal["velocity", "x0"] = "velocity"
    # Smallest t when converting an x0 prediction to velocity: v = (x_t - x0) / max(t, x0_min_t).
    x0_min_t: float = 0.05
    # Per-block activation checkpointing during training.
    gradient_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def chunk_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(frames, rows, columns) of one chunk's tokens, for latents of spatial size height x width."""
        pt, ph, pw = self.patch_size
        return self.chunk_frames // pt, height // ph, width // pw

    def chunk_tokens(self, height: int, width: int) -> int:
        """Tokens T of one chunk (the unit of the KV cache, the masks and routing): the one formula."""
        frames, rows, cols = self.chunk_grid(height, width)
        return frames * rows * cols


@dataclass
class RoutingConfig(RoutingSpec):
    """History routing (method.md section 6): the fields and rules of attention.spec.RoutingSpec
    (mode dense | topk | window, top_k, sink_chunks, window_chunks), checked when the config is built,
    plus where and whether to route."""

    field_prefix: ClassVar[str] = "attention.routing."
    # Which transformer blocks route (None = all). Unlisted blocks attend densely.
    layers: Optional[list[int]] = None
    # Keep per-head chunk selections of each rollout for plots (costs memory).
    record: bool = False


@dataclass
class AttentionConfig:
    # auto picks the fastest available on the device; see attention/backends.py.
    backend: AttentionBackend = "auto"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Far-history positions at sampling (attention/positions.py): history chunks more than rope_horizon
    # chunks back are read as if rope_far_at (null: rope_horizon) chunks back. null = absolute positions
    # (Wan, the paper). The good distance is model-specific: README "Far-history positions".
    rope_horizon: Optional[int] = None
    rope_far_at: Optional[int] = None


@dataclass
class DiffusionConfig:
    """Flow matching: training timesteps, self-resampling t_s, and the sampling schedule."""

    # Training timestep per chunk: t = shift(sigmoid(N(mean, std))).
    train_t_mean: float = 0.0
    train_t_std: float = 1.0
    train_t_shift: float = 1.0
    # Self-resampling strength t_s per video: sigmoid(N(0,1)) then shift s (paper: 0.6).
    resample_shift: float = 0.6
    # Sampling (paper: 32 Euler steps, shift 5.0, CFG 5.0).
    sample_steps: int = 32
    sample_shift: float = 5.0
    cfg_scale: float = 5.0
    negative_prompt: str = ""
    # Timestep of the pass that writes a finished chunk into the KV cache.
    context_t: float = 0.0


@dataclass
class EncoderConfig:
    """Latent space and text encoder. kinds: vae in {wan (Wan2.1's VAE, 16 channels, 4x8x8), wan2.2 (Wan2.2's,
    48 channels, 4x16x16), pixel_shuffle}, text in {umt5, hash}."""

    vae: VaeKind = "wan"
    vae_path: Optional[str] = None
    vae_factor: int = 4  # pixel_shuffle only
    text: TextKind = "umt5"
    text_path: Optional[str] = None
    text_len: int = 512
    text_dim: int = 4096  # hash encoder only; umT5 reports its own
    text_ngram: int = 1  # hash encoder only: each word also carries the n-grams starting at it


@dataclass
class DataConfig:
    """Where clips come from. manifest: real videos; latents: a precomputed store; synthetic."""

    source: Literal["synthetic", "manifest", "latents"] = "synthetic"
    manifest: Optional[str] = None
    latents_dir: Optional[str] = None
    synthetic_dir: str = "outputs/synthetic"
    synthetic_videos: int = 512
    synthetic_max_objects: int = 2
    synthetic_seed: Optional[int] = None  # the synthetic data set's scenes and held-out combinations (None: train.seed)
    # occlusion: this fraction of synthetic videos has a blackout of [lo, hi] frames (objects unseen)
    synthetic_blackout_prob: float = 0.0
    synthetic_blackout_frames: list[int] = field(default_factory=lambda: [4, 6])
    num_frames: int = 12  # pixel frames per clip (Wan VAE: 1 + 4k); whole chunks of latent frames
    height: int = 32
    width: int = 32
    fps: float = 8.0
    num_workers: int = 0  # decoding workers of data.source=manifest (latents, synthetic: read in the trainer)
    text_dropout: float = 0.1  # caption -> "" with this probability, for classifier-free guidance
    fixed_batch: bool = False  # train on the first batch forever (an overfitting smoke test)


@dataclass
class StageConfig:
    """One training stage. objective: teacher_forcing | resampling | noise_augmentation | parallel_resampling."""

    name: str = "tf"
    objective: Objective = "teacher_forcing"
    steps: int = 100
    resample_steps: int = 1  # Euler steps from t_s to 0 while degrading history
    resample_cfg: float = 1.0  # CFG while resampling (1.0 = off, the paper's unstated default)
    noise_aug_scale: float = 0.1  # std of Gaussian history noise (noise_augmentation)
    routing: bool = False  # train with top-k history routing (attention.routing settings)
    # Switch from the previous stage (e.g. the teacher-forcing warmup): "none" = hard switch (the default;
    # the paper pins neither form, README "The switch from teacher forcing"), or a ramp over the first
    # `ramp_steps` steps of this stage with r = min(1, (steps into the stage + 1) / ramp_steps):
    # "probability" = each video's history is degraded with probability r (else the ground truth),
    # "strength" = t_s -> r * t_s (noise_augmentation: noise std -> r * noise_aug_scale).
    # ramp_steps = 0 is the hard switch too. Not for teacher_forcing.
    ramp: Ramp = "none"
    ramp_steps: int = 0


# The linear layers LoRA adapts by default (module-name suffixes, as peft's target_modules): every
# attention projection and both feed-forward layers of each block.
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass
class LoraConfig:
    """Low-rank adapters (lora.py). rank 0: every weight trains (the paper). rank > 0: the weights of
    train.init_from stay frozen and each `targets` linear layer learns W + (alpha / rank) B A; a
    checkpoint holds the merged weights (what sampling and init_from read) and the adapters;
    merged_checkpoints false: only the adapters, merged whenever the checkpoint is read (lora.py)."""

    rank: int = 0
    alpha: Optional[float] = None  # null: = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    dropout: float = 0.0
    merged_checkpoints: bool = True  # false: adapters only (14B, rank 64: 2.5 GB, not 2 merged x 56 GB)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    batch_size: int = 4  # per process
    grad_accum: int = 1
    # If set, grad_accum is derived at launch: global_batch_size / (batch_size x processes).
    global_batch_size: Optional[int] = None
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # After warmup: "constant" (the paper states no decay) or "cosine" down to lr * min_lr_ratio at the
    # last step of the last stage.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0: no clipping
    ema_decay: Optional[float] = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    init_from: Optional[str] = None  # weights to start from (Wan checkpoint or our checkpoint)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train adapters on frozen init_from
    resume_from: Optional[str] = None  # where a new run_dir starts (a branch of another run); run_dir's own checkpoints win once saved
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 10  # steps between the progress bar's loss updates; log.jsonl and TensorBoard record every step
    max_bad_steps: int = 20  # consecutive NaN/Inf losses or gradient norms before aborting
    seed: int = 0
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True  # tqdm progress bar on the main process
    # Exposure-gap diagnostic (diagnose.py) every `gap_every` steps (0 = off) on the first `gap_clips`
    # clips of data position 0, main process only; logged as gap_* keys. gap_sample_steps: Euler steps
    # of its rollouts (None = diffusion.sample_steps).
    gap_every: int = 0
    gap_clips: int = 4
    gap_sample_steps: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model presets

PRESET_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim", "freq_dim",
               "patch_size")
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1-T2V-1.3B: 30 blocks, dim 1536, 12 heads, FFN 8960, umT5 (4096), Wan VAE (16 ch): the defaults.
    "wan2.1-t2v-1.3b": {k: getattr(ModelConfig(), k) for k in PRESET_KEYS},
    # Wan2.1-T2V-14B: 40 blocks, dim 5120, 40 heads, FFN 13824.
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16,
                           out_channels=16, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2]),
    # Wan2.2-TI2V-5B: 30 blocks, dim 3072, 24 heads, FFN 14336, 48 latent channels (the Wan2.2 VAE: 4x16x16,
    # 704x1280 -> 44x80 latents -> 880 tokens per latent frame).
    "wan2.2-ti2v-5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48,
                           out_channels=48, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2]),
    # ~100M parameters at Wan's shapes, for CPU benchmarks.
    "wan-100m": dict(dim=768, ffn_dim=3072, num_heads=12, num_layers=12, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2]),
    # The embedded default: 32x32 pixels -> PixelShuffleVAE(4) -> 48 x 8 x 8 latents.
    "tiny": dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_channels=48,
                 out_channels=48, text_dim=32, freq_dim=64, patch_size=[1, 2, 2]),
}


def resolve_model(cfg: ModelConfig, explicit: set[str] | None = None) -> ModelConfig:
    """Fill sizes from `cfg.preset`; keys the user set explicitly win over the preset."""
    if cfg.preset is None:
        return cfg
    if cfg.preset not in MODEL_PRESETS:
        raise ConfigError(
            f"model.preset: unknown preset {cfg.preset!r}; choose one of {sorted(MODEL_PRESETS)}"
        )
    explicit = explicit or set()
    values = {k: v for k, v in MODEL_PRESETS[cfg.preset].items() if k not in explicit}
    return dataclasses.replace(cfg, **values)


# ----------------------------------------------------------------------------- loading


def _new_section(key: str) -> Any:
    """A section an override creates on demand: train.stages starts from the default stage."""
    return [dataclasses.asdict(StageConfig())] if key == "stages" else {}


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = (),
                     require_encoder_paths: bool = False) -> Config:
    data = apply_overrides(data or {}, overrides, _new_section)
    cfg = build(Config, data, "")
    explicit = set((data.get("model") or {}).keys())
    cfg.model = resolve_model(cfg.model, explicit)
    from .config_checks import validate  # the rules import the schema: imported here, not at the top

    validate(cfg, require_encoder_paths=require_encoder_paths)
    return cfg


# The first line of the config.yaml a run writes (RUN/ and each checkpoint): a new run replaces only a
# config.yaml a run wrote (written_by_a_run; training_cli), never a file of the user's in the folder.
RUN_CONFIG_HEADER = "# the resolved config of this run, written by the trainer (a new run here replaces it)\n"


def run_config_yaml(cfg: "Config", header: bool = True) -> str:
    """The text of a run's config.yaml: RUN_CONFIG_HEADER, then every value of `cfg` (loads back equal);
    `header=False`: what trainers wrote before the header existed."""
    return (RUN_CONFIG_HEADER if header else "") + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def written_by_a_run(path: str | Path) -> bool:
    """Whether the file at `path` is a config.yaml a run wrote: it begins with RUN_CONFIG_HEADER, or (a run
    of a version before the header) it is, byte for byte, the dump of every value of the config it holds."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(RUN_CONFIG_HEADER):
        return True
    try:
        return text == run_config_yaml(config_from_dict(yaml.safe_load(text)), header=False)
    except Exception:  # noqa: BLE001 - not a config at all, or not a valid one: not a run's
        return False


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                require_encoder_paths: bool = False) -> Config:
    """Read YAML (or start from defaults when `path` is None) and apply key=value overrides.
    `require_encoder_paths`: the config is about to be used to build its encoders (training,
    precompute), so encoders.vae=wan / text=umt5 must name their local files."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not str(path).strip() or path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is {'empty' if not str(path).strip() else 'a directory'}; "
                              "pass a YAML file, e.g. configs/tiny.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML, e.g. configs/tiny.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e}); check its permissions") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {what}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return config_from_dict(data, overrides, require_encoder_paths=require_encoder_paths)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently:
    a second `lr:` further down a section would win unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # the base class refuses it ("found unhashable key")
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def synthetic_seed(cfg: Config) -> int:
    """Seed of the synthetic data set (data.synthetic_seed, else train.seed): a training-seed replicate
    can change train.seed (data order, noise) and keep the data set."""
    return cfg.train.seed if cfg.data.synthetic_seed is None else cfg.data.synthetic_seed


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

