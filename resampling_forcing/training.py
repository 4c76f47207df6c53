"""The training loop: staged objectives (teacher forcing -> resampling), accelerate/DeepSpeed, checkpoints.

One optimizer step = `train.grad_accum` finite micro-batches of `train.batch_size` per process:
1. batch at data position p (data/loader.py), randomness seeded by (seed, p, rank) (training_data.py);
2. per-chunk training t ~ logit-normal(diffusion.train_t_*), x_t = (1 - t) x + t eps (drawn first, so
   runs that differ only in the degradation share them);
3. text dropout (caption -> "" embedding with prob `data.text_dropout`);
4. history = degrade_history(...) with the stage's objective (no gradient, current online weights,
   the stage's routing when on; during a stage's `ramp`, at level r = training_utils.ramp_at(step));
5. v = model.forward_dual(history, x_t, t, text) and the velocity MSE on the noisy half
   (overall and per chunk position).
Every `train.gap_every` steps (main process) the exposure-gap diagnostic on a fixed held batch
(training_gap.GapMonitor, diagnose.py) adds gap_* keys to that step's record.
A micro-batch whose loss is NaN/Inf on any process is skipped on all of them (no backward, a
warning), an update whose gradient norm is NaN/Inf too (training_step.py: under an fp16 loss scaler
the scaler's skip); `train.max_bad_steps` such events in a row abort with a message naming the last good checkpoint,
verified first (finite weights, finite loss on its last batch; else the one before it, or none).
Then clipping, AdamW, LR (linear warmup, then constant or cosine), EMA, logs (one fixed-size gather over
processes), checkpoints.

With `train.lora.rank > 0` only low-rank adapters on the frozen `train.init_from` weights train (lora.py).
Entry point: `train(cfg)` (used by train/train.py under `accelerate launch`). Resume, save and export:
training_checkpoint.py (the Trainer's mixin); run directory and checkpoint layout: docs/CONTRACTS.md and
checkpoint.py.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from . import lora
from .attention.backends import resolve_backend
from .attention.masks import MaskSpec
from .attention.ops import MaskedAttention
from .attention.spec import routing_spec
from .checkpoint import RANKS_DIR, check_resume_world, clean_stale, config_file, training_engine
from .config import Config, ConfigError, StageConfig, run_config_yaml
from .config_checks import validate
from .diffusion import add_noise, sample_logit_normal, velocity_loss, velocity_target
from .io import atomic_write_text
from .models.loading import CheckpointError, load_state_into, read_state_dict
from .models.wan import CausalWanModel
from .resampling import RESAMPLING_OBJECTIVES, DegradeSettings, degrade_history
from .signals import GracefulStop
from .training_data import DataCursor
from .training_checkpoint import TrainerCheckpoints
from .training_gap import GapMonitor
from .training_step import optimizer_step, over_processes, step_metrics, write_rank_report
from .training_utils import (EMA, MetricsLogger, build_accelerator, format_count, init_source,  # noqa: F401
                             launch_world_size, lr_at, param_count, ramp_at, resolve_grad_accum,
                             resume_config_changes, stage_at, start_trackers, total_steps, train_lr)

logger = logging.getLogger("resampling_forcing.train")


def global_rng_state() -> tuple:
    """The global torch RNGs (CPU, and every CUDA device's): what draws outside the step's own generator
    (LoRA dropout) use; accelerate's checkpoint saves them."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_global_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class TrainingAborted(RuntimeError):
    """Too many non-finite losses in a row; the message names the step and the last checkpoint."""


class DualForward(nn.Module):
    """What accelerate/DeepSpeed wrap: the dual-stream training forward of the model."""

    def __init__(self, model: CausalWanModel):
        super().__init__()
        self.model = model

    def forward(self, history, noisy, t, context, attn, history_t=None):
        """history, noisy [B, C, F, H, W], t [B, F] (per frame), context [B, Lt, text_dim] -> velocity of the
        noisy half [B, C, F, H, W] (CausalWanModel.forward_dual), inputs cast to the weights' dtype."""
        dtype = self.model.patch_embedding.weight.dtype  # DeepSpeed bf16 keeps bf16 weights
        return self.model.forward_dual(history.to(dtype), noisy.to(dtype), t, context.to(dtype), attn, history_t)


# ----------------------------------------------------------------------------- the trainer


class Trainer(TrainerCheckpoints):
    """One training run: setup (data, model, optimizer, resume), `train_step` (the staged objective over
    `train.grad_accum` micro-batches), `fit` (the loop: logs, checkpoints, signals, non-finite aborts)."""

    def __init__(self, cfg: Config, accelerator=None, resume_hint: str = "run the same command to resume"):
        resolve_grad_accum(cfg, accelerator.num_processes if accelerator is not None else launch_world_size())
        validate(cfg, training=True)  # load_config checked what inference needs too; this adds the training rules
        self.cfg = cfg
        self.acc = accelerator or build_accelerator(cfg)
        accum = self.acc.gradient_accumulation_steps  # what accelerate divides each micro-batch's loss by
        if not self.is_deepspeed and accum != cfg.train.grad_accum:  # DeepSpeed's is set from the config at prepare
            raise ConfigError(f"the Accelerator accumulates {accum} micro-batches per step, train.grad_accum is "
                              f"{cfg.train.grad_accum}: build it with gradient_accumulation_steps="
                              f"{cfg.train.grad_accum} (or drop accelerate's --gradient_accumulation_steps)")
        self.run_dir = Path(cfg.train.run_dir)
        self.step = 0
        self.bad_in_a_row = 0
        self.last_checkpoint: Optional[Path] = None
        self.resume_hint = resume_hint  # the stop line's advice (the demo's own command starts over)
        self._setup()

    # -- setup ------------------------------------------------------------------------------

    @property
    def is_deepspeed(self) -> bool:
        return self.acc.distributed_type.value == "DEEPSPEED"

    @property
    def zero_stage(self) -> int:
        return self.acc.state.deepspeed_plugin.zero_stage if self.is_deepspeed else 0

    @property
    def engine(self) -> str:
        return training_engine(self.is_deepspeed, self.zero_stage)

    @property
    def data_position(self) -> int:
        """Data position of the next micro-batch (training_data.DataCursor)."""
        return self.cursor.position

    def _setup(self) -> None:
        from .data.loader import DataError, TrainData, prepare_null_text, synthetic_manifest
        from .encoders import build_text_encoder, build_vae

        cfg, acc = self.cfg, self.acc
        if cfg.train.ema_decay is not None and self.zero_stage == 3:
            raise ConfigError("train.ema_decay with DeepSpeed ZeRO-3 is not supported (weights are partitioned); "
                              "use ZeRO-2 or set train.ema_decay=null")
        self.device = acc.device
        self.backend = resolve_backend(cfg.attention.backend, self.device)
        self.routing = routing_spec(cfg.attention.routing)  # for the stages with `routing: true`
        resume = self._find_resume()
        if resume is not None:  # before RUN/config.yaml is rewritten: a refused resume changes nothing
            check_resume_world(resume, acc.num_processes, self.engine)  # before anything is written
            changed = resume_config_changes(resume, cfg)
            if changed:
                logger.warning("resuming %s with changed settings: %s", resume, "; ".join(changed))
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_stale(self.run_dir)
            atomic_write_text(config_file(self.run_dir), run_config_yaml(cfg))
        vae = text = None
        if cfg.data.source != "latents":
            vae = build_vae(cfg.encoders, device=self.device)
            text = build_text_encoder(cfg.encoders, device=self.device)
            if vae.latent_channels != cfg.model.in_channels:
                raise ConfigError(f"encoders give {vae.latent_channels} latent channels but model.in_channels="
                                  f"{cfg.model.in_channels}")
            if text.dim != cfg.model.text_dim:
                raise ConfigError(f"the text encoder gives {text.dim}-dim embeddings but model.text_dim={cfg.model.text_dim}")
        if cfg.data.source == "synthetic":
            if acc.is_local_main_process:
                synthetic_manifest(cfg)
            acc.wait_for_everyone()
        if cfg.data.source == "latents":
            prepare_null_text(cfg, self.device, write=acc.is_local_main_process)
            acc.wait_for_everyone()
        self.data = TrainData(cfg, cfg.train.batch_size, acc.process_index, acc.num_processes, self.device, vae, text)
        probe = self.data.first_batch(0)[1]["latents"]
        cf, (_, ph, pw) = cfg.model.chunk_frames, cfg.model.patch_size
        if probe.shape[1] != cfg.model.in_channels or probe.shape[2] % cf or probe.shape[3] % ph or probe.shape[4] % pw:
            raise DataError(f"latents {list(probe.shape[1:])} do not fit the model (in_channels {cfg.model.in_channels}, "
                            f"chunk_frames {cf}, patch {cfg.model.patch_size}); check data.num_frames/height/width")
        self.latent_shape = tuple(probe.shape[1:])
        self.num_chunks = probe.shape[2] // cf
        self.chunk_tokens = cfg.model.chunk_tokens(probe.shape[3], probe.shape[4])
        self.cursor = DataCursor(self.data, cfg.train.seed, acc.process_index, self.device, self._all)
        self.gap = GapMonitor.held(cfg, self.data, self.device, self.backend, self.num_chunks,
                                   main=acc.is_main_process, zero_stage=self.zero_stage)

        torch.manual_seed(cfg.train.seed)
        model = CausalWanModel(cfg.model)
        n_params = param_count(model)  # before acc.prepare: ZeRO-3 then leaves empty placeholders
        if (resume is None or lora.enabled(cfg.train.lora)) and cfg.train.init_from:  # LoRA: the frozen base
            src = lora.base_source(resume, lambda: init_source(cfg)) if resume else init_source(cfg)
            try:
                load_state_into(model, read_state_dict(src), source=src)
            except CheckpointError as e:
                raise CheckpointError(f"train.init_from={cfg.train.init_from}: {e}; pass a run folder, a "
                                      "checkpoint folder or a Wan2.1 / Wan2.2 checkpoint folder") from None
            logger.info("initialised the model from %s", src)
        lo = cfg.train.lora
        self.lora = lora.LoraRun(lo, model, src, acc.mixed_precision) if lora.enabled(lo) else None
        model.train()
        t = cfg.train
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas),
                                weight_decay=t.weight_decay)
        if self.is_deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.batch_size
            ds["gradient_accumulation_steps"] = t.grad_accum
            ds["train_batch_size"] = t.batch_size * t.grad_accum * acc.num_processes
            ds["gradient_clipping"] = t.grad_clip if t.grad_clip > 0 else 0.0
        self.model, self.optimizer = acc.prepare(DualForward(model), opt)
        self.inner: CausalWanModel = acc.unwrap_model(self.model).model
        # after prepare: the shadow lives where the prepared weights do (prepare moves them to the GPU)
        self.ema = EMA(self.inner, cfg.train.ema_decay) if cfg.train.ema_decay else None
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        if resume is not None:
            self._resume(resume)
        self.metrics = MetricsLogger(acc, self.run_dir, self.step)
        start_trackers(acc, cfg, self.run_dir, self.step)
        if acc.is_main_process:
            trained = f" ({format_count(self.lora.trained)} trained: LoRA rank {t.lora.rank})" if self.lora else ""
            logger.info("%s; model %s params%s; %d chunks x %d tokens; %d processes; step %d/%d",
                        self.data.summary(), format_count(n_params), trained, self.num_chunks,
                        self.chunk_tokens, acc.num_processes, self.step, total_steps(cfg))

    # -- one step ---------------------------------------------------------------------------

    def _all(self, flag: float, op: str) -> float:
        """min/max of a flag over processes (no collective when single-process)."""
        return over_processes(self.acc, self.device, [flag], op)[0]

    def settings(self, stage: StageConfig, ramp: Optional[float] = None) -> DegradeSettings:
        """The degradation of `stage`; `ramp` = the level r of its ramp now (None: no ramp, hard switch)."""
        return DegradeSettings(objective=stage.objective, steps=stage.resample_steps,
                               shift=self.cfg.diffusion.resample_shift, noise_scale=stage.noise_aug_scale,
                               cfg_scale=stage.resample_cfg, backend=self.backend,
                               routing=self.routing if stage.routing else None,
                               routing_layers=self.cfg.attention.routing.layers if stage.routing else None,
                               context_t=self.cfg.diffusion.context_t,
                               ramp=stage.ramp if ramp is not None else "none",
                               ramp_level=1.0 if ramp is None else ramp, always_forward=self.zero_stage == 3)

    def compute_loss(self, batch: dict, stage: StageConfig, gen: torch.Generator):
        """One micro-batch -> (loss, per-chunk loss [B, N], t_s or None, seconds spent resampling).
        A ramp applies at its level of the current step `self.step` when `stage` is that step's stage."""
        cfg = self.cfg
        x, text = batch["latents"], batch["text"]
        b = x.shape[0]
        # the loss's draws first, then text dropout, then the degradation's (objective-dependent): runs that
        # differ only in the degradation (an ablation's arms) share the loss's timesteps, noise and dropout
        t, eps, noisy = self._noised(x, gen)
        ctx_eps = (torch.randn(x.shape, generator=gen, device=self.device, dtype=x.dtype)
                   if cfg.diffusion.context_t > 0 else None)  # the history's context noise (context_t > 0)
        if cfg.data.text_dropout > 0:
            drop = torch.rand(b, generator=gen, device=self.device) < cfg.data.text_dropout
            text = torch.where(drop[:, None, None], self.data.null_text.to(text.dtype), text)
        settings = self.settings(stage, ramp_at(cfg, self.step) if stage_at(cfg, self.step)[1] is stage else None)
        t0 = time.perf_counter()
        dtype = next(self.inner.parameters()).dtype
        null = self.data.null_text.expand_as(text).to(dtype) if stage.resample_cfg != 1.0 else None
        with self.acc.autocast():
            history, t_s = degrade_history(self.inner, x.to(dtype), text.to(dtype), settings, generator=gen,
                                           null_context=null)
        t_res = time.perf_counter() - t0 if stage.objective in RESAMPLING_OBJECTIVES else 0.0
        history, history_t = self._history_at_context_t(history, ctx_eps)
        attn = MaskedAttention(MaskSpec("dual", self.num_chunks, self.chunk_tokens), self.backend,
                               routing=settings.routing, routing_layers=settings.routing_layers)
        v = self.model(history, noisy, t, text, attn, history_t)
        loss, per_chunk = velocity_loss(v, velocity_target(x, eps), cfg.model.chunk_frames)
        return loss, per_chunk, t_s, t_res

    def _noised(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latents x [B, C, F, H, W] -> (per-chunk training timesteps t [B, N] ~ logit-normal
        (diffusion.train_t_*), noise eps [B, C, F, H, W], x_t [B, C, F, H, W]), drawn from `gen` in that order."""
        d, cf = self.cfg.diffusion, self.cfg.model.chunk_frames
        t = sample_logit_normal((x.shape[0], self.num_chunks), d.train_t_mean, d.train_t_std, d.train_t_shift,
                                generator=gen, device=self.device)
        eps = torch.randn(x.shape, generator=gen, device=self.device, dtype=x.dtype)
        return t, eps, add_noise(x, eps, t.repeat_interleave(cf, dim=1)[:, None, :, None, None])

    def _history_at_context_t(self, history: torch.Tensor, ctx_eps: Optional[torch.Tensor]):
        """The history stream as the KV cache holds it at inference: clean at t = 0, or with
        `diffusion.context_t` > 0 re-noised to that timestep with `ctx_eps` [B, C, F, H, W] (drawn with
        the loss's noise, before the degradation) -> (history, history_t [B, N] or None for 0)."""
        ctx = self.cfg.diffusion.context_t
        if ctx <= 0:
            return history, None
        return add_noise(history, ctx_eps.to(history.dtype), ctx), torch.full(
            (history.shape[0], self.num_chunks), float(ctx), device=history.device)

    def train_step(self, stop: Optional[GracefulStop] = None) -> Optional[dict]:
        """One optimizer step -> its log record; None when `stop` was requested on any process before
        its last micro-batch's backward: the step is dropped (no update, data position and counters as
        before it), so a checkpoint saved now resumes exactly where an uninterrupted run would go on. The
        Trainer must save and stop after a None: DeepSpeed keeps the dropped micro-batches' gradients in its
        engine (accelerate's zero_grad is a no-op there), which a further step would add in."""
        acc, cfg = self.acc, self.cfg
        k = cfg.train.grad_accum
        stage_idx, stage = stage_at(cfg, self.step)
        ramp = ramp_at(cfg, self.step)  # None without a ramp (hard switch)
        lr = train_lr(cfg, self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        start = time.perf_counter()
        good, skipped, t_res = 0, 0, 0.0
        losses, chunks, ts = [], [], []
        begin = (self.cursor.position, self.bad_in_a_row, global_rng_state())  # what a dropped step gives back
        while good < k:
            pos, batch, gen = self.cursor.next()
            last = good == k - 1
            acc.sync_gradients = last
            ctx = acc.no_sync(self.model) if not last else contextlib.nullcontext()
            with ctx:
                loss, per_chunk, t_s, dt = self.compute_loss(batch, stage, gen)
                t_res += dt
                flags = (not torch.isfinite(loss).item(), stop is not None and stop.requested is not None)
                bad, stopping = (v > 0 for v in over_processes(acc, self.device, flags, "max"))
                if stopping:  # within one micro-batch, not after the step (launchers kill 30 s after a signal)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.cursor.position, self.bad_in_a_row, rng = begin
                    set_global_rng_state(rng)  # LoRA dropout drew from it: the redone step draws the same masks
                    return None
                if bad:
                    skipped += 1
                    self.bad_in_a_row += 1
                    logger.warning("step %d: non-finite loss at data position %d; skipping this micro-batch "
                                   "(%d in a row)", self.step, pos, self.bad_in_a_row)
                    self._abort_if_too_many("non-finite losses")
                    continue
                acc.backward(loss)
            good += 1
            losses.append(loss.detach().float())
            chunks.append(per_chunk.detach().float().mean(0))
            if t_s is not None:
                ts.append(t_s.detach().float())
        grad_norm = self._optimizer_step()
        if grad_norm is not None and not torch.isfinite(torch.tensor(grad_norm)):
            self.bad_in_a_row += 1
            logger.warning("step %d: non-finite gradient norm; update skipped", self.step)
            self._abort_if_too_many("non-finite losses or gradient norms")
        else:
            self.bad_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self.inner)
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = MaskSpec("dual", self.num_chunks, self.chunk_tokens).seq_len * cfg.train.batch_size * k * acc.num_processes
        metrics = step_metrics(acc, losses, chunks, ts)  # a collective: one fixed-size gather
        rec = {"step": self.step, "stage": stage.name, "stage_index": stage_idx, "objective": stage.objective,
               "loss": metrics.pop("loss"), "loss_chunk": metrics.pop("loss_chunk"), "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm), "step_time": elapsed,
               "resample_time": t_res, "tokens_per_s": tokens / max(elapsed, 1e-9), "skipped": skipped,
               "data_position": self.data_position, "epoch": self.cursor.epoch}
        if ramp is not None:
            rec["ramp"] = ramp
        rec.update(metrics)  # t_s_mean/std/min/max in resampling stages
        if self.gap is not None and self.gap.due(self.step):
            rec.update(self.gap.metrics(self.inner, self.settings, stage_idx, ramp))
        return rec

    def _abort_if_too_many(self, what: str) -> None:
        """TrainingAborted after `train.max_bad_steps` bad micro-batches or updates in a row (the counter
        is the same on every process: both checks follow collectives)."""
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            good_ckpt, note = self.last_good_checkpoint()
            raise TrainingAborted(
                f"{self.bad_in_a_row} {what} in a row at step {self.step}; aborting. Last good "
                f"checkpoint: {good_ckpt or 'none'}{note} (lower train.lr or check the data)")

    def _optimizer_step(self) -> Optional[float]:
        if self.is_deepspeed:  # accelerate.backward already ran engine.step (clipping from the DS config)
            norm = self.acc.deepspeed_engine_wrapped.get_global_grad_norm()
            return None if norm is None else float(norm)
        return optimizer_step(self.acc, self.optimizer, self.inner.parameters(), self.cfg.train.grad_clip)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.acc
        total = total_steps(cfg)
        stop = GracefulStop("stopping at the next micro-batch (the step in progress is dropped and redone on "
                            "resume), saving a checkpoint, then exiting", "stopping without a checkpoint").install()
        status = "completed"
        bar = None
        redirect = contextlib.ExitStack()
        if cfg.train.progress and acc.is_main_process:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
            # console log lines (warnings) above the bar, not glued onto its line
            redirect.enter_context(logging_redirect_tqdm())
        try:
            while self.step < total:
                rec = self.train_step(stop)  # None: stopped within the step, which was dropped
                if rec is not None:
                    self.metrics.log(rec)
                    if self.step % cfg.train.save_every == 0 or self.step == total:
                        self.save()
                    if bar is not None:  # the postfix first: update() draws the bar with this step's loss
                        if self.step % cfg.train.log_every == 0 or self.step == total:
                            bar.set_postfix(loss=f"{rec['loss']:.4f}", stage=rec["stage"], refresh=False)
                        bar.update(1)
                if rec is None or self._all(1.0 if stop.requested else 0.0, "max") > 0:
                    if not self._saved_now():
                        self.save()
                    status = "interrupted"
                    logger.warning("stopped at step %d by %s; checkpoint %s; %s", self.step,
                                   stop.requested or "a signal on another process", self.last_checkpoint, self.resume_hint)
                    break
            if self.step >= total and not self._saved_now():
                self.save()
        except BaseException:
            for tracker in acc.trackers:  # flush TensorBoard/wandb; the JSONL log is already on disk
                tracker.finish()
            acc.trackers.clear()
            raise
        finally:
            stop.close()
            redirect.close()
            if bar is not None:
                bar.close()
        if acc.is_main_process and getattr(self.data.dataset, "num_bad", 0):  # each bad file once (data/loader.py)
            logger.warning("data: %s", self.data.summary())
        if self.zero_stage != 3:  # ZeRO-3: each process holds a partition, nothing to compare
            write_rank_report(self.run_dir / RANKS_DIR, self.inner, self.acc, self.step)
        acc.end_training()
        return {"status": status, "step": self.step, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "signal": stop.requested if status == "interrupted" else None}


def train(cfg: Config, accelerator=None, resume_hint: str = "run the same command to resume") -> dict:
    """Train `cfg` to the end of its last stage (or until SIGTERM/SIGINT). Resumes automatically.

    Before anything is loaded: `preflight` (backend on this device, writable folders, a memory
    estimate). The main process holds RUN/.lock for the whole run (a second trainer on the same
    run folder is refused); a start that fails before training removes the run folder it created."""
    import os

    from .training_utils import RunLock, preflight

    preflight(cfg, accelerator.num_processes if accelerator is not None else None)
    main = accelerator.is_main_process if accelerator is not None else int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(cfg.train.run_dir).acquire() if main else None
    started = False
    try:
        trainer = Trainer(cfg, accelerator, resume_hint)
        started = True
        return trainer.fit()
    finally:
        if lock is not None:
            lock.release(remove_run_dir=not started)
