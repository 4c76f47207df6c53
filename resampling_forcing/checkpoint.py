"""Full training checkpoints: atomic writes, rotation, auto-resume.

Layout (docs/CONTRACTS.md): ``RUN/checkpoints/step_XXXXXXX/`` holds
- ``model.safetensors`` + ``model_config.json`` (our model format, ``models.loading.save_model``),
  ``ema.safetensors`` when EMA is on, ``config.yaml`` (the resolved Config); a LoRA run's
  ``lora.safetensors`` (with ``train.lora.merged_checkpoints: false`` instead of model and EMA weights);
- the trainer state written by ``accelerate.save_state``: optimizer (``optimizer.bin``), RNG
  (``random_states_R.pkl`` per rank); under DeepSpeed its own ``pytorch_model/`` folder (model +
  optimizer shards);
- ``trainer_state.json`` (step, stage, data position, LR, counters), written LAST.

A checkpoint is first written to ``RUN/checkpoints/.tmp-step_XXXXXXX`` by all processes and then
renamed by the main process, so a directory named ``step_*`` is always complete (and has
``trainer_state.json``). Leftover ``.tmp-*`` folders of a killed run are removed at the next start.
The newest ``step_*`` is the "latest"; ``keep_last`` bounds how many are kept.

This module is the one place that spells the names of a run directory (the constants and helpers
below) and that resolves a user's path to a checkpoint: ``resolve_checkpoint`` (sampling: a run dir,
a ``step_*`` dir, a raw Wan2.1 checkpoint or a cached Hub id -> ``CheckpointInfo``) and
``resolve_trainer_checkpoint`` (training: a ``step_*`` dir with trainer state, or a run dir -> its latest).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .io import atomic_write_json
from .models.loading import OUR_CONFIG, OUR_WEIGHTS, CheckpointError, detect_layout
from .storyboard import PipelineError

logger = logging.getLogger("resampling_forcing.train")

# ----------------------------------------------------------------------------- run-directory layout

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step_XXXXXXX/
STATE_FILE = "trainer_state.json"  # written last: a step_* dir with it is complete
CONFIG_FILE = "config.yaml"  # the resolved Config, in RUN/ and in every step_* dir
MODEL_WEIGHTS, MODEL_CONFIG = OUR_WEIGHTS, OUR_CONFIG  # our model format (models.loading.save_model)
EMA_WEIGHTS = "ema.safetensors"
LORA_WEIGHTS = "lora.safetensors"  # a LoRA run's adapters (+ their EMA); the two above hold merged weights
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"  # a step_* dir being written / being replaced or deleted
LOG_FILE = "log.jsonl"  # RUN/log.jsonl: one JSON record per logged step
TB_DIR = "tb"  # RUN/tb/: TensorBoard events
LOCK_FILE = ".lock"  # RUN/.lock: held by the running trainer (training_utils.RunLock)
RANKS_DIR = "ranks"  # RUN/ranks/rank_<i>.json: per-rank weight hashes (multi-process consistency check)
DEEPSPEED_STATE = "pytorch_model"  # step_*/pytorch_model/: DeepSpeed's own model + optimizer shards
OPTIMIZER_STATE = "optimizer.bin"  # step_*/optimizer.bin: accelerate's optimizer state (not under DeepSpeed)
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def config_file(folder: str | os.PathLike) -> Path:
    """The config.yaml of a run dir or of a checkpoint dir."""
    return Path(folder) / CONFIG_FILE


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


def resolve_trainer_checkpoint(path: str | os.PathLike) -> Path:
    """A training checkpoint dir (with trainer state), or a run dir (-> its newest whole checkpoint, as
    auto-resume picks; damaged newer ones are named in a warning, not set aside), to resume or initialise
    from. CheckpointError otherwise."""
    p = Path(path)
    if is_checkpoint_dir(p):
        return p
    if p.is_dir():
        latest = latest_good_checkpoint(p, set_aside=False)
        if latest is not None:
            return latest
    raise CheckpointError(f"{p} is neither a training checkpoint (no {STATE_FILE}) nor a run directory "
                          f"with checkpoints under {CHECKPOINTS}/")


def training_engine(deepspeed: bool, zero_stage: int) -> str:
    """What writes the optimizer state of a launch (recorded in trainer_state.json as "engine")."""
    return f"DeepSpeed ZeRO-{zero_stage}" if deepspeed else "DDP / one process"


def check_resume_world(ckpt: str | os.PathLike, world: int, engine: str) -> None:
    """A checkpoint resumes under the engine that wrote it (DeepSpeed's optimizer state and accelerate's
    optimizer.bin are different formats; across ZeRO stages no resume was tested, so none is offered), and a
    DeepSpeed one only on
    the process count that wrote it (its optimizer state is partitioned per process): CheckpointError
    (one line, both ways on) otherwise. DDP state resumes on any process count."""
    state = read_trainer_state(ckpt)
    written = state.get("engine")
    if written is None:  # written before the engine was recorded: DeepSpeed leaves its own folder
        deepspeed_written = (Path(ckpt) / DEEPSPEED_STATE).is_dir()
        if deepspeed_written != engine.startswith("DeepSpeed"):
            written = "DeepSpeed" if deepspeed_written else training_engine(False, 0)
    if written is not None and written != engine:
        raise CheckpointError(
            f"{ckpt} was written under {written} and this launch uses {engine}: their optimizer states do not "
            f"load into each other; relaunch with the accelerate config that wrote it, or start a new run from "
            f"its weights (train.run_dir=NEW train.init_from={ckpt}: step, optimizer state and data order restart)")
    written_by = int(state.get("world_size", world))
    if engine.startswith("DeepSpeed") and written_by != world:
        raise CheckpointError(
            f"{ckpt} was written by {written_by} DeepSpeed processes and this launch has {world}: DeepSpeed's "
            f"partitioned optimizer state cannot be re-split; relaunch with --num_processes {written_by}, or start "
            f"a new run from its weights (train.run_dir=NEW train.init_from={ckpt}: step, optimizer state and "
            "data order restart)")


def weights_nonfinite(ckpt: str | os.PathLike) -> Optional[str]:
    """Why the weight files of a checkpoint (model, EMA) are not a good restart point (a non-finite
    value, an unreadable file), or None."""
    import torch
    from safetensors import safe_open

    for name in (MODEL_WEIGHTS, EMA_WEIGHTS, LORA_WEIGHTS):
        f = Path(ckpt) / name
        if not f.is_file():
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if not torch.isfinite(st.get_tensor(key)).all():
                        return f"{name} has non-finite values ({key})"
        except Exception as e:  # noqa: BLE001 - a damaged file is not a good checkpoint either
            return f"cannot read {name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def read_trainer_state(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------- sampling: path -> checkpoint


@dataclass
class CheckpointInfo:
    kind: str  # "run" | "checkpoint" | "wan"
    path: Path  # what the user gave
    model_dir: Path  # folder holding the weights
    config_path: Optional[Path]  # config.yaml to use (None for a raw Wan checkpoint without one)
    weights: Optional[Path]  # our format: the safetensors file to load (lora.safetensors: a LoRA checkpoint
    #                          without merged weights, lora.merged_weights); None = read_state_dict(model_dir)
    step: Optional[int] = None
    ema_adapters: bool = False  # such a checkpoint read with its adapters' EMA

    @property
    def ema(self) -> bool:
        return self.weights is not None and (self.weights.name == EMA_WEIGHTS or self.ema_adapters)


def _complete(d: Path) -> bool:
    """Our checkpoint with weights: merged (model.safetensors) or a LoRA run's adapters only."""
    return ((d / MODEL_WEIGHTS).is_file() or (d / LORA_WEIGHTS).is_file()) and (d / MODEL_CONFIG).is_file()


_WARNED: set = set()  # (checkpoint, problem) pairs resolve_checkpoint has warned about


def _looks_like_hub_id(path: Union[str, Path]) -> bool:
    return isinstance(path, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None \
        and not path.startswith((".", "/")) and ".." not in path


def resolve_hub_id(repo_id: str) -> Path:
    """A Hugging Face Hub id ("org/name") -> its snapshot folder in the local Hugging Face cache
    (HF_HUB_CACHE), offline: nothing is downloaded. PipelineError when it is not cached."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - a transformers/diffusers dependency
        raise PipelineError(f"{repo_id}: no such local path (and huggingface_hub is not installed)") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, invalid ids, ...
        parent = Path(repo_id.split("/")[0])
        if parent.is_dir():  # "runs/tiny", "assets/tiny-pretraind": meant as a local folder
            near = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
            raise PipelineError(f"checkpoint {repo_id}: no such folder (in {parent}/: {', '.join(near) or 'nothing'}); "
                                "pass a run folder, a checkpoint folder or a Hugging Face id") from None
        raise PipelineError(f"checkpoint {repo_id}: no such folder, and not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}); pass a run or checkpoint folder (training writes them "
                            f"to train.run_dir, e.g. runs/tiny for configs/tiny.yaml), or download the model first "
                            f"(`hf download {repo_id}`) ({type(e).__name__})") from None


def resolve_checkpoint(path: Union[str, Path], use_ema: bool = True) -> CheckpointInfo:
    """Classify `path` for sampling as a run dir (-> its newest complete step_* dir), one of our
    checkpoint dirs (EMA weights unless use_ema=False; the config.yaml of the checkpoint, else of
    the run) or a raw Wan checkpoint. A path that does not exist but looks like a Hub id
    ("org/name") resolves through the local Hugging Face cache (offline). PipelineError (one line)."""
    p = Path(path).expanduser()
    if not p.exists() and _looks_like_hub_id(path):
        p = resolve_hub_id(str(path))
    if not p.exists():
        raise PipelineError(f"checkpoint {p} does not exist; pass a run dir, a {CHECKPOINTS}/step_* dir or a Wan2.1 / Wan2.2 checkpoint")
    if not p.is_dir():
        raise PipelineError(f"checkpoint {p} is a file; pass its directory (run dir, {CHECKPOINTS}/step_* or a Wan2.1 / Wan2.2 folder)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise PipelineError(f"checkpoint {p} cannot be read (permission denied); check its permissions")
    kind = "checkpoint"

    def weights_of(d: Path) -> Path:
        if not (d / MODEL_WEIGHTS).is_file() and (d / LORA_WEIGHTS).is_file():
            return d / LORA_WEIGHTS  # adapters only (train.lora.merged_checkpoints: false)
        return d / EMA_WEIGHTS if use_ema and (d / EMA_WEIGHTS).is_file() else d / MODEL_WEIGHTS

    if not _complete(p) and checkpoint_root(p).is_dir():
        ckpts = [c for _, c in reversed(list_checkpoints(p)) if _complete(c)]
        if not ckpts:
            raise PipelineError(f"run {p} has no complete checkpoint under {CHECKPOINTS}/ (step_XXXXXXX written "
                                f"by the trainer); train longer or pass a checkpoint dir")
        # the newest whose weights are whole (a run killed while a disk filled keeps a truncated one)
        damaged = []
        for ck in ckpts:
            problem = safetensors_problem(weights_of(ck))
            if problem is None:
                break
            damaged.append((ck, problem))
        else:
            raise PipelineError(f"run {p}: the weights of every checkpoint are damaged (newest: {ckpts[0].name}, "
                                f"{damaged[0][1]}); restore one")
        for bad, why in damaged:
            if (bad, why) not in _WARNED:  # once a process: a command resolves its checkpoint more than once
                _WARNED.add((bad, why))
                logger.warning("checkpoint %s is damaged (%s); using the previous whole one, %s", bad, why, ck.name)
        run_dir, p, kind = p, ck, "run"
    else:
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else None
    if _complete(p):
        weights = weights_of(p)
        problem = safetensors_problem(weights)
        if problem:
            raise PipelineError(f"checkpoint {p}: {problem}; pass another checkpoint"
                                + (f" of its run ({run_dir}/{CHECKPOINTS}/step_*, or the run dir: its newest "
                                   "whole one)" if run_dir is not None else ""))
        cfg_path = next((c for c in (config_file(p), config_file(run_dir) if run_dir else None)
                         if c is not None and c.is_file()), None)
        from .lora import has_ema

        return CheckpointInfo(kind, Path(path), p, cfg_path, weights, step_of(p),
                              ema_adapters=weights.name == LORA_WEIGHTS and use_ema and has_ema(weights))
    if (p / MODEL_CONFIG).is_file() or (p / MODEL_WEIGHTS).is_file():
        missing = MODEL_WEIGHTS if not (p / MODEL_WEIGHTS).is_file() else MODEL_CONFIG
        raise PipelineError(f"checkpoint {p} is incomplete: {missing} is missing")
    try:
        detect_layout(p)
    except CheckpointError as e:
        raise PipelineError(str(e)) from None
    return CheckpointInfo("wan", Path(path), p, config_file(p) if config_file(p).is_file() else None, None)


# ----------------------------------------------------------------------------- resume checks


DAMAGED_SUFFIX = ".damaged"


class DiskFullError(CheckpointError):
    """A save ran out of space; the message is "no space left on <dir>: ..." (one line)."""


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is not whole (header against the file size; nothing loaded), or None."""
    if not Path(path).is_file():
        return f"{Path(path).name} is missing"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name} is truncated (header of {n} bytes, file of {size})"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return f"{path.name} has a corrupt header"
    except OSError as e:  # unreadable (permissions): one line, not a traceback
        return f"{path.name} cannot be read ({e.strerror or type(e).__name__})"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} has a corrupt header"
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path.name} is truncated"
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{path.name} is truncated or corrupt"
    return None


def checkpoint_problem(ckpt: str | os.PathLike, resume: bool = False) -> Optional[str]:
    """Why a checkpoint folder cannot be used (a truncated or missing file), or None; `resume`: to resume
    training from, so accelerate's optimizer state must be there too (weights alone serve init_from, --lora).

    Cheap: safetensors headers against the file sizes, torch zip files' central directories,
    pickles' final STOP opcode, trainer_state.json parsed; nothing is loaded."""
    ckpt = Path(ckpt)
    try:
        json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"{STATE_FILE} is missing or unreadable"
    if not (ckpt / MODEL_WEIGHTS).is_file() and not (ckpt / LORA_WEIGHTS).is_file():
        return f"{MODEL_WEIGHTS} (or a LoRA run's {LORA_WEIGHTS}) is missing"
    if resume and not (ckpt / DEEPSPEED_STATE).is_dir() and not (ckpt / OPTIMIZER_STATE).is_file():
        return f"{OPTIMIZER_STATE} is missing"  # accelerate's (DeepSpeed keeps its own in {DEEPSPEED_STATE}/)
    try:
        for p in sorted(ckpt.rglob("*")):
            if not p.is_file():
                continue
            if p.stat().st_size == 0:
                return f"{p.relative_to(ckpt)} is empty"
            if p.suffix == ".safetensors":
                problem = safetensors_problem(p)
            elif p.suffix in (".bin", ".pt", ".pth", ".pkl") and _is_zip(p):  # torch.save's zip format
                problem = _zip_problem(p)
            elif p.suffix in (".bin", ".pt", ".pth") and not _is_legacy_pickle(p):
                problem = f"{p.relative_to(ckpt)} is not a torch.save file (damaged)"
            elif p.suffix == ".pkl":  # a plain pickle ends with the STOP opcode
                with open(p, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    problem = None if f.read(1) == b"." else f"{p.name} is truncated"
            else:
                problem = None
            if problem:
                return problem
    except OSError as e:
        return f"cannot read it ({e.strerror or type(e).__name__})"
    return None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object torch.save's pre-zip format pickles


def _is_legacy_pickle(path: Path) -> bool:
    """torch.save's pre-zip format: a stream of pickles (then raw tensor bytes) whose first one is its magic
    number. Read with pickletools (opcodes only: nothing is unpickled or run)."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("LONG1", "LONG4", "LONG", "INT") and arg == _LEGACY_MAGIC:
                    return True
                if op.name == "STOP":
                    return False
    except Exception:  # not a pickle at all
        return False
    return False


def latest_good_checkpoint(run_dir: str | os.PathLike, set_aside: bool = True) -> Optional[Path]:
    """The newest complete checkpoint whose files are whole. Damaged newer ones are named in a
    warning and (``set_aside``, main process) renamed to ``step_XXXXXXX.damaged`` so that neither a
    later resume nor rotation nor the sampler picks them. CheckpointError when all are damaged."""
    ckpts = list_checkpoints(run_dir)
    damaged = []
    for _, path in reversed(ckpts):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                logger.warning("checkpoint %s is damaged (%s); resuming from the previous complete one, %s%s",
                               bad, why, path.name, f" (kept as {bad.name}{DAMAGED_SUFFIX})" if set_aside else "")
            if set_aside:
                for bad, _ in damaged:
                    with_suffix = bad.with_name(bad.name + DAMAGED_SUFFIX)
                    shutil.rmtree(with_suffix, ignore_errors=True)
                    os.replace(bad, with_suffix)
            return path
        damaged.append((path, problem))
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(f"every checkpoint in {checkpoint_root(run_dir)} is damaged (newest: {bad.name}, {why}); "
                              f"restore one, or start over with another train.run_dir")
    return None


def clean_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary checkpoint folders left by a killed run (main process only)."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
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
        trash = p.parent / f"{OLD_PREFIX}{p.name}"
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
                    export: Callable[[Path], None], keep_last: int = 3, save_kwargs: Optional[dict] = None) -> Path:
    """Write a full checkpoint for `step` (call on ALL processes). Returns the final path.

    `export(tmp_dir)` runs on every process (ZeRO-3 gathers weights collectively) and must write
    the model files on the main process only. `save_kwargs` go to DeepSpeed's save_checkpoint."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), **(save_kwargs or {}))
        export(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, trainer_state)
    except Exception as e:
        from .io import is_no_space

        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint is untouched: only tmp was written
        if is_no_space(e):
            prev = latest_checkpoint(run_dir)
            raise DiskFullError(f"no space left on {root}: checkpoint {final.name} was not written"
                                + (f"; {prev.name} is intact" if prev is not None else "")
                                + "; free some space and run the same command to resume") from None
        raise
    if accelerator.is_main_process:
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never a gap in completeness
            old = root / f"{OLD_PREFIX}{final.name}"
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
