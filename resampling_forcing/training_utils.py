"""Small pieces of the training loop: stage schedule, the Accelerator, EMA, LR schedule, the metrics
logger and trackers, preflight checks and the run lock (config values are checked once, by config_checks.validate)."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LOCK_FILE, LOG_FILE, TB_DIR
from .config import Config, ConfigError, StageConfig, to_dict
from .io import atomic_write_text

logger = logging.getLogger("resampling_forcing.train")


# ----------------------------------------------------------------------------- config helpers


def total_steps(cfg: Config) -> int:
    return sum(s.steps for s in cfg.train.stages)


def stage_at(cfg: Config, step: int) -> tuple[int, StageConfig]:
    """The stage that optimizer step `step` (0-based) belongs to; hard switches at boundaries."""
    end = 0
    for i, st in enumerate(cfg.train.stages):
        end += st.steps
        if step < end:
            return i, st
    return len(cfg.train.stages) - 1, cfg.train.stages[-1]


def stage_start(cfg: Config, index: int) -> int:
    """The first optimizer step (0-based) of stage `index`."""
    return sum(s.steps for s in cfg.train.stages[:index])


def ramp_at(cfg: Config, step: int) -> float | None:
    """Level r of the ramp from teacher forcing at optimizer step `step` (0-based): r = min(1, (k + 1) /
    ramp_steps), k = steps into the stage (the stage's `ramp` says what r scales). None when the stage
    has none (ramp none or ramp_steps 0: the hard switch). A pure function of the step: resumes exactly."""
    idx, st = stage_at(cfg, step)
    if st.ramp == "none" or st.ramp_steps == 0 or st.objective == "teacher_forcing":
        return None
    return min(1.0, (step - stage_start(cfg, idx) + 1) / st.ramp_steps)


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_grad_accum(cfg: Config, world: int) -> None:
    """train.global_batch_size -> train.grad_accum for this number of processes (in place)."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = t.batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.batch_size "
                          f"({t.batch_size}) x {world} processes; change one of them")
    t.grad_accum = t.global_batch_size // per_step


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mp = cfg.train.mixed_precision
    if mp != "no" and not torch.cuda.is_available():
        logger.warning("train.mixed_precision=%s needs a GPU; training in fp32 on CPU", mp)
        mp = "no"
    timeout = datetime.timedelta(minutes=60)
    handlers = []
    if launch_world_size() > 1:  # launched distributed; CPU needs gloo (docs/install.md)
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout) if not torch.cuda.is_available()
                        else InitProcessGroupKwargs(timeout=timeout))
    # Launched distributed on a machine without CUDA (and not DeepSpeed): run DDP on CPU with gloo
    # whatever the accelerate config says (accelerate needs cpu=True for that, docs/install.md).
    cpu = (not torch.cuda.is_available() and launch_world_size() > 1
           and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true")
    return Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=mp,
                       project_dir=cfg.train.run_dir, kwargs_handlers=handlers,
                       step_scheduler_with_optimizer=False)


def param_count(module: torch.nn.Module) -> int:
    """Parameters of `module`, also when DeepSpeed ZeRO-3 has partitioned it (a partitioned parameter
    is an empty placeholder whose full size is `ds_numel`)."""
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in module.parameters())


def format_count(n: int) -> str:
    """1234 -> '1.2K', 1_300_000 -> '1.3M', 1.4e9 -> '1.40B' (never '0.0M' for a small model)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


# ----------------------------------------------------------------------------- LR


def lr_at(step: int, base_lr: float, warmup_steps: int, total: int = 0, schedule: str = "constant",
          min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup_steps` optimizer steps, then constant (the paper states no decay) or
    cosine from base_lr (at the end of warmup) to base_lr * min_ratio (at step total - 1).
    A pure function of the step, so the schedule's state is the step itself."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"lr schedule {schedule!r}: expected 'constant' or 'cosine'")
    span = max(total - 1 - warmup_steps, 1)
    frac = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_lr(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step `step` under cfg.train."""
    t = cfg.train
    return lr_at(step, t.lr, t.warmup_steps, total_steps(cfg), t.lr_schedule, t.min_lr_ratio)


# ----------------------------------------------------------------------------- EMA


class EMA:
    """fp32 exponential moving average of a model's trainable parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        """`decay` in (0, 1): train.ema_decay, checked by config_checks.validate."""
        self.decay = decay
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # LoRA's base: never moves
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k not in frozen}
        self._param_names = {n for n, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.decay
        for k, v in model.state_dict().items():
            if k not in self.shadow:
                continue
            if k in self._param_names and v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.shadow if k not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors (first: {missing[0]})")
        for k in self.shadow:
            self.shadow[k].copy_(state[k].float())


# ----------------------------------------------------------------------------- logging


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": scalar}; lists and None become strings (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out


# Sections whose values decide what the saved weights mean: a resumed run may not change them,
# except for these keys (memory choice; encoder files moved to another directory).
WEIGHT_SECTIONS = ("model", "encoders")
WEIGHT_KEYS = ("train.lora.",)  # which weights train (LoRA adapters of which shape) is fixed too
RESUMABLE_KEYS = ("model.gradient_checkpointing", "encoders.vae_path", "encoders.text_path", "train.lora.dropout",
                  "train.lora.merged_checkpoints")


def resume_config_changes(ckpt: Path, cfg: Config) -> list[str]:
    """Compare cfg with the config a checkpoint was written under (ckpt/config.yaml).

    Raises ConfigError naming the first changed key of a WEIGHT_SECTIONS section, RESUMABLE_KEYS apart
    (resuming would pair weights with a different model or encoder); returns the other changes as "key: old -> new"
    (step counts, LR, paths, ... may legitimately change between runs of a resumed command)."""
    import yaml

    from .checkpoint import config_file
    from .config import config_from_dict

    path = config_file(ckpt)
    if not path.is_file():
        return []
    try:
        old = flatten(to_dict(config_from_dict(yaml.safe_load(path.read_text()))))
    except (ConfigError, yaml.YAMLError) as e:
        logger.warning("cannot compare with %s (%s): resuming without the config check", path,
                       str(e).splitlines()[0])
        return []
    new = flatten(to_dict(cfg))
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if (key.split(".")[0] in WEIGHT_SECTIONS or key.startswith(WEIGHT_KEYS)) and key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"{key} is {new.get(key)!r} but the checkpoint {ckpt} was trained with {old.get(key)!r}; set it "
                f"back, or start a new train.run_dir (train.init_from={ckpt} to start from its weights)")
        changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


class MetricsLogger:
    """Per-step records to RUN/log.jsonl and scalars to accelerate's trackers (main process)."""

    def __init__(self, accelerator, run_dir: str | os.PathLike, resume_step: int = 0):
        self.acc = accelerator
        self.path = Path(run_dir) / LOG_FILE
        self.main = accelerator.is_main_process
        if self.main:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        """Drop records past `step` (from a run killed after its last checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {}
        for k, v in record.items():
            if isinstance(v, bool) or k == "step":
                continue
            if isinstance(v, (int, float)) and math.isfinite(v):
                scalars[f"train/{k}"] = v
            elif isinstance(v, list) and k == "loss_chunk":
                for i, x in enumerate(v):
                    if x is not None and math.isfinite(x):
                        scalars[f"loss_chunk/{i}"] = x
        if self.acc.trackers:
            self.acc.log(scalars, step=record["step"])


def start_trackers(accelerator, cfg: Config, run_dir: Path, step: int = 0) -> None:
    """TensorBoard in RUN/tb (a run resumed at `step` purges the steps after it) and, optionally, wandb,
    through accelerate's trackers on the main process; each gets the flattened config."""
    if not accelerator.is_main_process:
        return
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401

            kw = {"purge_step": step + 1} if step else {}
            trackers.append(TensorBoardTracker(TB_DIR, str(run_dir), **kw))
        except ImportError:
            logger.warning("tensorboard is not installed: logging to log.jsonl only")
    if cfg.train.wandb:
        try:
            import wandb  # noqa: F401

            trackers.append(WandBTracker("resampling-forcing", name=run_dir.name, dir=str(run_dir), resume="allow"))
        except ImportError:
            logger.warning("train.wandb=true but wandb is not installed: skipping it")
    flat = flatten(to_dict(cfg))
    for tr in trackers:
        tr.start()
        tr.store_init_configuration(flat)
    accelerator.trackers.extend(trackers)


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ----------------------------------------------------------------------------- before any work


def init_source(cfg: Config) -> str:
    """The weights `train.init_from` names: a run folder (its latest checkpoint), a checkpoint folder or a
    Wan2.1 checkpoint folder. CheckpointError (one line) when it is none of them."""
    from .checkpoint import resolve_trainer_checkpoint
    from .models.loading import CheckpointError, detect_layout

    src = cfg.train.init_from
    try:
        src = str(resolve_trainer_checkpoint(src))
    except CheckpointError:
        pass  # a Wan2.1 folder, or nothing: detect_layout says which
    try:
        detect_layout(src)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={cfg.train.init_from}: {e}; pass a run folder, a checkpoint "
                              "folder or a Wan2.1 / Wan2.2 checkpoint folder") from None
    return src


def preflight(cfg: Config, world: int | None = None) -> None:
    """Checks that need this machine, run before anything is loaded or written: the attention backend
    on this device, a run folder (and synthetic data folder) that can really be created/written, the
    weights of `train.init_from` (for a run that does not resume) and a memory estimate of one training
    step. ConfigError (one line) on failure."""
    from .attention.backends import resolve_backend
    from .io import probe_writable_dir
    from .memory import check_fits, train_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_backend(cfg.attention.backend, device)
    except ValueError as e:
        raise ConfigError(f"attention.backend={cfg.attention.backend}: {str(e).splitlines()[0]}") from None
    from .data.synthetic_dataset import MANIFEST_NAME

    folders = [("train.run_dir", cfg.train.run_dir)]
    if cfg.data.source == "synthetic" and not (Path(cfg.data.synthetic_dir) / MANIFEST_NAME).is_file():
        folders.append(("data.synthetic_dir", cfg.data.synthetic_dir))
    for key, folder in folders:
        problem = probe_writable_dir(folder)
        if problem:
            raise ConfigError(f"{key}={folder}: {problem}; choose a folder you can write")
    from .checkpoint import latest_checkpoint
    from .models.loading import CheckpointError

    if cfg.train.init_from and not cfg.train.resume_from and latest_checkpoint(cfg.train.run_dir) is None:
        from .checkpoint import safetensors_problem
        from .models.loading import detect_layout, weight_files

        try:  # before the data set is built or the encoders load (minutes), not after: the files init loads
            files = weight_files(*detect_layout(init_source(cfg)))
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        problem = next((p for p in map(safetensors_problem, files) if p), None)
        if problem:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: {problem}; pass a whole checkpoint")
    if cfg.train.lora.rank:
        from .lora import check_model_targets

        check_model_targets(cfg.model, cfg.train.lora.targets)
    d, t = cfg.data, cfg.train
    msg = check_fits(train_memory(cfg, world or launch_world_size()), device,
                     f"training on {d.num_frames}x{d.height}x{d.width} clips in batches of {t.batch_size}",
                     "lower data.height/data.width/data.num_frames or train.batch_size")
    if msg:
        raise ConfigError(msg)


class RunLockError(ConfigError):
    """Another trainer holds the run folder."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.lock`` held for the trainer's lifetime.

    The kernel drops the lock when the holder exits in any way (kill -9 included), so a lock left
    by a crash is never stale: the next trainer simply gets it. A second trainer on the same run
    folder is refused (RunLockError naming the holder's pid). The file itself stays (removing it
    would race with a trainer opening it) unless the run folder holds nothing else."""

    NAME = LOCK_FILE

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> "RunLock":
        import fcntl

        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockError(f"train.run_dir={self.run_dir} is in use by another trainer (pid {holder}); "
                               "wait for it to end or stop it, or choose another train.run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self, remove_run_dir: bool = False) -> None:
        """Drop the lock; `remove_run_dir`: delete the run folder this lock created (a start that failed
        before training leaves nothing behind)."""
        if self.fd is None:
            return
        try:
            if remove_run_dir and self.created_dir:
                import shutil

                shutil.rmtree(self.run_dir, ignore_errors=True)
            elif [p.name for p in self.run_dir.iterdir()] == [self.NAME]:
                self.path.unlink()
                if self.created_dir:
                    self.run_dir.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
