"""Training batches from `DataConfig`: deterministic order, sharded by rank, resumable by position.

Sources (config ``data.source``):
- ``synthetic``: the bouncing-shapes set is generated into ``data.synthetic_dir`` when missing
  (``data.synthetic_dataset.make_dataset``, clips of exactly ``num_frames`` frames), read with
  ``VideoClipDataset`` and encoded with the configured VAE / text encoder. Encoded clips are
  cached in memory on first use (the set is small), so the loader never limits a tiny run.
- ``manifest``: real videos (``data.manifest``), random clip starts per epoch, decoded by a
  DataLoader with ``data.num_workers`` workers and encoded on the training device per batch.
- ``latents``: a store written by ``data.latents.precompute`` (``data.latents_dir``).

Order: micro-batch ``p`` (the data position, one counter shared by all ranks) of epoch
``e = p // per_epoch`` takes, on rank r, positions ``[(i * world + r) * B, ... + B)`` of
``randperm(n, mix_seed(seed, e))`` (seeds.py) where ``i = p % per_epoch`` (the last partial batch is dropped). The
batch at a position is a pure function of (seed, position, rank, world), so a resumed run sees
exactly the batches an uninterrupted run would. ``data.fixed_batch`` repeats position 0 forever
(an overfitting smoke test).

Bad videos (video sources) are dropped from the epoch, never replaced by another video: rows known
bad when the data set is opened (missing, empty, a null byte in the path, and those decoded while
checking that one video is usable) are left out of the permutation (n counts the others); a row found
bad later is dropped from its micro-batch, which is then smaller, and ``batch`` returns None for a
micro-batch with no usable row (the trainer skips that position on every rank). Every file is a
property of the disk, so the order stays a pure function of the position. With DataLoader workers,
the workers record bad rows without logging; the rows travel back with the batch and are warned about
and recorded once in the main process's data set (its summary counts each file once; the workers of
the next epoch know them).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import Config
from ..seeds import mix_seed
from .latents import INDEX_NAME, NULL_TEXT_FILE  # the store layout (data.latents_dir)

logger = logging.getLogger("resampling_forcing.data")



class DataError(ValueError):
    """Missing data, no usable video, or a clip shape the model cannot train on (one line)."""


def prepare_null_text(cfg: Config, device: torch.device, write: bool = True) -> None:
    """The empty-prompt embedding of a latent store (text dropout, the unconditional context of resampling
    CFG and of the gap monitor), kept next to the latents as null_text.safetensors (what TrainData reads).
    Precompute writes it with the store; a store made before that gets it here, computed once with the
    configured text encoder. `write`: this process computes it when it is missing or does not match the
    store's text shape (the local main process; the others wait for it, then read it)."""
    if not cfg.data.latents_dir or not Path(cfg.data.latents_dir).is_dir():
        raise DataError(f"data.latents_dir={cfg.data.latents_dir!r} is not a directory; run "
                        "train/precompute.py --out DIR first and pass that DIR")
    path = Path(cfg.data.latents_dir) / NULL_TEXT_FILE
    problem = _null_text_problem(path)
    if write and problem is not None:
        from ..encoders import build_text_encoder
        from ..io import probe_writable_dir
        from .latents import write_null_text

        if probe_writable_dir(path.parent):
            raise DataError(f"{problem} and {path.parent} is not writable; rerun train/precompute.py for this "
                            "store (it writes the empty prompt's embedding) or make the folder writable")
        write_null_text(path.parent, build_text_encoder(cfg.encoders, device=device))


def _null_text_problem(path: Path) -> Optional[str]:
    """Why the store's null_text.safetensors at `path` is unusable (missing, unreadable, not the
    [Lt, Dt] of its index.json's text_shape), or None."""
    if not path.is_file():
        return f"{path} is missing"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shape = list(f.get_slice("text").get_shape())
        text_shape = json.loads((path.parent / INDEX_NAME).read_text()).get("text_shape")
    except Exception as e:  # noqa: BLE001 - a damaged file is computed again
        return f"{path} is unreadable ({type(e).__name__})"
    if text_shape is not None and shape != list(text_shape):
        return f"{path} holds a {shape} embedding, the store's texts are {text_shape}"
    return None


def store_mismatch(index: dict, cfg: Config) -> Optional[str]:
    """Why the latent store with `index` (its index.json) cannot train `cfg`, or None: the clips it
    encoded (frames, size, fps), the encoder settings (stores written since they are recorded) and the
    latent / text shapes this config's encoders and model expect."""
    from ..memory import codec_geometry, latent_frames

    d, e = cfg.data, cfg.encoders
    store = f"data.latents_dir={d.latents_dir}"
    fix = "precompute a store with this config (train/precompute.py --out NEW_DIR) or set"
    fp = index.get("fingerprint") or {}
    for key in ("num_frames", "height", "width", "fps"):
        if key in fp and fp[key] != getattr(d, key):
            return f"{store} holds clips with data.{key}={fp[key]}, the config has {getattr(d, key)}; {fix} data.{key}={fp[key]}"
    ours = dataclasses.asdict(e)
    # the settings the chosen encoders read (text_ngram means nothing to umT5, vae_factor to the Wan VAE)
    used = {"vae", "text", "text_len"} | ({"vae_factor"} if e.vae == "pixel_shuffle" else set()) \
        | ({"text_dim", "text_ngram"} if e.text == "hash" else set())
    for key, value in sorted((fp.get("encoders") or {}).items()):
        if key in used and ours[key] != value:
            return f"{store} was encoded with encoders.{key}={value}, the config has {ours[key]}; {fix} encoders.{key}={value}"
    geo = codec_geometry(cfg)
    want = [geo["channels"], latent_frames(geo, d.num_frames), d.height // geo["spatial"], d.width // geo["spatial"]]
    got = index.get("latent_shape")
    if got is not None and list(got) != want:
        return (f"{store} holds latents [C, f, h, w] = {list(got)}, this config's encoders make {want}; "
                f"{fix} the data/encoders settings it was made with")
    got = index.get("text_shape")
    if got is not None and list(got) != [e.text_len, cfg.model.text_dim]:
        return (f"{store} holds text embeddings [Lt, Dt] = {list(got)}, the config expects "
                f"[encoders.text_len, model.text_dim] = {[e.text_len, cfg.model.text_dim]}; {fix} those keys")
    return None


def synthetic_manifest(cfg: Config) -> Path:
    """Generate (or reuse) the synthetic set for cfg.data; return its manifest path."""
    from ..config import synthetic_seed
    from .synthetic_dataset import make_dataset

    d = cfg.data
    try:
        return make_dataset(d.synthetic_dir, num_videos=d.synthetic_videos, frames=d.num_frames,
                            size=(d.height, d.width), fps=d.fps, seed=synthetic_seed(cfg),
                            max_objects=d.synthetic_max_objects, blackout_prob=d.synthetic_blackout_prob,
                            blackout_frames=d.synthetic_blackout_frames)
    except ValueError as e:  # its values passed the config's checks: the folder is the problem (one line)
        raise DataError(f"data.synthetic_dir: {e}") from None


class TrainData:
    """Batches ``{"latents": [B, C, F, h, w], "text": [B, Lt, Dt], "caption": list[str]}`` on ``device``.

    ``null_text`` [Lt, Dt] is the embedding of the empty prompt (for text dropout)."""

    def __init__(self, cfg: Config, batch_size: int, rank: int = 0, world: int = 1, device="cpu",
                 vae=None, text_encoder=None, manifest: Optional[Path] = None):
        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world
        self.device = torch.device(device)
        self.source = cfg.data.source
        self.vae, self.text_encoder = vae, text_encoder
        self._clip_cache: dict[int, torch.Tensor] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._loader_epoch: Optional[int] = None
        self._loader_iter = None
        self._next_pos: Optional[int] = None
        self._perm: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation): drawn once per epoch
        if self.source == "latents":
            from .latents import LatentDataset

            if not cfg.data.latents_dir:
                raise DataError("data.source=latents needs data.latents_dir (a folder written by train/precompute.py)")
            try:
                self.dataset = LatentDataset(cfg.data.latents_dir)
            except ValueError as e:
                raise DataError(str(e)) from None
            problem = store_mismatch(self.dataset.index, cfg)
            if problem:
                raise DataError(problem)
            if not self.dataset.complete:  # training on a part would change the data order once it completes
                raise DataError(f"{cfg.data.latents_dir}: the latent store is unfinished ({len(self.dataset)} clips so "
                                "far: its precompute was stopped or is still running); finish it by rerunning "
                                f"train/precompute.py with --out {cfg.data.latents_dir}")
        else:
            from .video import VideoClipDataset

            if manifest is None:
                if self.source == "manifest":
                    if not cfg.data.manifest:
                        raise DataError("data.source=manifest needs data.manifest (a .jsonl/.json/.csv of path, caption)")
                    manifest = Path(cfg.data.manifest)
                else:
                    from .synthetic_dataset import MANIFEST_NAME

                    manifest = Path(cfg.data.synthetic_dir) / MANIFEST_NAME
            try:
                self.dataset = VideoClipDataset(
                    manifest, cfg.data.num_frames, cfg.data.height, cfg.data.width, fps=cfg.data.fps,
                    split="train", seed=cfg.train.seed, random_start=self.source == "manifest")
            except ValueError as e:
                raise DataError(str(e).splitlines()[0]) from None
            if vae is None or text_encoder is None:
                raise ValueError("video sources need the VAE and the text encoder")
            self._check_usable()
        # the rows of every epoch's permutation: all of them, less those already known to be bad
        bad = getattr(self.dataset, "bad_reason", lambda i: None)
        self.rows = [i for i in range(len(self.dataset)) if bad(i) is None]
        self.num_items = len(self.rows)
        if self.num_items < batch_size * world:
            raise DataError(f"{self.num_items} training clips cannot fill one batch of {batch_size} x {world} "
                            f"processes; add data or lower train.batch_size")
        self.per_epoch = self.num_items // (batch_size * world)
        self.null_text = self._null_text()
        if cfg.data.num_workers > 0 and self.source != "manifest" and rank == 0:
            logger.warning("data.num_workers=%d is not used: only data.source=manifest decodes in workers (%s data "
                           "is read in the training process)", cfg.data.num_workers, self.source)

    def _check_usable(self) -> None:
        """Refuse a manifest whose files are all unusable (corrupt, audio only, too short, ...) now, in the
        main process, with the skipped files counted by cause: not as a traceback from the first batch."""
        ds = self.dataset
        for i in range(len(ds)):
            if ds.try_get(i) is not None:
                return
        raise DataError(f"{ds.manifest}: no usable video: all {len(ds)} files skipped ({ds._counts_text()}); "
                        "check the paths (relative to the manifest) and the files (see the warnings above)")

    # -- order --------------------------------------------------------------------------------

    def indices(self, position: int) -> list[int]:
        """Dataset rows of this rank's micro-batch at `position`."""
        if self.cfg.data.fixed_batch:
            position = 0
        epoch, i = divmod(position, self.per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_items, generator=gen).tolist())
        start = (i * self.world + self.rank) * self.batch_size
        return [self.rows[j] for j in self._perm[1][start:start + self.batch_size]]

    def epoch_of(self, position: int) -> int:
        return 0 if self.cfg.data.fixed_batch else position // self.per_epoch

    # -- encoding -----------------------------------------------------------------------------

    def _null_text(self) -> torch.Tensor:
        """Embedding of the empty prompt; for a latent store read from its null_text.safetensors
        (written by precompute, or by `prepare_null_text` for an older store)."""
        if self.source == "latents":
            path = Path(self.cfg.data.latents_dir) / NULL_TEXT_FILE
            problem = _null_text_problem(path)
            if problem is not None:
                raise DataError(f"{problem}; rerun train/precompute.py for this store (it writes the empty "
                                "prompt's embedding), or train once with the text encoder configured")
            from safetensors.torch import load_file

            return load_file(str(path))["text"].float().to(self.device)
        return self.text_encoder.encode([""])[0].float().to(self.device)

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        if self.source != "synthetic":
            return self.text_encoder.encode(captions).float()
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            for c, e in zip(missing, self.text_encoder.encode(missing).float()):
                self._text_cache[c] = e.to(self.device)
        return torch.stack([self._text_cache[c] for c in captions])

    @torch.no_grad()
    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video.to(self.device)).float()

    def _synthetic_batch(self, idx: list[int]) -> Optional[dict]:
        missing = [i for i in idx if i not in self._clip_cache]
        items = [(i, self.dataset.try_get(i)) for i in missing]  # a bad file: None, dropped (module docstring)
        items = [(i, it) for i, it in items if it is not None]
        if items:
            lat = self._encode_video(torch.stack([it["video"] for _, it in items]))
            for (i, it), z in zip(items, lat):
                self._clip_cache[i] = (z, it["caption"])
        idx = [i for i in idx if i in self._clip_cache]
        if not idx:
            return None
        lat = torch.stack([self._clip_cache[i][0] for i in idx])
        caps = [self._clip_cache[i][1] for i in idx]
        return {"latents": lat, "text": self._encode_text(caps), "caption": caps}

    def _manifest_batch(self, position: int, idx: list[int]) -> Optional[dict]:
        epoch = self.epoch_of(position)
        if self.cfg.data.num_workers <= 0:
            self.dataset.set_epoch(epoch)
            batch = _collate([self.dataset.try_get(i) for i in idx])  # bad files: dropped (module docstring)
        else:
            if self._loader_epoch != epoch or self._loader_iter is None or self._next_pos != position:
                self._start_loader(position, epoch)
            batch = next(self._loader_iter, None)
            if batch is None:  # used up (data.fixed_batch: every position is epoch 0's first batch)
                self._start_loader(position, epoch)
                batch = next(self._loader_iter)
            self._next_pos = position + 1
            for i, reason, detail in batch["bad"]:  # found by a (quiet) worker: warned about and counted once, here
                self.dataset.note_bad(i, reason, detail)
        if batch["video"] is None:
            return None
        video, caps = batch["video"], list(batch["caption"])
        return {"latents": self._encode_video(video), "text": self._encode_text(caps), "caption": caps}

    def _start_loader(self, position: int, epoch: int) -> None:
        from torch.utils.data import DataLoader

        self.dataset.set_epoch(epoch)
        end = position + self.per_epoch if self.cfg.data.fixed_batch else (epoch + 1) * self.per_epoch
        lists = [self.indices(p) for p in range(position, end)]
        # forkserver: workers never inherit the trainer's threads (decord, TensorBoard, OpenMP), which
        # can deadlock forked children
        ctx = None
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["resampling_forcing.data.video"])  # torch imported once, not per worker
        loader = DataLoader(_DropBad(self.dataset), batch_sampler=lists, num_workers=self.cfg.data.num_workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda", multiprocessing_context=ctx,
                            worker_init_fn=_worker_init)
        self._loader_iter, self._loader_epoch = iter(loader), epoch

    def batch(self, position: int) -> Optional[dict]:
        """This rank's micro-batch at data position `position`; None when none of its videos is usable
        (video sources: bad rows are dropped, see the module docstring)."""
        idx = self.indices(position)
        if self.source == "latents":
            items = [self.dataset[i] for i in idx]
            return {"latents": torch.stack([it["latents"] for it in items]).float().to(self.device),
                    "text": torch.stack([it["text"] for it in items]).float().to(self.device),
                    "caption": [it["caption"] for it in items]}
        if self.source == "synthetic":
            return self._synthetic_batch(idx)
        return self._manifest_batch(position, idx)

    def first_batch(self, position: int = 0) -> tuple[int, dict]:
        """(p, batch) of the first position p >= `position` with a usable micro-batch."""
        for p in range(position, position + max(self.per_epoch, 1) * 4):
            b = self.batch(p)
            if b is not None:
                return p, b
        raise DataError(f"no usable micro-batch in {4 * self.per_epoch} positions from {position}: too few usable "
                        f"videos ({self.summary()})")

    def iterate(self, position: int) -> Iterator[tuple[int, dict]]:
        """(position, batch) for every usable micro-batch from `position` on."""
        while True:
            b = self.batch(position)
            if b is not None:
                yield position, b
            position += 1

    def summary(self) -> str:
        extra = ""
        if hasattr(self.dataset, "summary"):
            extra = f" ({self.dataset.summary()})"
        return f"{self.source} data: {self.num_items} clips, {self.per_epoch} micro-batches per epoch{extra}"


def _worker_init(worker_id: int) -> None:
    """A DataLoader worker: dies with its parent, and its copy of the data set records bad files without
    logging (the main process logs each once when the batch reports it; a prefetched batch that is
    discarded would otherwise have warned twice)."""
    die_with_parent(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "dataset"):
        info.dataset.dataset.quiet = True


def die_with_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: on Linux ask the kernel to SIGKILL this worker when its parent
    dies (prctl PR_SET_PDEATHSIG), so a trainer killed with -9 leaves no workers behind. Under the
    forkserver context the parent is the fork server, which exits when the trainer is gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


class _DropBad(torch.utils.data.Dataset):
    """The DataLoader's view of a VideoClipDataset: row i; for a bad file (no fall-through to another
    video) (i, reason) when this worker found it, None when it was already known. _collate drops both
    and reports the new ones to the main process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        known = self.dataset.bad_reason(i) is not None  # the main process knew it: nothing to report
        item = self.dataset.try_get(i)
        if item is None and not known:
            return (i, self.dataset.bad_reason(i) or "corrupt", self.dataset.bad_detail(i))
        return item


def _collate(items: list) -> dict:
    """Stack the good clips; a bad row (None, or (index, reason) from a worker) is dropped and listed
    under "bad". "video" is None when no clip of the micro-batch is usable."""
    good = [it for it in items if isinstance(it, dict)]
    bad = [it for it in items if isinstance(it, tuple)]
    return {"video": torch.stack([it["video"] for it in good]) if good else None,
            "caption": [it["caption"] for it in good], "bad": bad}
