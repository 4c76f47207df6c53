"""The arms of the ablation (ablation.py): what each arm's history degradation is (ARMS, and any form at any
strength: ar_S / parallel_S / ramp_S), the train overrides that make it (`arm_overrides`) and how the
user's --set and a seed replicate combine with them (`arm_settings`, `seed_overrides`)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .cli import BadInput

if TYPE_CHECKING:
    from .ablation import Preset

# name -> what the arm's history degradation is (filled with the calibration in arm_overrides)
ARMS = {
    "tf": "teacher forcing continued (clean history)",
    "noise_aug": "noise augmentation, sigma = sqrt(warmup rollout error); no noise-level input to the model",
    "parallel": "parallel resampling at the recommended s",
    "ar_0.6": "autoregressive self-resampling at the paper's s = 0.6",
    "ar_rec": "autoregressive self-resampling at the recommended s",
    "ar_large": "autoregressive self-resampling at 4x the recommended s",
    "ar_1step": "autoregressive self-resampling at the s whose degradation error matches the warmup's ONE-STEP error",
    "ramp": "ar_rec with a ramp: a video's history is resampled with probability rising 0 -> 1 over the first third",
    # optional (not in the default list): the ramp and parallel resampling at the paper's s and at ar_1step's
    "ramp_0.6": "ar_0.6 with the same ramp (probability 0 -> 1 over the first third)",
    "parallel_0.6": "parallel resampling at the paper's s = 0.6",
    "parallel_1step": "parallel resampling at ar_1step's s (the paper's AR-vs-parallel comparison at matched strength)",
    "ramp_1step": "ar_1step with the ramp (probability 0 -> 1 over the first third): gradual vs hard switch",
}
DEFAULT_ARMS = ("tf", "noise_aug", "parallel", "ar_0.6", "ar_rec", "ar_large", "ar_1step", "ramp")
# any other strength: ar_S, parallel_S, ramp_S with S a number (a dose-response sweep, e.g. ar_0.2,ar_1.2)
# the named arms of a form -> (form, strength): the calibration's recommended s ("rec"), 4x it ("large"),
# its one-step-matched s ("one_step"), or the paper's s ("paper", DiffusionConfig.resample_shift = 0.6)
_NAMED_FORMS = {"parallel": ("parallel", "rec"), "parallel_0.6": ("parallel", "paper"),
                "parallel_1step": ("parallel", "one_step"), "ar_0.6": ("ar", "paper"), "ar_rec": ("ar", "rec"),
                "ar_large": ("ar", "large"), "ar_1step": ("ar", "one_step"), "ramp": ("ramp", "rec"),
                "ramp_0.6": ("ramp", "paper"), "ramp_1step": ("ramp", "one_step")}
_AT_SHIFT = re.compile(r"^(ar|parallel|ramp)_([0-9]+(?:\.[0-9]+)?)$")
_MAX_SHIFT = 1000.0  # t_s ~ s t / (1 + (s - 1) t): beyond this every history is re-drawn from ~pure noise
_FORMS = {"ar": "autoregressive self-resampling", "parallel": "parallel resampling",
          "ramp": "autoregressive self-resampling with the ramp (probability 0 -> 1 over the first third)"}


def describe_arm(name: str) -> str:
    """What arm `name`'s history degradation is; BadInput for a name that is no arm."""
    if name in ARMS:
        return ARMS[name]
    m = _AT_SHIFT.match(name)
    if m:
        s = float(m.group(2))
        canonical = f"{m.group(1)}_" + f"{s:.4f}".rstrip("0").rstrip(".")  # one spelling: ar_1.0 / ar_0.60 = ar_1 / ar_0.6
        if not 0 < s <= _MAX_SHIFT or round(s, 4) != s:
            raise BadInput(f"--arms {name}: the strength must be in (0, {_MAX_SHIFT:g}] with at most 4 decimals")
        if canonical != name:
            raise BadInput(f"--arms {name}: write this arm as {canonical}")
        return f"{_FORMS[m.group(1)]} at s = {m.group(2)}"
    raise BadInput(f"--arms: unknown arm {name!r}; choose from {', '.join(ARMS)}, or ar_S / parallel_S / ramp_S "
                   "with S > 0 a resampling shift (e.g. ar_1.2)")
def arm_overrides(name: str, calib: dict, preset: Preset, steps: int, warmup: Path, run_dir: Path,
                  resample_steps: int = 1, resample_cfg: float = 1.0) -> list[str]:
    """train/train.py overrides of arm `name` (config keys; everything else is the preset config's).
    `resample_steps`, `resample_cfg`: Euler steps from t_s and guidance scale of the resampling arms'
    degradation (the paper's 1 and no guidance are the stage's defaults, left unsaid so that the arms of
    earlier runs keep their settings)."""
    from .config import DiffusionConfig

    s_rec, sigma = calib["recommended_shift"], calib["noise_sigma"]
    stage: dict = {"name": name.replace(".", "_"), "steps": steps}
    shift = s_rec
    describe_arm(name)
    if name == "tf":
        stage["objective"] = "teacher_forcing"
    elif name == "noise_aug":
        stage.update(objective="noise_augmentation", noise_aug_scale=round(sigma, 5))
    else:  # a form (ar, parallel, ramp) at a strength: a number (ar_S) or a named one (_NAMED_FORMS)
        at = _AT_SHIFT.match(name) if name not in ARMS else None
        form, strength = (at.group(1), float(at.group(2))) if at else _NAMED_FORMS[name]
        shift = strength if at else {"rec": s_rec, "large": 4 * s_rec, "one_step": calib["one_step_shift"],
                                     "paper": DiffusionConfig.resample_shift}[strength]
        stage["objective"] = "parallel_resampling" if form == "parallel" else "resampling"
        if resample_steps != 1:
            stage["resample_steps"] = int(resample_steps)
        if resample_cfg != 1.0:
            stage["resample_cfg"] = float(resample_cfg)
        if form == "ramp":
            stage.update(ramp="probability", ramp_steps=max(1, steps // 3))
    return [f"train.run_dir={run_dir}", f"train.init_from={warmup}", f"train.stages={json.dumps([stage])}",
            f"diffusion.resample_shift={round(shift, 4)}", f"train.lr={preset.lr}",
            f"train.warmup_steps={preset.lr_warmup}", "train.lr_schedule=cosine",
            f"train.min_lr_ratio={preset.min_lr_ratio}", f"train.save_every={max(1, steps // 3)}", "train.keep_last=1",
            "train.gap_every=0", "train.tensorboard=false"]


# Of the keys arm_overrides sets, --set may give the schedule (the same for every arm: it replaces the
# preset's, e.g. a LoRA's own lr) and train.stages (the warmup's; each arm has its own); not the ones that
# make an arm what it is (they were silently replaced).
SCHEDULE_KEYS = ("train.lr", "train.warmup_steps", "train.lr_schedule", "train.min_lr_ratio")
ARM_KEYS = ("train.run_dir", "train.init_from", "diffusion.resample_shift")


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def check_arm_sets(overrides: list[str]) -> None:
    """BadInput (one line) for a --set of a key that makes an arm (ARM_KEYS)."""
    for o in overrides:
        if _key(o) in ARM_KEYS:
            raise BadInput(f"--set {_key(o)}: the ablation sets it for each arm; use --out / --warmup, or choose "
                           "the arms (--arms)")


def arm_settings(arm: list[str], overrides: list[str], seed_sets: list[str]) -> list[str]:
    """An arm's train overrides: the user's --set, the arm's own (arm_overrides) without the schedule keys the
    user gave, the seed's."""
    given = {_key(o) for o in overrides} & set(SCHEDULE_KEYS)
    return list(overrides) + [o for o in arm if _key(o) not in given] + list(seed_sets)


def seed_overrides(seed: Optional[int], base) -> list[str]:
    """Overrides of a training-seed replicate (``--seed``): the arms' own randomness (data order, noise
    and t_s draws) changes; the data set (so the warmup's data and the evaluation clips) stays `base`'s."""
    from .config import synthetic_seed

    return [] if seed is None else [f"train.seed={seed}", f"data.synthetic_seed={synthetic_seed(base)}"]


