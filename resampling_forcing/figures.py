"""PNG outputs: contact sheets of videos (frames over time, one row per video) and matplotlib figures,
written atomically through io.atomic_path."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import atomic_path

from .mp4 import to_uint8_video

__all__ = ["contact_sheet", "save_figure"]


def _write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def contact_sheet(
    videos: Sequence,
    path: str | os.PathLike,
    every: int = 1,
    labels: Sequence[str] | None = None,
    max_columns: int | None = None,
    scale: int | None = None,
    gap: int = 2,
    last: bool = False,
    margin: int | None = None,
    pairs: bool = False,
) -> Path:
    """Save a PNG grid: one row per video, columns = frames ``0, every, 2*every, ...``.

    ``videos``: list of uint8 ``[F,H,W,3]`` (or float videos, see :func:`to_uint8_video`); they may
    differ in length (missing cells are grey) and in size (cells are padded to the largest).
    ``labels``: optional text per row, drawn in a left margin. ``scale``: integer nearest-neighbour
    upscale (default: enough to make cells at least 64 px tall). ``max_columns`` caps the columns.
    ``gap``: white pixels between cells. ``last``: the last frame (of the longest video) is a column
    too. ``margin``: white border around the grid (default ``gap``). ``pairs``: rows come in pairs
    (e.g. truth over continuation): a pair's rows are joined by a 1-px grey line, pairs ``3 * gap`` apart.
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(videos) == 0:
        raise ValueError("contact_sheet: no videos given")
    if every < 1:
        raise ValueError(f"contact_sheet: every must be >= 1, got {every}")
    if max_columns is not None and max_columns < 1:
        raise ValueError(f"contact_sheet: max_columns must be >= 1 (or None for all), got {max_columns}")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"contact_sheet: {len(labels)} labels for {len(videos)} videos")
    vids = [to_uint8_video(v) for v in videos]
    ch = max(v.shape[1] for v in vids)
    cw = max(v.shape[2] for v in vids)
    if scale is None:
        scale = max(1, -(-64 // ch))
    margin = gap if margin is None else margin
    num = max(v.shape[0] for v in vids)
    frames = sorted(set(range(0, num, every)) | ({num - 1} if last else set()))[:max_columns]
    ncols = len(frames)
    cell_h, cell_w = ch * scale, cw * scale
    # space below each row but the last: a pair's 1-px grey joint (True) or a white gap (False)
    seps = [(1, True) if pairs and r % 2 == 0 else (3 * gap if pairs else gap, False) for r in range(len(vids) - 1)]
    row_y = [margin + r * cell_h + sum(n for n, _ in seps[:r]) for r in range(len(vids))]
    label_w = 0
    font = None
    if labels is not None:
        font = ImageFont.load_default()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(int(probe.textlength(str(s), font=font)) for s in labels) + 2 * gap + 4
    sheet_h = row_y[-1] + cell_h + margin
    sheet_w = label_w + 2 * margin + ncols * cell_w + (ncols - 1) * gap
    sheet = np.full((sheet_h, sheet_w, 3), 255, dtype=np.uint8)
    for r, v in enumerate(vids):
        y0 = row_y[r]
        for c, t in enumerate(frames):
            x0 = label_w + margin + c * (cell_w + gap)
            cell = np.full((cell_h, cell_w, 3), 128, dtype=np.uint8)
            if t < v.shape[0]:
                img = v[t].repeat(scale, axis=0).repeat(scale, axis=1)
                cell[: img.shape[0], : img.shape[1]] = img
            sheet[y0 : y0 + cell_h, x0 : x0 + cell_w] = cell
        if r < len(seps) and seps[r][1]:
            sheet[y0 + cell_h, label_w + margin : sheet_w - margin] = 128
    image = Image.fromarray(sheet)
    if labels is not None:
        draw = ImageDraw.Draw(image)
        for r, text in enumerate(labels):
            draw.text((gap + 2, row_y[r] + cell_h // 2 - 5), str(text), fill=(0, 0, 0), font=font)
    return _write_png(Path(path), np.asarray(image))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, close: bool = True, **kwargs) -> Path:
    """``fig.savefig`` atomically (format from the suffix of ``path``); closes the figure by default."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or "png")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt, **kwargs)
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return path
