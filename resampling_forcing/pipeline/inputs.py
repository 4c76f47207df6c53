"""Init videos and images: given frames -> a pixel clip [1, 3, F', H, W] that encodes to whole chunks.

Init videos (`prepare_init_video`): frames are resized to cover the config resolution
(data.height x data.width, aspect kept, antialiased bilinear) and centre-cropped
(data.video.resize_center_crop, the same resize as the training clips); then the frame count is
trimmed to a whole number of chunks IN LATENT SPACE, keeping the END of the video (the
continuation follows its last frame) and dropping the first frames: with the Wan VAE
(F = 1 + 4(f - 1)) n chunks of cf latent frames need exactly 1 + 4(n*cf - 1) pixel frames, with
the pixel-shuffle codec n*cf*temporal_factor. The kept frames are encoded as a clip of their own
(so its first frame is the VAE's causal first frame, as in training).

Init images (`image_clip`): the image repeated to the pixel frames of one chunk, then as above.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..data.video import resize_center_crop
from ..storyboard import PipelineError

__all__ = ["prepare_init_video", "read_image", "image_clip", "video_clip"]


def _as_pixels(frames, what: str) -> torch.Tensor:
    """Given pixels (array or tensor) -> a CPU tensor, checked: uint8 (0..255) or a float dtype with finite
    values in [-1, 1], no empty axis. PipelineError naming `what` otherwise (a float image in 0..255, a
    bool or int64 array, NaN: were accepted and gave a white or NaN history)."""
    try:
        x = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    except (TypeError, ValueError, RuntimeError) as e:
        raise PipelineError(f"{what}: not an array of pixels ({type(frames).__name__}: {str(e).splitlines()[0]})") from None
    if x.numel() == 0:
        raise PipelineError(f"{what}: empty (shape {list(x.shape)})")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise PipelineError(f"{what}: dtype {str(x.dtype).replace('torch.', '')}; pass uint8 (0..255) or float in [-1, 1]")
    if x.dtype.is_floating_point:
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.01 or hi > 1.01:
            raise PipelineError(f"{what}: float values must be finite and in [-1, 1] (got {lo:g}..{hi:g}); "
                                "0..255 pixels go as uint8")
    return x


def _frames_to_float(frames, what: str = "init video") -> torch.Tensor:
    """uint8 [F, H, W, 3] (or float [3, F, H, W] / [F, H, W, 3] in [-1, 1]) -> float [3, F, H, W]."""
    x = _as_pixels(frames, what)
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4:
        raise PipelineError(f"{what} must be [F, H, W, 3] uint8 or [3, F, H, W] float; got shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise PipelineError(f"{what}: uint8 frames must be [F, H, W, 3]; got {list(x.shape)}")
        return x.permute(3, 0, 1, 2).float() / 127.5 - 1.0
    x = x.float()
    if x.shape[0] == 3 and x.shape[-1] != 3:
        return x
    if x.shape[-1] == 3:
        return x.permute(3, 0, 1, 2)
    raise PipelineError(f"{what}: float frames must be [3, F, H, W] or [F, H, W, 3]; got {list(x.shape)}")


def prepare_init_video(frames, vae, height: int, width: int, chunk_frames: int,
                       max_chunks: Optional[int] = None, sar: float = 1.0,
                       what: str = "init video", counted: str = "") -> tuple[torch.Tensor, dict]:
    """Frames of a given video -> (video [1, 3, F', height, width] in [-1, 1], info), F' the
    largest frame count that encodes to a whole number of chunks (at most `max_chunks`),
    keeping the LAST F' frames. `sar`: the frames' pixel aspect ratio (resize_center_crop keeps the
    displayed aspect). Raises PipelineError naming `what` when the video is shorter than one chunk
    (`counted` says how its frames were counted, e.g. after resampling a file's rate)."""
    video = _frames_to_float(frames, what)
    n_in = video.shape[1]
    tf = vae.temporal_factor
    latent_avail = (1 + (n_in - 1) // tf) if vae.causal_first_frame else n_in // tf
    chunks = latent_avail // chunk_frames if n_in > 0 else 0
    if max_chunks is not None:
        chunks = min(chunks, int(max_chunks))
    if chunks < 1:
        raise PipelineError(f"{what}: {n_in} frame{'s' if n_in != 1 else ''}{counted}; one chunk of {chunk_frames} latent frames needs at "
                            f"least {vae.frames_for_latents(chunk_frames)} frames")
    used = vae.frames_for_latents(chunks * chunk_frames)
    video = resize_center_crop(video[:, n_in - used:], height, width, sar)
    info = dict(frames_in=n_in, frames_used=used, frames_dropped_from_start=n_in - used, chunks=chunks,
                latent_frames=chunks * chunk_frames, resized_to=[height, width])
    return video.unsqueeze(0), info


def check_max_history_chunks(value, what: str = "max_history_chunks") -> None:
    """PipelineError (one line, naming `what`) unless `value` is None (every chunk) or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise PipelineError(f"{what}={value!r}: an int >= 1 (the most chunks of the video kept as history), "
                            "or None for all")


def probe_video(video: Union[str, Path], what: str = "init video") -> None:
    """PipelineError (one line, naming `what`, e.g. a flag) unless `video` is a file whose header decodes:
    a bad file fails before a model is loaded (its frames are read later, by video_clip)."""
    from ..data.decode import BadVideo, _PyAVBackend

    if not Path(video).is_file():
        raise PipelineError(f"{what} {video}: no such video file")
    try:
        _PyAVBackend().info(str(video))
    except BadVideo as e:
        raise PipelineError(f"{what} {video}: cannot decode video ({e})") from None


def read_image(path: Union[str, Path], what: str = "init image") -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB. PipelineError (one line) for a missing file, a file
    that is not an image, or a truncated/corrupt one."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{what} {p}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise PipelineError(f"{what} {p}: not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PipelineError(f"{what} {p}: corrupt or truncated image ({type(e).__name__}: {first})") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PipelineError(f"{what} {p}: empty image")
    return arr


def image_clip(image, vae, height: int, width: int, chunk_frames: int) -> tuple[torch.Tensor, dict]:
    """A still image (path, or uint8 [H, W, 3] / float [3, H, W] in [-1, 1]) -> (clip [1, 3, n, height,
    width], info): the image repeated to the n = frames_for_latents(cf) pixel frames of one chunk
    (cf x temporal factor for the pixel-shuffle codec; 1 + 4 (cf - 1) for the Wan VAE, whose first
    latent frame is then the causal encoding of the image alone), resized like an init video."""
    if isinstance(image, (str, Path)):
        arr, src = read_image(image), str(image)
        frame = torch.from_numpy(arr.copy())
    else:
        frame, src = _as_pixels(image, "init image"), "<array>"
        if frame.dim() != 3 or 3 not in (frame.shape[0], frame.shape[-1]) or (
                frame.dtype == torch.uint8 and frame.shape[-1] != 3):
            raise PipelineError(f"init image must be [H, W, 3] uint8 or [3, H, W] float; got {list(frame.shape)}")
    n = vae.frames_for_latents(chunk_frames)
    if frame.dtype == torch.uint8:
        frames = frame.unsqueeze(0).expand(n, -1, -1, -1)
    else:
        frame = frame.float()
        frames = (frame.unsqueeze(1) if frame.shape[0] == 3 and frame.shape[-1] != 3
                  else frame.permute(2, 0, 1).unsqueeze(1)).expand(-1, n, -1, -1)
    clip, _ = prepare_init_video(frames, vae, height, width, chunk_frames, max_chunks=1, what="init image")
    h0, w0 = (frame.shape[0], frame.shape[1]) if frame.dtype == torch.uint8 or frame.shape[-1] == 3 \
        else (frame.shape[1], frame.shape[2])
    info = dict(source=src, kind="image", image_size=[int(h0), int(w0)], frames_repeated=n, chunks=1,
                latent_frames=chunk_frames, resized_to=[height, width])
    return clip, info


def video_clip(video, vae, height: int, width: int, chunk_frames: int, fps: float,
               max_chunks: Optional[int] = None, resample_fps: bool = True,
               what: str = "init video") -> tuple[torch.Tensor, dict]:
    """A path (mp4 etc., read as a player shows it: data/decode.py) or frames -> (clip [1, 3, F', height,
    width], info). A bad file: PipelineError, one line naming `what` (e.g. a CLI flag) and the file.

    A file is first resampled in time to `fps` (the model's, config data.fps; by timestamp as in
    training; `resample_fps=False` keeps its own rate). `max_chunks` keeps at most that many
    history chunks (the END of the video); only those frames are converted, so a long clip costs
    no more memory than `max_chunks` chunks."""
    check_max_history_chunks(max_chunks)
    if not isinstance(video, (str, Path)):
        clip, info = prepare_init_video(video, vae, height, width, chunk_frames, max_chunks, what=what)
        info["source"] = "<array>"
        return clip, info
    from ..data.decode import BadVideo, _PyAVBackend
    from ..data.video import available_frames, frame_indices

    path = Path(video)
    if not path.is_file():
        raise PipelineError(f"{what} {video}: no such video file")
    # read as a player shows it, as the training clips are (data/decode.py): display rotation, non-square
    # pixels, variable frame rates by timestamp, an edit list's hidden frames left out
    backend = _PyAVBackend()
    try:
        src = backend.info(str(path))
        n_file, src_fps = src.num_frames, src.fps
        counted = ""
        if resample_fps and (abs(src_fps - fps) > 1e-3 or src.times is not None):
            idx = frame_indices(0, available_frames(n_file, src_fps, fps, src.times), n_file, src_fps, fps, src.times)
            counted = f" at the model's {fps:g} fps ({n_file} in the file, at {src_fps:g} fps)"
        else:
            idx = list(range(n_file))
        n_in = len(idx)
        if max_chunks is not None:  # only the frames the history can use are decoded
            idx = idx[max(n_in - vae.frames_for_latents(int(max_chunks) * chunk_frames), 0):]
        clip_frames = backend.frames(str(path), idx)  # uint8 [F, H, W, 3], upright
    except BadVideo as e:
        raise PipelineError(f"{what} {video}: cannot decode video ({e})") from None
    clip, info = prepare_init_video(clip_frames, vae, height, width, chunk_frames, max_chunks, src.sar,
                                    f"{what} {video}", counted)
    info.update(frames_in=n_in, frames_dropped_from_start=n_in - info["frames_used"], max_chunks=max_chunks,
                source_frames=n_file, source_fps=src_fps, fps=fps if (src_fps and resample_fps) else src_fps)
    info["source"] = str(video)
    return clip, info
