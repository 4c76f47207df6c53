"""Resumable sampling: what sample/sample.py keeps of each video in progress, so that a run stopped by a
signal, a crash, an out-of-memory kill or a pre-empted node goes on exactly where it stopped (`--resume`).

Next to each video `out.mp4` its folder `out.resume/` (`state_dir`) holds

    run.json            the run's key (`run_key`): everything the video's latents depend on
    chunk_000000.npy    the latents [C, cf, h, w] (fp32) of each generated chunk, each written atomically
                        as soon as its chunk is finished

and is removed once the video is committed whole. `--resume` checks the folder's key against the new
run's (a changed prompt, seed, checkpoint, setting is one line naming it), reads its chunks and hands
them to the rollout as `replay` (sampler.sample): they are not denoised again, while everything else a
chunk does (its noise, its cache write, its decode) runs as before, so the video is the one the
uninterrupted run writes, bit for bit on the same kind of device and batch. What a replay costs: one
cache-writing pass and one decode per kept chunk, instead of `steps` (x2 with CFG) denoising passes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from .io import atomic_path, atomic_write_json, clean_folder_temps

__all__ = ["ResumeError", "ResumeState", "state_dir", "run_key", "key_difference", "file_digest", "init_source",
           "finished", "batch_replay"]

KEY_FILE = "run.json"
KEY_VERSION = 1


class ResumeError(ValueError):
    """A resume folder that cannot be used (unreadable, or written by another run): one line."""


def state_dir(video: str | Path) -> Path:
    """The resume folder of the video `video` (out.mp4 -> out.resume)."""
    return Path(video).with_suffix(".resume")


def _chunk_file(folder: Path, g: int) -> Path:
    return folder / f"chunk_{g:06d}.npy"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (an init video or image: what the history is encoded from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_source(init_video, init_image, max_history_chunks: int, fps: float) -> Optional[dict]:
    """What a given history is made from, for the run key: the init file's bytes and how it is read."""
    if init_video is not None:
        return dict(kind="video", sha256=file_digest(init_video), max_history_chunks=int(max_history_chunks),
                    fps=fps)
    if init_image is not None:
        return dict(kind="image", sha256=file_digest(init_image))
    return None


def run_key(*, weights: str, pipeline: dict, options: dict, prompt, negative_prompt, seed: int, index: int,
            batch_indices: list, storyboard: Optional[list], switch_cache: Optional[str], init: Optional[dict]) -> dict:
    """What a video's latents depend on, as JSON: the weights' fingerprint (lora.fingerprint of the merged
    model: checkpoint, EMA, LoRAs), the model and geometry (`pipeline`, a Pipeline.describe()), the sampling
    options (`options`, SamplingOptions.to_dict()), the texts, the noise (seed, index) and the batch it is
    rolled out in (other batches round differently), and the history's source (`init`). Not in it: what
    changes no bit of the latents (the fps, the device's index, --kv-resident-chunks with an exact host tier,
    --record-selection) and the number of chunks (a resumed run may ask for more)."""
    opts = dict(options)
    opts.pop("record_selection", None)
    if opts.get("kv_host_dtype") is None:  # the bounded cache is bit-identical to the all-resident one
        opts.pop("kv_resident_chunks", None)
    pipe = {k: v for k, v in pipeline.items() if k not in ("source", "device")}
    pipe["device_type"] = str(pipeline.get("device", "cpu")).split(":")[0]
    return dict(version=KEY_VERSION, weights=weights, pipeline=pipe, sampling=opts, prompt=prompt,
                negative_prompt=negative_prompt, seed=int(seed), sample_index=int(index),
                batch_indices=[int(i) for i in batch_indices], storyboard=storyboard, switch_cache=switch_cache,
                init=init)


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def key_difference(then: dict, now: dict) -> Optional[str]:
    """The first setting two run keys differ in, as 'name: A then, B now'; None when equal."""
    a, b = _flat(json.loads(json.dumps(then))), _flat(json.loads(json.dumps(now)))
    for k in list(a) + [k for k in b if k not in a]:
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            show = [json.dumps(x.get(k, "<unset>"))[:60] for x in (a, b)]
            return f"{k}: {show[0]} then, {show[1]} now"
    return None


class ResumeState:
    """The resume folder of one video (see the module docstring)."""

    def __init__(self, video: str | Path):
        self.video = Path(video)
        self.dir = state_dir(video)

    def exists(self) -> bool:
        return self.dir.is_dir()

    def chunks(self) -> int:
        """Chunks kept: chunk files 0, 1, ... without a gap (a later one after a gap is not used)."""
        n = 0
        while _chunk_file(self.dir, n).is_file():
            n += 1
        return n

    def key(self) -> dict:
        try:
            key = json.loads((self.dir / KEY_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ResumeError(f"{self.dir / KEY_FILE} is unreadable ({type(e).__name__}); remove {self.dir} to "
                              "start that video over") from None
        if not isinstance(key, dict):
            raise ResumeError(f"{self.dir / KEY_FILE} is not a run key; remove {self.dir} to start that video over")
        return key

    def check(self, key: dict) -> None:
        """ResumeError unless the folder was written by a run with this key."""
        diff = key_difference(self.key(), key)
        if diff is not None:
            raise ResumeError(f"--resume: {self.dir} was written by another run ({diff}); rerun with its settings, "
                              "or remove the folder to start that video over")

    def begin(self, key: dict) -> None:
        """Make the folder for a run with `key` (keeping the chunks of an equal key's run)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        clean_folder_temps(self.dir)  # a chunk being written when the run was killed
        if not (self.dir / KEY_FILE).is_file() or key_difference(self.key(), key) is not None:
            for f in self.dir.glob("chunk_*.npy"):
                f.unlink()
            atomic_write_json(self.dir / KEY_FILE, key)

    def save(self, g: int, latents) -> None:
        """Keep generated chunk g's latents [C, cf, h, w] (atomically: a kill leaves it whole or absent)."""
        path = _chunk_file(self.dir, g)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, latents.detach().float().cpu().numpy(), allow_pickle=False)

    def load(self, n: int, shape: tuple):
        """The first n kept chunks as latents [1, C, m*cf, h, w] (m <= n), and a note when a chunk file was
        damaged (then the chunks from it on are generated again). `shape`: one chunk's [C, cf, h, w]."""
        pieces = []
        for g in range(n):
            path = _chunk_file(self.dir, g)
            try:
                a = np.load(path, allow_pickle=False)
                problem = None if a.shape == tuple(shape) and a.dtype == np.float32 \
                    else f"holds {a.dtype} {list(a.shape)}, not float32 {list(shape)}"
            except (OSError, ValueError, EOFError) as e:
                problem = f"is unreadable ({type(e).__name__})"
            if problem is not None:
                return _joined(pieces, shape), f"{path} {problem}: chunks {g}-{n - 1} are generated again"
            pieces.append(a)
        return _joined(pieces, shape), None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _joined(pieces: list, shape: tuple):
    import torch

    if not pieces:
        return torch.empty(1, shape[0], 0, *shape[2:])
    return torch.from_numpy(np.concatenate(pieces, axis=1)[None])


def finished(video: str | Path, key: dict, num_chunks: int) -> bool:
    """`video` is a whole video of `num_chunks` chunks committed by a run with `key` (its JSON sidecar's
    resume_key; a video is committed before its folder goes, so a folder left beside it changes nothing)."""
    video = Path(video)
    try:
        meta = json.loads(video.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return (video.is_file() and isinstance(meta, dict)
            and isinstance(meta.get("resume_key"), dict) and key_difference(meta["resume_key"], key) is None
            and meta.get("num_chunks") == num_chunks and "stopped_early" not in meta)


def batch_replay(states: list, keys: list, num_chunks: int, chunk_shape: tuple, note=print):
    """The chunks a batch's resume folders keep, as sample()'s `replay` [B, C, n*cf, h, w] (None when there
    are none): as many as every folder of the batch has (at most num_chunks). ResumeError for a folder
    that another run wrote; `note(msg)` hears of a damaged chunk file (generated again)."""
    import torch

    for st, key in zip(states, keys):
        if st.exists():
            st.check(key)
    n = min(min(st.chunks() if st.exists() else 0 for st in states), num_chunks)
    if n == 0:
        return None
    pieces = []
    for st in states:
        lat, problem = st.load(n, chunk_shape)
        if problem is not None:
            note(problem)
        pieces.append(lat)
    m = min(p.shape[2] for p in pieces)
    return torch.cat([p[:, :, :m] for p in pieces]) if m else None
