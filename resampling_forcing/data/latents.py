"""Precomputed VAE latents + text embeddings in safetensors shards, and a dataset reading them.

Layout of ``out_dir``
- ``shard-00000.safetensors``, ...: shard ``k`` holds the good videos among dataset rows
  ``[k * shard_size, (k + 1) * shard_size)``: tensors ``latents [n, C, f, h, w]`` and
  ``text [n, Lt, Dt]`` (dtype as the encoders return them unless ``dtype`` is given), and header
  metadata (strings): ``captions``, ``indices`` (dataset rows), ``paths``, ``bad`` (reason -> count
  for the rows skipped in this shard), ``start``, ``stop``, ``num_items``. A shard whose rows are
  all bad holds one empty tensor ``empty`` and ``num_items = 0``.
- ``null_text.safetensors``: ``text [Lt, Dt]`` (fp32), the text encoder's embedding of the empty prompt
  (text dropout, unconditional contexts), written by every run with the encoder that made the shards.
- ``index.json``: ``format``, ``complete``, ``num_items``, ``num_rows``, ``shard_size``,
  ``fingerprint`` (what was encoded: dataset class, manifest, clip size, fps, split, row count, a
  digest of the rows' paths and captions),
  ``latent_shape``, ``text_shape``, ``dtype``, ``bad_files`` and ``shards`` (``file``, ``start``,
  ``stop``, ``num_items``, ``bad``).

Resumable: shards are written atomically (temp name + rename), so a shard file that exists is
complete; on restart every existing shard is kept (even one written just before a crash and not
yet in the index) and only missing shards are encoded. ``index.json`` is rewritten atomically after
every shard and at the end (``complete: true``). Resuming into a folder made from a different
data set or ``shard_size`` raises a ``ValueError`` (use a new folder or ``overwrite=True``).

Encoders are duck-typed: ``vae.encode(video [B,3,F,H,W] in [-1,1]) -> [B,C,f,h,w]`` and
``text_encoder.encode(list[str]) -> [B, Lt, Dt]``.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..io import atomic_path, atomic_write_json

INDEX_NAME = "index.json"
NULL_TEXT_FILE = "null_text.safetensors"  # the empty prompt's embedding
FORMAT_VERSION = 1


SHARD_GLOB = "shard-*.safetensors"
# safetensors' header names -> torch's (the index records torch's, as a fresh run does)
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def remove_store_files(folder: str | os.PathLike) -> None:
    """Delete a store's index, shards and empty-prompt embedding from `folder` (other files are left alone)."""
    folder = Path(folder)
    for p in [*folder.glob(SHARD_GLOB), folder / INDEX_NAME, folder / NULL_TEXT_FILE]:
        p.unlink(missing_ok=True)


def write_null_text(folder: str | os.PathLike, text_encoder) -> None:
    """The empty prompt's embedding [Lt, Dt] (fp32) next to the shards, from the encoder that encodes
    them (a stale one from another encoder or text length broke text dropout)."""
    from safetensors.torch import save_file

    emb = text_encoder.encode([""])[0].float().cpu().contiguous()
    with atomic_path(Path(folder) / NULL_TEXT_FILE) as tmp:
        save_file({"text": emb}, str(tmp))


def _fingerprint(dataset, shard_size: int) -> dict:
    fp = {"dataset": type(dataset).__name__, "num_rows": len(dataset), "shard_size": int(shard_size)}
    for attr in ("manifest", "num_frames", "height", "width", "fps", "split", "random_start", "start_frame"):
        if hasattr(dataset, attr):
            v = getattr(dataset, attr)
            fp[attr] = str(Path(v).resolve()) if isinstance(v, Path) else v
    if hasattr(dataset, "rows"):  # an edited manifest (captions, paths) is another data set
        rows = json.dumps(dataset.rows, default=str, sort_keys=True).encode()
        fp["rows_sha256"] = hashlib.sha256(rows).hexdigest()
    return json.loads(json.dumps(fp, default=str))


# fingerprint keys -> the setting a user changes (precompute.py's flag or config key)
_FP_NAMES = {"manifest": "manifest", "num_frames": "data.num_frames", "height": "data.height", "width": "data.width",
             "fps": "data.fps", "split": "split", "shard_size": "shard size", "num_rows": "rows",
             "rows_sha256": "manifest rows (paths, captions)", "random_start": "random start",
             "start_frame": "start frame", "dataset": "data set class"}


def _fingerprint_diff(old, new: dict) -> str:
    """The settings two store fingerprints differ in, each with both values: "data.fps=8.0 (now 4.0), ..."
    (not two whole dicts: ~900 characters to diff by eye)."""
    if not isinstance(old, dict):
        return "an index without a fingerprint"

    def flat(fp: dict) -> dict:
        out = {}
        for k, v in fp.items():
            if isinstance(v, dict):  # encoders: one entry per key
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[_FP_NAMES.get(k, k)] = v
        return out

    a, b, missing = flat(old), flat(new), object()

    def show(d: dict, k: str) -> str:
        v = d.get(k, missing)
        text = "unrecorded" if v is missing else "all rows" if v is None and k == "split" else repr(v)
        return text if len(text) <= 48 else text[:16] + "..." + text[-28:]  # digests, long paths

    diffs = [f"{k}={show(a, k)} (now {show(b, k)})" for k in sorted(set(a) | set(b))
             if a.get(k, missing) != b.get(k, missing)]
    return ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _get_item(dataset, i: int):
    """(video, caption) of row i, or (None, reason) when the row is bad."""
    if hasattr(dataset, "try_get"):
        item = dataset.try_get(i)
        if item is None:
            reason = dataset.bad_reason(i) if hasattr(dataset, "bad_reason") else None
            return None, reason or "bad"
    else:
        try:
            item = dataset[i]
        except Exception as e:  # a generic dataset: count the error, keep going
            return None, type(e).__name__
    if isinstance(item, dict):
        return item["video"], str(item.get("caption", ""))
    video, caption = item[0], item[1]
    return video, str(caption)


def _infer_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _read_shard_header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return {"meta": meta, "shapes": shapes, "dtypes": dtypes}


def _shard_entry(file: str, meta: dict) -> dict:
    return {
        "file": file,
        "start": int(meta["start"]),
        "stop": int(meta["stop"]),
        "num_items": int(meta["num_items"]),
        "bad": json.loads(meta.get("bad", "{}")),
    }


def precompute(
    dataset,
    vae,
    text_encoder,
    out_dir: str | os.PathLike,
    shard_size: int = 256,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    encoders: dict | None = None,
) -> dict:
    """Encode every good row of ``dataset`` into shards under ``out_dir``; return the index dict.

    ``dataset``: a :class:`~resampling_forcing.data.video.VideoClipDataset` (its ``try_get`` skips
    bad files without fall-through, so each good video is encoded once) or any indexable dataset
    returning ``{"video", "caption"}`` / ``(video, caption)`` (an exception there counts as a bad row).
    ``device``: where the videos are sent (default: the VAE's parameter device, else CPU).
    ``dtype``: cast stored tensors (e.g. ``torch.float16``); default keeps the encoders' dtype.
    ``encoders``: the encoder settings (config ``encoders`` section), kept in the fingerprint so that a
    trainer can refuse a store made with other encoders (paths are left out: a moved checkpoint folder
    encodes the same).
    Prints a summary line at the end: items, shards, how many were encoded now and how many reused
    from the shards of an earlier run, skipped files by reason.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_rows = len(dataset)
    if n_rows == 0:
        raise ValueError("precompute: the dataset is empty")
    fp = _fingerprint(dataset, shard_size)
    if encoders is not None:
        fp["encoders"] = {k: v for k, v in sorted(encoders.items()) if not k.endswith("_path")}
    num_shards = -(-n_rows // shard_size)
    index_path = out / INDEX_NAME
    if overwrite:
        remove_store_files(out)
    elif index_path.exists():
        try:
            old = json.loads(index_path.read_text())
        except (OSError, ValueError):
            old = None
        old = old if isinstance(old, dict) else None  # a foreign index: as an unreadable one
        for key in ("encoders", "rows_sha256"):  # a store begun before these were recorded: resumable as it is
            if old is not None and key not in (old.get("fingerprint") or {}):
                fp.pop(key, None)
        if old is not None and old.get("fingerprint") != fp:
            raise ValueError(f"{out}: holds latents of a different data set/config "
                             f"({_fingerprint_diff(old.get('fingerprint'), fp)}); use a new folder or overwrite it "
                             "(train/precompute.py: --out NEW_DIR or --overwrite)")
    device = torch.device(device) if device is not None else _infer_device(vae)
    write_null_text(out, text_encoder)

    state = {"latent_shape": None, "text_shape": None, "dtype": None}
    shards: dict[int, dict] = {}
    # adopt every complete shard already on disk (atomic writes: existing == complete)
    for k in range(num_shards):
        p = out / shard_name(k)
        if not p.is_file():
            continue
        try:
            hdr = _read_shard_header(p)
            entry = _shard_entry(p.name, hdr["meta"])
        except Exception:
            p.unlink()  # unreadable leftover: encode again
            continue
        if entry["start"] != k * shard_size or entry["stop"] != min(n_rows, (k + 1) * shard_size):
            raise ValueError(f"{p}: covers rows {entry['start']}..{entry['stop']}, not shard {k}; use a new folder or "
                             "overwrite it (train/precompute.py: --out NEW_DIR or --overwrite)")
        shards[k] = entry
        if entry["num_items"] > 0 and state["latent_shape"] is None:
            state["latent_shape"] = hdr["shapes"]["latents"][1:]
            state["text_shape"] = hdr["shapes"]["text"][1:]
            state["dtype"] = _SAFETENSORS_DTYPES.get(hdr["dtypes"]["latents"], hdr["dtypes"]["latents"])

    def write_index(complete: bool) -> dict:
        entries = [shards[k] for k in sorted(shards)]
        bad = Counter()
        for e in entries:
            bad.update(e["bad"])
        index = {
            "format": FORMAT_VERSION,
            "complete": complete,
            "num_items": sum(e["num_items"] for e in entries),
            "num_rows": n_rows,
            "shard_size": shard_size,
            "num_shards": num_shards,
            "fingerprint": fp,
            "latent_shape": state["latent_shape"],
            "text_shape": state["text_shape"],
            "dtype": state["dtype"],
            "bad_files": dict(sorted(bad.items())),
            "shards": entries,
        }
        atomic_write_json(index_path, index)
        return index

    todo = [k for k in range(num_shards) if k not in shards]
    bar = None
    redirect = contextlib.ExitStack()
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(min(n_rows, (k + 1) * shard_size) - k * shard_size for k in todo), desc="precompute", unit="video")
        redirect.callback(bar.close)  # also on Ctrl+C / an error: the caller's message starts on its own line
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect.enter_context(logging_redirect_tqdm())
    with redirect:  # bad-file warnings above the bar, not glued onto its line
        if shards:
            write_index(complete=not todo)
        for k in todo:
            start, stop = k * shard_size, min(n_rows, (k + 1) * shard_size)
            lat_list, txt_list, caps, idxs, paths = [], [], [], [], []
            bad = Counter()
            pending: list[tuple[int, torch.Tensor, str]] = []

            def flush():
                if not pending:
                    return
                videos = torch.stack([torch.as_tensor(v) for _, v, _ in pending]).to(device=device, dtype=torch.float32)
                texts = [c for _, _, c in pending]
                with torch.inference_mode():
                    lat = vae.encode(videos)
                    emb = text_encoder.encode(texts)
                lat, emb = torch.as_tensor(lat).detach().cpu(), torch.as_tensor(emb).detach().cpu()
                if lat.shape[0] != len(pending) or emb.shape[0] != len(pending):
                    raise RuntimeError(f"encoders returned batch sizes {lat.shape[0]}, {emb.shape[0]} for {len(pending)} inputs")
                if dtype is not None:
                    lat, emb = lat.to(dtype), emb.to(dtype)
                lat_list.append(lat)
                txt_list.append(emb)
                caps.extend(texts)
                idxs.extend(i for i, _, _ in pending)
                pending.clear()

            for i in range(start, stop):
                video, cap = _get_item(dataset, i)
                if video is None:
                    bad[cap] += 1
                else:
                    if hasattr(dataset, "rows"):
                        paths.append(str(dataset.rows[i].get("path", "")))
                    pending.append((i, video, cap))
                    if len(pending) >= batch_size:
                        flush()
                if bar is not None:
                    bar.update(1)
            flush()
            meta = {
                "format": str(FORMAT_VERSION),
                "start": str(start),
                "stop": str(stop),
                "num_items": str(len(caps)),
                "captions": json.dumps(caps),
                "indices": json.dumps(idxs),
                "paths": json.dumps(paths),
                "bad": json.dumps(dict(sorted(bad.items()))),
            }
            if caps:
                tensors = {"latents": torch.cat(lat_list).contiguous(), "text": torch.cat(txt_list).contiguous()}
                if state["latent_shape"] is None:
                    state["latent_shape"] = list(tensors["latents"].shape[1:])
                    state["text_shape"] = list(tensors["text"].shape[1:])
                    state["dtype"] = str(tensors["latents"].dtype).replace("torch.", "")
                elif list(tensors["latents"].shape[1:]) != state["latent_shape"] or list(tensors["text"].shape[1:]) != state["text_shape"]:
                    raise RuntimeError(
                        f"shard {k}: shapes {list(tensors['latents'].shape[1:])}/{list(tensors['text'].shape[1:])} differ from "
                        f"earlier shards {state['latent_shape']}/{state['text_shape']}"
                    )
            else:
                tensors = {"empty": torch.zeros(0)}
            from safetensors.torch import save_file

            with atomic_path(out / shard_name(k)) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            shards[k] = _shard_entry(shard_name(k), meta)
            write_index(complete=False)
    index = write_index(complete=True)
    bad_total = sum(index["bad_files"].values())
    detail = ", ".join(f"{r}: {c}" for r, c in index["bad_files"].items())
    name = Path(str(fp.get("manifest", type(dataset).__name__))).name
    encoded = sum(shards[k]["num_items"] for k in todo)
    reused = index["num_items"] - encoded
    if not todo:
        how = f"all {num_shards} shard(s) reused from an earlier run, nothing encoded"
    elif len(todo) == num_shards:
        how = f"all {encoded} encoded now"
    else:
        how = (f"{encoded} encoded now in {len(todo)} shard(s), {reused} reused from {num_shards - len(todo)} "
               "shard(s) of an earlier run")
    print(
        f"precompute {name}: {index['num_items']} of {n_rows} videos in {num_shards} shard(s) at {out} ({how}); "
        f"{bad_total} skipped" + (f" ({detail})" if bad_total else "")
    )
    return index


class LatentDataset(Dataset):
    """Reads shards written by :func:`precompute` lazily (memory-mapped by safetensors).

    ``ds[i] -> {"latents": [C, f, h, w], "text": [Lt, Dt], "caption": str, "index": int}``
    (``index`` = the source dataset row). Shard files are opened on first use in each process,
    so the dataset can be handed to DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        ip = self.root / INDEX_NAME
        if not ip.is_file():
            raise ValueError(f"{ip}: latent index not found; run train/precompute.py --out {self.root} first")
        try:
            self.index = json.loads(ip.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{ip}: unreadable latent index ({e}); rerun precompute into {self.root}") from None
        self.shards = [s for s in self.index.get("shards", []) if int(s.get("num_items", 0)) > 0]
        if not self.shards:
            raise ValueError(f"{ip}: latent index lists no items; rerun precompute (were all videos bad? see bad_files: {self.index.get('bad_files')})")
        for s in self.shards:
            f = self.root / s["file"]
            if not f.is_file():
                raise ValueError(f"{f}: shard listed in {ip} is missing; rerun train/precompute.py with --out {self.root} "
                                 "(it encodes only the missing shards)")
            try:  # reads the header only: a truncated or foreign file fails here, not in a loader worker
                _read_shard_header(f)
            except Exception as e:
                raise ValueError(f"{f}: damaged shard ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                 f"delete it and rerun train/precompute.py with --out {self.root} (it encodes only "
                                 "the missing shards)") from None
        self.complete = bool(self.index.get("complete", False))
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + int(s["num_items"]))
        self._handles: dict[int, object] = {}
        self._meta: dict[int, tuple[list, list]] = {}

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, k: int):
        h = self._handles.get(k)
        if h is None:
            from safetensors import safe_open

            h = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
            meta = h.metadata() or {}
            self._meta[k] = (json.loads(meta.get("captions", "[]")), json.loads(meta.get("indices", "[]")))
            self._handles[k] = h
        return h

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        k = bisect.bisect_right(self._offsets, i) - 1
        j = i - self._offsets[k]
        h = self._handle(k)
        caps, idxs = self._meta[k]
        return {
            "latents": h.get_slice("latents")[j],
            "text": h.get_slice("text")[j],
            "caption": caps[j] if j < len(caps) else "",
            "index": int(idxs[j]) if j < len(idxs) else -1,
        }
