"""Resumable sampling: what sample/sample.py keeps of each video in progress, so that a run stopped by a
signal, a crash, an out-of-memory kill or a pre-empted node goes on exactly where it stopped (`--resume`).

Next to each video `out.mp4` its folder `out.resume/` (`state_dir`) holds

    run.json            the run's key (`run_key`): everything the video's latents depend on
    chunk_000000.npy    the latents [C, cf, h, w] (fp32) of each generated chunk, each written atomically
                        as soon as its chunk is finished

and is removed once every video of its batch is committed whole (kept with --keep-chunks, or when it
holds more chunks than were asked for). `--resume` checks the folder's key against the new run's (a
changed prompt, seed, checkpoint, setting is one line naming it) and hands its chunks to the rollout as
`replay` (sampler.sample), read one chunk at a time as the rollout reaches it: they are not denoised
again, while everything else a chunk does (its noise, its cache write, its decode) runs as before, so the
video is the one the uninterrupted run writes, bit for bit wherever that run is itself reproducible (the
same device model and batch; deterministic kernels). A replayed chunk costs one cache-writing pass and one
decode instead of `steps` (x2 with CFG) denoising passes. A folder without chunks holds nothing to resume
and counts as absent.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from .dtypes import dtype_name
from .io import atomic_path, atomic_write_json, clean_folder_temps

__all__ = ["ResumeError", "ResumeState", "state_dir", "run_key", "key_difference", "file_digest", "init_source",
           "finished", "written_by", "batch_replay", "ReplayChunks", "lock_videos"]

KEY_FILE = "run.json"
LOCKS_DIR = ".sample-locks"  # beside the videos: an empty lock file per video while it is written
KEY_VERSION = 1


class ResumeError(ValueError):
    """A resume folder that cannot be used (unreadable, or written by another run): one line."""


def state_dir(video: str | Path) -> Path:
    """The resume folder of the video `video` (out.mp4 -> out.resume)."""
    return Path(video).with_suffix(".resume")


@contextlib.contextmanager
def lock_videos(videos):
    """Hold an exclusive lock on each of `videos` (the ones this process writes) while the context runs: a
    second sample.py writing one of them (a repeated command, a --resume while the first still runs) is
    refused at once in one line (ResumeError) instead of both writing one resume folder. flock on
    OUTDIR/.sample-locks/NAME.lock: the kernel drops it however the holder ends (kill -9 too); the file is
    removed on release (a killed holder's stays, empty, and is reused). Where no lock can be had (a
    read-only folder, a file system without locks) it goes on without."""
    held: list[tuple[int, Path]] = []
    try:
        for video in videos:
            path = Path(video).parent / LOCKS_DIR / f"{Path(video).name}.lock"
            fd = _lock_file(path, video)
            if fd is not None:
                held.append((fd, path))
        yield
    finally:
        for fd, path in held:
            with contextlib.suppress(OSError):
                path.unlink()  # while still locked: a waiter that opened it finds it gone and retries (_lock_file)
            os.close(fd)
        for folder in {path.parent for _, path in held}:
            with contextlib.suppress(OSError):
                folder.rmdir()  # when no other video's lock is in it


def _lock_file(path: Path, video) -> Optional[int]:
    """The locked descriptor of lock file `path`, None where locks cannot be had; ResumeError when held."""
    import errno
    import fcntl

    for _ in range(100):  # a retry only follows a release between our open and our lock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResumeError(f"another process is writing {video} (its lock {path} is held); let it finish or "
                              "stop it, or choose another --output") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released and removed it after we opened it: lock the path's new file
    raise ResumeError(f"cannot lock {path} (it keeps being replaced); is another sample.py writing {video}?")


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
    model: checkpoint, EMA, LoRAs), the model, text encoder and geometry (`pipeline`, a Pipeline.describe()),
    the sampling options (`options`, SamplingOptions.to_dict()), the texts, the noise (seed, index), the batch
    it is rolled out in (other batches round differently) and the history's source (`init`). Not in it: what
    changes no bit of the latents (the fps, the device's index, the VAE without an init file: every chunk is
    decoded again anyway, --kv-resident-chunks with an exact host tier, --record-selection, the cache mode of
    a storyboard without switches) and the number of chunks (a resumed run may ask for more)."""
    opts = dict(options)
    opts.pop("record_selection", None)
    model_dtype = dtype_name(pipeline["dtype"]) if pipeline.get("dtype") else None  # "float32" -> "fp32"
    if opts.get("kv_host_dtype") in (None, model_dtype):  # bit-identical to the all-resident cache
        opts.pop("kv_resident_chunks", None)
        opts.pop("kv_host_dtype", None)
    pipe = {k: v for k, v in pipeline.items() if k not in ("source", "device")}
    pipe["device_type"] = str(pipeline.get("device", "cpu")).split(":")[0]
    if init is None and isinstance(pipe.get("encoders"), dict):
        pipe["encoders"] = {k: v for k, v in pipe["encoders"].items() if not k.startswith("vae")}
    switches = storyboard is not None and len(storyboard) > 1
    return dict(version=KEY_VERSION, weights=weights, pipeline=pipe, sampling=opts, prompt=prompt,
                negative_prompt=negative_prompt, seed=int(seed), sample_index=int(index),
                batch_indices=[int(i) for i in batch_indices], storyboard=storyboard,
                switch_cache=switch_cache if switches else None, init=init)


_UNSET = "<unset>"


def _difference(a, b, name: str) -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            diff = _difference(a.get(k, _UNSET), b.get(k, _UNSET), f"{name}.{k}" if name else str(k))
            if diff is not None:
                return diff
        return None
    if a == b:
        return None
    return f"{name}: {json.dumps(a)[:60]} then, {json.dumps(b)[:60]} now"


def key_difference(then: dict, now: dict) -> Optional[str]:
    """The first setting two run keys differ in, as 'name: A then, B now'; None when equal."""
    return _difference(json.loads(json.dumps(then)), json.loads(json.dumps(now)), "")


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
        """ResumeError unless the folder, when it keeps chunks, was written by a run with this key."""
        if not self.chunks():
            return
        diff = key_difference(self.key(), key)
        if diff is not None:
            raise ResumeError(f"--resume: {self.dir} was written by another run ({diff}); rerun with its settings, "
                              "or remove the folder to start that video over")

    def begin(self, key: dict, keep: int) -> None:
        """Make the folder for a run with `key` that replays `keep` chunks: the chunks from `keep` on are
        dropped (generated again, they may not mix with the old ones), all of them for another key's run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        clean_folder_temps(self.dir)  # a chunk being written when the run was killed
        try:
            ours = key_difference(self.key(), key) is None
        except ResumeError:  # none yet, or killed while the folder was made
            ours = False
        for f in self.dir.glob("chunk_*.npy"):
            if not ours or int(f.stem.split("_")[1]) >= keep:
                f.unlink()
        if not ours:
            atomic_write_json(self.dir / KEY_FILE, key)

    def save(self, g: int, latents) -> None:
        """Keep generated chunk g's latents [C, cf, h, w]: atomically and on disk before it is named (a kill
        or a power loss leaves it whole or absent). An OSError names the chunk file."""
        path = _chunk_file(self.dir, g)
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, latents.detach().float().cpu().numpy(), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            if e.filename is None:  # a failed write names no file: say which (a full disk names it, not the video)
                e.filename = str(path)
            raise

    def usable(self, n: int, shape: tuple) -> tuple[int, Optional[str]]:
        """How many of the first n chunk files hold a [C, cf, h, w] float32 array (`shape`), read from their
        headers (np.load with mmap: a short file fails too), and a note naming the first that does not."""
        for g in range(n):
            path = _chunk_file(self.dir, g)
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
                problem = None if a.shape == tuple(shape) and a.dtype == np.float32 \
                    else f"holds {a.dtype} {list(a.shape)}, not float32 {list(shape)}"
            except (OSError, ValueError, EOFError) as e:
                problem = f"is unreadable ({type(e).__name__})"
            if problem is not None:
                return g, f"{path} {problem}: chunks {g}-{n - 1} are generated again"
        return n, None

    def read(self, g: int) -> np.ndarray:
        return np.load(_chunk_file(self.dir, g), allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ReplayChunks:
    """sample()'s `replay` from resume folders, one chunk at a time: item g is [B, C, cf, h, w] (float32,
    CPU), sample b's from states[b]; only the chunk being replayed is in memory."""

    def __init__(self, states: list, n: int, kept: Optional[int] = None):
        self.states, self.n = states, int(n)
        self.kept = self.n if kept is None else int(kept)  # usable chunks in every folder (>= n: a shorter run)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int):
        import torch

        if not 0 <= g < self.n:
            raise IndexError(g)
        return torch.from_numpy(np.stack([st.read(g) for st in self.states]))


def _sidecar(video: str | Path) -> Optional[dict]:
    """The JSON written beside `video` when it was committed (None: absent or unreadable)."""
    try:
        meta = json.loads(Path(video).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def written_by(video: str | Path, key: dict, meta: Optional[dict] = None) -> bool:
    """`video`'s sidecar JSON (`meta`, else read) names a run with `key` (finished or stopped early): this
    command's video."""
    meta = _sidecar(video) if meta is None else meta
    return (meta is not None and isinstance(meta.get("resume_key"), dict)
            and key_difference(meta["resume_key"], key) is None)


def finished(video: str | Path, key: dict, num_chunks: int, fps: float, selection: bool) -> bool:
    """`video` is a whole video of `num_chunks` chunks at `fps` committed by a run with `key` (its JSON
    sidecar's resume_key), with its selection file when `selection` is asked for. A video is committed
    before its folder goes, so a folder left beside it changes nothing."""
    video = Path(video)
    meta = _sidecar(video)
    return (video.is_file() and written_by(video, key, meta) and meta.get("num_chunks") == num_chunks
            and "stopped_early" not in meta and meta.get("fps") == fps
            and (not selection or video.with_suffix(".selection.npy").is_file()))


def batch_replay(states: list, num_chunks: int, chunk_shape: tuple, note=print) -> Optional[ReplayChunks]:
    """The chunks a batch's resume folders keep, as sample()'s `replay` (None when there are none): as many
    as every folder of the batch has, at most num_chunks (`.kept`: all of them, which a shorter run leaves in
    place). The folders' keys are the caller's to check first (`ResumeState.check`: sample.py checks every
    folder before its first video); `note(msg)` hears of a damaged chunk file (it and the chunks after it are
    generated again)."""
    n = min(st.chunks() if st.exists() else 0 for st in states)
    for st in states:
        if n == 0:
            break
        m, problem = st.usable(n, chunk_shape)
        if problem is not None:
            note(problem)
        n = min(n, m)
    return ReplayChunks(states, min(n, num_chunks), kept=n) if n else None
