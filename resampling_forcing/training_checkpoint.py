"""The Trainer's checkpoints: resume (model, EMA, optimizer, step, data position, RNG through accelerate),
save and export (DeepSpeed's fp32 master weights, a LoRA run's merged weights and adapters), and, after
an abort, which checkpoint is really good. A mixin of training.Trainer (its state: acc, cfg, inner, ema,
lora, cursor, step, last_checkpoint); the folder layout is checkpoint.py's."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from . import lora
from .attention.masks import MaskSpec
from .attention.ops import MaskedAttention
from .checkpoint import (EMA_WEIGHTS, checkpoint_problem, config_file, latest_good_checkpoint, read_trainer_state,
                         resolve_trainer_checkpoint, save_checkpoint, weights_nonfinite)
from .checkpoint import step_of as step_of_path
from .config import run_config_yaml
from .diffusion import velocity_loss, velocity_target
from .models.loading import CheckpointError, load_state_into, read_state_dict, save_model
from .resampling import eval_mode
from .training_utils import EMA, stage_at, train_lr

logger = logging.getLogger("resampling_forcing.train")


class TrainerCheckpoints:
    """Checkpoint methods of training.Trainer."""

    def _find_resume(self) -> Optional[Path]:
        """The checkpoint to resume: the run's own newest good one, else train.resume_from (where a run
        starts: a branch of another run). Once the run has saved its own, rerunning the same command
        continues them, not its starting point again; sets self.started_from (carried in every checkpoint)."""
        # a truncated newest checkpoint (killed disk, full disk) falls back to the previous whole one
        own = latest_good_checkpoint(self.run_dir, set_aside=self.acc.is_main_process)
        self.started_from = None if own is None else read_trainer_state(own).get("started_from")
        if self.cfg.train.resume_from:
            start = resolve_trainer_checkpoint(self.cfg.train.resume_from)
            if own is None:
                problem = checkpoint_problem(start, resume=True)
                if problem:
                    raise CheckpointError(f"train.resume_from={start} is damaged ({problem}); "
                                          "pass an earlier checkpoint")
                self.started_from = str(start.resolve())
                return start
            if self.started_from != str(start.resolve()) and own.resolve() != start.resolve():
                raise CheckpointError(
                    f"train.run_dir={self.run_dir} already holds checkpoints (newest {own.name}) that did not start "
                    f"from train.resume_from={start}: resume them without train.resume_from, or branch into a "
                    "new train.run_dir")
            logger.info("resuming this run's own %s (train.resume_from=%s is where it started)", own.name, start)
        problem = None if own is None else checkpoint_problem(own, resume=True)
        if problem:  # whole weights without accelerate's optimizer state (copied without the .bin files?)
            raise CheckpointError(f"{own} cannot be resumed: {problem} (its weights are whole: start a new run "
                                  f"from them with train.init_from={own} and another train.run_dir, or restore the file)")
        return own

    # accelerate hooks: the model is saved/loaded in our format (model.safetensors), not twice
    def _save_hook(self, models, weights, output_dir):
        weights.clear()

    def _load_hook(self, models, input_dir):
        if models:
            models.clear()
            if self.lora is None:  # a LoRA run's adapters: _resume
                load_state_into(self.inner, read_state_dict(input_dir), source=str(input_dir))

    def _resume(self, ckpt: Path) -> None:
        state = read_trainer_state(ckpt)
        written_by = int(state.get("world_size", self.acc.num_processes))
        self.acc.load_state(str(ckpt), **(lora.DEEPSPEED_LOAD if self.lora and self.is_deepspeed else {}))
        self.step, self.cursor.position = int(state["step"]), int(state["data_position"])
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))  # the abort counter runs on across a resume
        if state.get("seed_rule") != "mix_seed":
            logger.warning("%s was written before the derived seeds changed (seeds.py): from here the data order "
                           "and the random draws differ from what an uninterrupted run of that version drew", ckpt)
        shadow = self.lora.resume(ckpt, self.inner, load_weights=not self.is_deepspeed) if self.lora else None
        if self.ema is not None:
            ema_file = ckpt / EMA_WEIGHTS
            if self.lora is None and ema_file.is_file():
                from safetensors.torch import load_file

                shadow = load_file(str(ema_file))
            if shadow:
                self.ema.load_state_dict(shadow)
            else:
                logger.warning("%s has no EMA weights: EMA restarts from the current weights", ckpt)
                self.ema = EMA(self.inner, self.cfg.train.ema_decay)
        if written_by != self.acc.num_processes:  # DDP: the state is whole on every process
            logger.warning("resuming with %d processes, the checkpoint was written by %s: the data order differs",
                           self.acc.num_processes, state.get("world_size"))
        self.last_checkpoint = ckpt
        logger.info("resumed from %s at step %d (data position %d)", ckpt, self.step, self.data_position)

    # -- after an abort: which checkpoint is really good ----------------------------------------

    def last_good_checkpoint(self) -> tuple[Optional[Path], str]:
        """After repeated non-finite losses: the newest checkpoint (up to `last_checkpoint`) whose weights
        (model and EMA) are all finite and whose weights give a finite loss on the last batch they were
        trained on (a teacher-forcing forward with a fixed seed, outside the normal step; skipped under
        ZeRO-3). Returns (path or None, a note naming the checkpoints rejected on the way, or "").
        Called on every process at the same point (the abort decision is collective); the verdicts are
        agreed over processes. The in-memory weights are overwritten (the run is aborting anyway)."""
        from .checkpoint import list_checkpoints

        if self.last_checkpoint is None:
            return None, ""
        last = step_of_path(self.last_checkpoint)
        candidates = [p for s, p in reversed(list_checkpoints(self.run_dir)) if last is None or s <= last]
        if not candidates:
            candidates = [self.last_checkpoint]
        rejected = []
        for ckpt in candidates:
            problem = self._checkpoint_nonfinite(ckpt)
            bad = self._all(1.0 if problem else 0.0, "max") > 0
            if not bad:
                note = f" ({'; '.join(rejected)})" if rejected else ""
                return ckpt, note
            rejected.append(f"{ckpt.name} rejected: {problem or 'non-finite on another process'}")
        return None, f" ({'; '.join(rejected)})"

    @torch.no_grad()
    def _checkpoint_nonfinite(self, ckpt: Path) -> Optional[str]:
        """Why `ckpt` is not a good restart point (non-finite weights or loss), or None."""
        problem = weights_nonfinite(ckpt)
        if problem or self.zero_stage == 3:  # ZeRO-3, partitioned weights: the file check only
            return problem
        try:
            state = read_trainer_state(ckpt)
            load = self.lora.load_merged if self.lora else load_state_into
            load(self.inner, read_state_dict(ckpt), source=str(ckpt))
        except CheckpointError as e:
            return str(e).splitlines()[0]
        loss = self._plain_loss(max(int(state.get("data_position", 1)) - 1, 0))
        if not torch.isfinite(loss):
            return f"its weights give a non-finite loss ({float(loss)})"
        return None

    @torch.no_grad()
    def _plain_loss(self, pos: int) -> torch.Tensor:
        """Teacher-forcing velocity loss of the current inner weights on the batch at data position `pos`
        (fixed generator, no text dropout, no resampling): a cheap finiteness probe."""
        batch, gen = self.cursor.batch_at(pos)
        x, text = batch["latents"], batch["text"]
        dtype = next(self.inner.parameters()).dtype
        t, eps, noisy = self._noised(x, gen)
        attn = MaskedAttention(MaskSpec("dual", self.num_chunks, self.chunk_tokens), self.backend)
        with eval_mode(self.inner), self.acc.autocast():
            v = self.inner.forward_dual(x.to(dtype), noisy.to(dtype), t, text.to(dtype), attn)
        return velocity_loss(v, velocity_target(x, eps), self.cfg.model.chunk_frames)[0].float()

    # -- checkpoints ------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        stage_idx, stage = stage_at(self.cfg, max(self.step - 1, 0))
        return {"step": self.step, "data_position": self.data_position, "stage_index": stage_idx,
                "stage": stage.name, "objective": stage.objective, "epoch": self.cursor.epoch,
                "lr": train_lr(self.cfg, self.step),
                "world_size": self.acc.num_processes, "engine": self.engine, "batch_size": self.cfg.train.batch_size,
                "grad_accum": self.cfg.train.grad_accum, "seed": self.cfg.train.seed,
                "bad_in_a_row": self.bad_in_a_row, "seed_rule": "mix_seed", "started_from": self.started_from,
                "time": time.time()}

    def _export_state(self) -> Optional[dict]:
        """The weights to export, or None for the module's own state (DDP, one process). Under DeepSpeed
        the fp32 master copy (the module holds bf16 working weights under bf16), gathered from the
        partitions: collectives, so every process calls this."""
        if not self.is_deepspeed:
            return None
        from deepspeed.utils import safe_get_full_fp32_param

        if self.zero_stage == 3:  # the module's tensors are empty placeholders: gather them (16-bit)
            full = self.acc.get_state_dict(self.model)
            state = {k[len("model."):]: v for k, v in full.items()} if full else {}
        else:
            state = dict(self.inner.state_dict())
        main = self.acc.is_main_process
        for name, p in self.inner.named_parameters():
            master = safe_get_full_fp32_param(p)  # a collective; None for a parameter the optimizer does not hold
            if master is not None and name in state and main:
                state[name] = master.cpu()  # one parameter at a time on the device, not a second model
        return state if main else None

    def _export(self, folder: Path) -> None:
        state = self._export_state()
        if not self.acc.is_main_process:
            return
        ema = self.ema.state_dict() if self.ema is not None else None
        if self.lora is not None:  # the merged weights (unless merged_checkpoints: false), the adapters beside them
            state, ema = self.lora.export(folder, state if state is not None else self.inner.state_dict(), self.ema)
        save_model(self.inner, folder, state=state, weights=self.lora is None or self.cfg.train.lora.merged_checkpoints)
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(folder / EMA_WEIGHTS))
        config_file(folder).write_text(run_config_yaml(self.cfg))

    def save(self) -> Path:
        path = save_checkpoint(self.acc, self.run_dir, self.step, trainer_state=self.trainer_state(),
                               save_kwargs=lora.DEEPSPEED_SAVE if self.lora and self.is_deepspeed else None,
                               export=self._export, keep_last=self.cfg.train.keep_last)
        self.last_checkpoint = path
        if self.acc.is_main_process:
            logger.info("saved %s", path)
        return path

    def _saved_now(self) -> bool:
        """Is the last checkpoint the current state (written at this step)?"""
        return self.last_checkpoint is not None and read_trainer_state(self.last_checkpoint)["step"] == self.step
