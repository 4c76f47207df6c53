"""Exposure-gap logging during training (`train.gap_every`, diagnose.py): a batch held for the whole
run, measured with the current weights every `gap_every` steps on the main process; the trainer adds
the gap_* keys to that step's record. Own generators (seed train.seed): the training RNG is untouched,
so a run with the diagnostic on trains bit-identically to one with it off."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from .config import Config, ConfigError, StageConfig
from .resampling import DegradeSettings, eval_mode

logger = logging.getLogger("resampling_forcing.train")

# stage, ramp level (None: the stage at full strength) -> the stage's degradation (Trainer.settings)
SettingsFn = Callable[[StageConfig, Optional[float]], DegradeSettings]


class GapMonitor:
    """The held batch and the diagnostic on it; `held(...)` builds one, or None when it is off."""

    def __init__(self, cfg: Config, batch: tuple, device: torch.device, backend: str):
        self.cfg, self.batch, self.device, self.backend = cfg, batch, device, backend

    @classmethod
    def held(cls, cfg: Config, data, device: torch.device, backend: str, num_chunks: int, *, main: bool,
             zero_stage: int) -> Optional["GapMonitor"]:
        """Hold (latents [gap_clips, C, F, h, w], text, null text [1, Lt, Dt], negative prompt [1, Lt, Dt])
        of the first train.gap_clips clips from data position 0 on (`data`: data/loader.TrainData), fixed
        for the run. None when the diagnostic is off, on other processes than the main one, or under
        ZeRO-3 (partitioned weights)."""
        t = cfg.train
        if t.gap_every == 0 or not main:
            return None
        if zero_stage == 3:
            logger.warning("train.gap_every=%d: the exposure-gap diagnostic is skipped under DeepSpeed ZeRO-3 "
                           "(the weights are partitioned); run python -m resampling_forcing.diagnose on a checkpoint",
                           t.gap_every)
            return None
        if num_chunks < 3:
            raise ConfigError(f"train.gap_every={t.gap_every}: the exposure gap needs clips of at least 3 chunks "
                              f"(1 given, 1 generated as history, 1 after it); these have {num_chunks}")
        lat, text, pos = [], [], 0
        while sum(x.shape[0] for x in lat) < t.gap_clips:
            pos, b = data.first_batch(pos)
            lat.append(b["latents"])
            text.append(b["text"])
            pos += 1
        null = data.null_text[None].float()
        neg_prompt, enc = cfg.diffusion.negative_prompt, data.text_encoder
        neg = enc.encode([neg_prompt]).float().to(device) if neg_prompt and enc is not None else null
        return cls(cfg, (torch.cat(lat)[:t.gap_clips], torch.cat(text)[:t.gap_clips].float(), null, neg), device,
                   backend)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based, after it ran) logs the gap."""
        return step % self.cfg.train.gap_every == 0

    @torch.no_grad()
    def metrics(self, model, settings: SettingsFn, stage_idx: int, ramp: Optional[float] = None) -> dict:
        """Exposure gap of `model` (the plain CausalWanModel, current weights) on the held batch
        (diagnose.exposure_gap, 1 true chunk given, horizon = the clip): gap_degradation / gap_one_step /
        gap_rollout (means over the ratio chunks) and gap_ratio, with stage `stage_idx`'s degradation at
        ramp level `ramp`. During a teacher-forcing stage (degradation 0 by definition) it also reports the
        next degrading stage's degradation at full strength: gap_next_stage, gap_next_degradation,
        gap_next_ratio. Model in eval mode, then back. Runs in the weights' dtype (no autocast); sampler:
        the config's, with train.gap_sample_steps."""
        from .diagnose import degradation_error, exposure_gap
        from .options import SamplingOptions

        cfg = self.cfg
        stage = cfg.train.stages[stage_idx]
        dtype = next(model.parameters()).dtype
        x, text, null, neg = (v.to(dtype) for v in self.batch)
        opts = SamplingOptions.from_config(cfg, self.device, steps=cfg.train.gap_sample_steps, backend=self.backend,
                                           record_selection=False)
        t0 = time.perf_counter()
        with eval_mode(model):
            nulls = null.expand_as(text)
            rep = exposure_gap(model, x, text, settings(stage, ramp), opts, seed=cfg.train.seed,
                               null_context=nulls, neg_context=neg)
            out = dict(gap_degradation=rep.degradation_mean, gap_one_step=rep.one_step_mean,
                       gap_rollout=rep.rollout_mean, gap_ratio=rep.ratio)
            nxt = next((s for s in cfg.train.stages[stage_idx + 1:] if s.objective != "teacher_forcing"), None)
            if stage.objective == "teacher_forcing" and nxt is not None:
                err = degradation_error(model, x, text, settings(nxt, None), seed=cfg.train.seed, null_context=nulls)
                d = sum(float(err[i]) for i in rep.chunks) / len(rep.chunks)
                out.update(gap_next_stage=nxt.name, gap_next_degradation=d,
                           gap_next_ratio=d / rep.rollout_mean if rep.rollout_mean > 0 else float("nan"))
        out = {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}  # NaN -> null
        out["gap_time"] = time.perf_counter() - t0
        return out
