"""What every encoder shares: the load error, device placement (``to``), one-line error causes."""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar, Union

import torch

DeviceLike = Union[str, torch.device, None]
T = TypeVar("T")


class EncoderLoadError(ValueError):
    """A local encoder directory is missing or does not have the expected layout (one-line message)."""


def as_device(device: DeviceLike) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_or_raise(load: Callable[[], T], failed: str, layout: str) -> T:
    """``load()``; any failure becomes one EncoderLoadError line ``"{failed} ({cause}); {layout}"``."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - re-raised as one line, cause kept
        raise EncoderLoadError(f"{failed} ({first_line(e)}); {layout}") from e


class Placed:
    """``device`` / ``dtype`` attributes and an in-place ``to`` (VAEs and text encoders alike).

    Subclasses that own tensors or modules move them in :meth:`_place`, reading ``self.device`` /
    ``self.dtype``; parameter-free ones only record the target (inputs are moved when used).
    """

    device: torch.device
    dtype: torch.dtype

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> Any:
        """Move (in place) to ``device`` and/or ``dtype``; returns self."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self._place()
        return self

    def _place(self) -> None:
        """Move owned weights to ``self.device`` / ``self.dtype`` (nothing to move by default)."""
