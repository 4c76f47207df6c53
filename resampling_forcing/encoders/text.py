"""Text encoders: umT5 (Wan's, loaded from a LOCAL directory) and the tiny HashTextEncoder.

Both share one interface: ``encode(list[str]) -> [B, text_len, text_dim]``, ``dim``, ``to``.

* :class:`UMT5TextEncoder` -- umT5 encoder + tokenizer from ``transformers``, numerically identical
  to ``WanPipeline._get_t5_prompt_embeds`` (zero-padded past each prompt's real token length).
* :class:`HashTextEncoder` -- deterministic, parameter-free word vectors (stable crc32 hash) plus a
  sinusoidal position code; the empty prompt encodes to all zeros.
"""
from __future__ import annotations

import html
import re
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .common import DeviceLike, EncoderLoadError, Placed, as_device, load_or_raise


def _basic_clean(text: str) -> str:
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return text.strip()


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (if installed), double HTML unescape, collapse spaces."""
    return re.sub(r"\s+", " ", _basic_clean(text)).strip()


def _as_prompts(prompts: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"text encoder: prompts must be strings, got {type(p).__name__}")
    return prompts


_UMT5_LAYOUT = ("expected a diffusers repo root with text_encoder/config.json (+ weights) and "
                "tokenizer/ (tokenizer.json or spiece.model), or pass text_encoder_path= and "
                "tokenizer_path=")


def _has_tokenizer(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in
                              ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def _resolve_umt5_dirs(path, text_encoder_path, tokenizer_path) -> tuple[Path, Path]:
    root = Path(path).expanduser() if path is not None else None
    if root is not None and not root.is_dir():
        raise EncoderLoadError(f"UMT5TextEncoder: directory '{root}' not found; {_UMT5_LAYOUT}")
    te = Path(text_encoder_path).expanduser() if text_encoder_path is not None else None
    tk = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    if te is None:
        if root is None:
            raise EncoderLoadError(f"UMT5TextEncoder: no path given; {_UMT5_LAYOUT}")
        te = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    if tk is None:
        if root is None:
            raise EncoderLoadError(f"UMT5TextEncoder: no tokenizer path given; {_UMT5_LAYOUT}")
        tk = root / "tokenizer" if _has_tokenizer(root / "tokenizer") else root
    if not (te / "config.json").is_file():
        raise EncoderLoadError(f"UMT5TextEncoder: no text encoder config.json in '{te}'; {_UMT5_LAYOUT}")
    if not _has_tokenizer(tk):
        raise EncoderLoadError(f"UMT5TextEncoder: no tokenizer files in '{tk}'; {_UMT5_LAYOUT}")
    return te, tk


def _transformers_dtype_kw(dtype: torch.dtype) -> dict:
    import transformers
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - odd dev version strings
        major, minor = 5, 0
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class UMT5TextEncoder(Placed):
    """umT5 text encoder (``transformers.UMT5EncoderModel`` + ``AutoTokenizer``), Wan style.

    Args:
        path: a diffusers repo root with ``text_encoder/`` and ``tokenizer/`` subfolders (or one
            folder holding both). ``text_encoder_path`` / ``tokenizer_path`` override either.
            Everything loads with ``local_files_only=True``.
        text_len: max tokens (Wan: 512). Longer prompts are truncated.
        device, dtype: where to run (bf16 is what Wan uses on GPU; fp32 default for CPU).

    ``encode(prompts) -> [B, text_len, text_dim]``, identical to diffusers'
    ``WanPipeline._get_t5_prompt_embeds``: clean the prompt, tokenize (pad to ``text_len``,
    truncate, special tokens on), run the encoder with the attention mask, keep the first
    ``seq_len`` positions of each prompt (its real token count incl. EOS) and zero the rest.
    ``text_dim`` = the model's d_model (4096 for umT5-xxl).
    """

    def __init__(self, path: Union[str, Path, None] = None, text_len: int = 512,
                 device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32, *,
                 text_encoder_path: Union[str, Path, None] = None,
                 tokenizer_path: Union[str, Path, None] = None, clean: bool = True):
        from transformers import AutoTokenizer, UMT5EncoderModel

        if text_len < 1:
            raise ValueError(f"UMT5TextEncoder: text_len must be >= 1, got {text_len}")
        te, tk = _resolve_umt5_dirs(path, text_encoder_path, tokenizer_path)
        self.tokenizer = load_or_raise(lambda: AutoTokenizer.from_pretrained(str(tk), local_files_only=True),
                                       f"UMT5TextEncoder: failed to load tokenizer '{tk}'", _UMT5_LAYOUT)
        self.model = load_or_raise(
            lambda: UMT5EncoderModel.from_pretrained(str(te), local_files_only=True, **_transformers_dtype_kw(dtype)),
            f"UMT5TextEncoder: failed to load text encoder '{te}'", _UMT5_LAYOUT)
        self.model.requires_grad_(False).eval()
        self.text_len = int(text_len)
        self.clean = clean
        self.text_dim = int(self.model.config.d_model)
        self.device, self.dtype = as_device(device), dtype
        self.to(self.device, dtype)

    @property
    def dim(self) -> int:
        return self.text_dim

    def _place(self) -> None:
        self.model.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """list of B prompts -> [B, text_len, text_dim] (self.dtype, self.device), zero-padded."""
        prompts = _as_prompts(prompts)
        if self.clean:
            prompts = [prompt_clean(p) for p in prompts]
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        seq_lens = mask.gt(0).sum(dim=1).long()
        out = self.model(ids, mask).last_hidden_state.to(self.dtype)
        keep = torch.arange(out.shape[1], device=out.device)[None, :] < seq_lens[:, None]
        return torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


class HashTextEncoder(Placed):
    """Deterministic, parameter-free text features for the tiny default (no downloads).

    ``encode(prompts) -> [B, text_len, dim]``: each prompt is lowercased and split into words
    (``\\w+``, punctuation dropped); word i (i < text_len) becomes ``w(word) + pos_scale * p(i)``:

    * ``w(word)`` ~ N(0, I_dim), drawn from ``numpy.random.RandomState(crc32(f"{seed}:{word}"))``
      (stable across processes, platforms and versions; NOT Python's salted ``hash()``).
    * ``p(i)``: the sinusoidal position code (sin/cos pairs, base 10000), so word order -- e.g. which
      colour goes with which shape -- is recoverable by attention.
    * with ``ngram = n > 1``, also ``+ w("word_i word_i+1")`` ... up to the n-gram starting at word i
      (where the caption has those words): a little context, as a real text encoder's outputs have.
      The colour token of "green square" then names the object, so a tiny DiT need not bind
      adjacent words itself to compose unseen pairs of objects.

    Positions past the caption's word count are zero; captions longer than ``text_len`` are
    truncated. The empty prompt (or one with no words) encodes to all zeros: the unconditional /
    negative prompt.
    """

    def __init__(self, text_len: int = 16, dim: int = 32, seed: int = 0, pos_scale: float = 1.0,
                 ngram: int = 1, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32):
        if text_len < 1 or dim < 1 or ngram < 1:
            raise ValueError(f"HashTextEncoder: text_len={text_len}, dim={dim}, ngram={ngram} must be >= 1")
        self.text_len, self.text_dim, self.seed, self.ngram = int(text_len), int(dim), int(seed), int(ngram)
        self.pos_scale = float(pos_scale)
        self.device, self.dtype = as_device(device), dtype
        self._vectors: dict[str, torch.Tensor] = {}
        self._pos = self._sinusoid(self.text_len, self.text_dim)

    @property
    def dim(self) -> int:
        return self.text_dim

    @staticmethod
    def _sinusoid(n: int, dim: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange((dim + 1) // 2, dtype=torch.float64)[None, :]
        ang = pos / (10000.0 ** (2 * i / dim))
        pe = torch.zeros(n, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(ang)[:, : pe[:, 0::2].shape[1]]
        pe[:, 1::2] = torch.cos(ang)[:, : pe[:, 1::2].shape[1]]
        return pe.float()

    @staticmethod
    def words(prompt: str) -> list[str]:
        """Lowercased word list used for one prompt."""
        return re.findall(r"\w+", prompt.lower())

    def word_vector(self, word: str) -> torch.Tensor:
        """The fixed [dim] float32 vector of ``word`` (cached)."""
        v = self._vectors.get(word)
        if v is None:
            key = zlib.crc32(f"{self.seed}:{word}".encode("utf-8")) & 0xFFFFFFFF
            v = torch.from_numpy(np.random.RandomState(key).standard_normal(self.text_dim).astype(np.float32))
            self._vectors[word] = v
        return v

    def _token(self, words: list[str], i: int) -> torch.Tensor:
        """[dim] features of word i: its vector plus those of the n-grams (n <= ngram) starting at it."""
        v = self.word_vector(words[i])
        for n in range(2, min(self.ngram, len(words) - i) + 1):
            v = v + self.word_vector(" ".join(words[i:i + n]))
        return v

    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """list of B prompts -> [B, text_len, dim] (self.dtype, self.device)."""
        prompts = _as_prompts(prompts)
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for b, p in enumerate(prompts):
            ws = self.words(p)[: self.text_len]
            if ws:
                out[b, : len(ws)] = torch.stack([self._token(ws, i) for i in range(len(ws))]) \
                    + self.pos_scale * self._pos[: len(ws)]
        return out.to(self.device, self.dtype)

