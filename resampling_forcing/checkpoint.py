"""Full training checkpoints: atomic writes, rotation, auto-resume, and graceful stop on signals.

Layout (docs/CONTRACTS.md): ``RUN/checkpoints/step_XXXXXXX/`` holds
- ``model.safetensors`` + ``model_config.json`` (our model format, ``models.loading.save_model``),
  ``ema.safetensors`` when EMA is on, ``config.yaml`` (the resolved Config);
- the trainer state written by ``accelerate.save_state``: optimizer (``optimizer.bin``), RNG
  (``random_states_R.pkl`` per rank); under DeepSpeed its own ``pytorch_model/`` folder (model +
  optimizer shards);
- ``trainer_state.json`` (step, stage, data position, LR, counters), written LAST.

A checkpoint is first written to ``RUN/checkpoints/.tmp-step_XXXXXXX`` by all processes and then
renamed by the main process, so a directory named ``step_*`` is always complete (and has
``trainer_state.json``). Leftover ``.tmp-*`` folders of a killed run are removed at the next start.
The newest ``step_*`` is the "latest"; ``keep_last`` bounds how many are kept.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional

from .io import atomic_write_json
from .models.loading import CheckpointError

logger = logging.getLogger("resampling_forcing.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: [(step, path)]."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def step_of(path: str | os.PathLike) -> Optional[int]:
    """The step of a checkpoints/step_XXXXXXX directory (None for any other name)."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, or a run dir (-> its latest checkpoint). CheckpointError otherwise."""
    p = Path(path)
    if is_checkpoint_dir(p):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    raise CheckpointError(f"{p} is neither a training checkpoint (no {STATE_FILE}) nor a run directory "
                          f"with checkpoints under {CHECKPOINTS}/")


def read_trainer_state(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def clean_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary checkpoint folders left by a killed run (main process only)."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def rotate(run_dir: str | os.PathLike, keep_last: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    removed = []
    for _, p in ckpts[:-keep_last]:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        # rename first so that a crash mid-delete never leaves a partial step_* folder
        trash = p.parent / f".old-{p.name}"
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, *, trainer_state: dict,
                    export: Callable[[Path], None], keep_last: int = 3) -> Path:
    """Write a full checkpoint for `step` (call on ALL processes). Returns the final path.

    `export(tmp_dir)` runs on every process (ZeRO-3 gathers weights collectively) and must write
    the model files on the main process only."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    export(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never a gap in completeness
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        rotate(run_dir, keep_last, protect=final)
    accelerator.wait_for_everyone()
    return final


class GracefulStop:
    """SIGTERM / SIGINT set `requested` (the loop saves and exits after the current step); a second
    signal raises KeyboardInterrupt at once. Restores the previous handlers on `close()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}

    def install(self) -> "GracefulStop":
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.requested = name
        logger.warning("%s received: finishing this step, saving a checkpoint, then exiting", name)

    def close(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except ValueError:
                pass
        self._old.clear()
