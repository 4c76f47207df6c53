"""Storyboards (prompt switching) and output naming: the torch-free helpers that the pipeline and
sample/sample.py share (the CLI checks its input with them before importing torch).

A storyboard is a list of (chunk index, prompt): the prompt of each segment keyed by the GENERATED
chunk where it starts (0 = the first chunk after any given history). Written as
"0:a red ball rolls in;8:the ball turns blue", a {chunk: prompt} mapping, a list of
{"chunk": c, "prompt": p}, or a JSON/YAML file holding one of those (optionally under a
"storyboard" key). A prompt is a string, or in the Python API a list with one per sample.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = ["PipelineError", "SWITCH_CACHE_MODES", "check_prompts", "check_storyboard", "check_switch_cache", "parse_storyboard", "split_storyboard",
           "resolve_prompts", "storyboard_record", "video_paths"]

# What happens to the cached history at a prompt switch (rollout.Rollout.set_context).
SWITCH_CACHE_MODES = ("keep", "recache")


class PipelineError(ValueError):
    """Bad input to the pipeline (path, checkpoint/config mismatch, init video, storyboard); one-line message."""


def check_storyboard(entries, num_chunks: Optional[int] = None) -> list[tuple[int, Any]]:
    """Validate a storyboard: (chunk index, payload) pairs -> sorted list. Chunk indices count the
    GENERATED chunks (0 = the first chunk after any given history); they must be distinct ints >= 0
    and < num_chunks (when given). Raises ValueError with a one-line message."""
    out = []
    for e in entries:
        if not isinstance(e, (tuple, list)) or len(e) != 2:
            raise ValueError(f"storyboard entry {e!r}: need (chunk_index, prompt)")
        c, payload = e
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"storyboard chunk index {c!r}: need an int >= 0")
        if num_chunks is not None and c >= num_chunks:
            raise ValueError(f"storyboard switches at chunk {int(c)} but only {num_chunks} chunks are "
                             f"generated (indices count generated chunks from 0)")
        out.append((int(c), payload))
    out.sort(key=lambda e: e[0])
    dup = [a for (a, _), (b, _) in zip(out, out[1:]) if a == b]
    if dup:
        raise ValueError(f"storyboard has two entries for chunk {dup[0]}")
    if not out:
        raise ValueError("storyboard is empty")
    return out


def parse_storyboard(spec: Union[str, Path, Sequence, dict]) -> list[tuple[int, Any]]:
    """A storyboard from any of: a list of (chunk, prompt) pairs or {"chunk":, "prompt":} dicts,
    a {chunk: prompt} mapping, the string "0:a red ball;8:a blue ball", or a .json/.yaml/.yml file
    holding a list or mapping as above. Returns sorted (chunk, prompt) pairs (check_storyboard);
    PipelineError (one line) for anything malformed. Chunk indices count generated chunks."""
    src = "storyboard"
    inline = isinstance(spec, str) and re.match(r"\s*[+-]?\d+\s*:", spec)  # "0:...;8:... settings.yaml" is text
    if isinstance(spec, Path) or (isinstance(spec, str) and not inline
                                  and spec.lower().endswith((".json", ".yaml", ".yml"))):
        path = Path(spec)
        src = f"storyboard file {path}"
        if not path.is_file():
            raise PipelineError(f"{src}: no such file")
        try:
            import yaml  # YAML is a superset of JSON

            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"{src}: cannot read it ({type(e).__name__})") from None
        except yaml.YAMLError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise PipelineError(f"{src}: not valid JSON/YAML ({first})") from None
        if isinstance(spec, dict) and "storyboard" in spec:
            spec = spec["storyboard"]
    if isinstance(spec, str):
        entries = []
        for part in [x for x in spec.split(";") if x.strip()]:
            c, sep, text = part.partition(":")
            if not sep:
                raise PipelineError(f"{src} entry {part.strip()!r}: need CHUNK:PROMPT (entries separated by ';')")
            try:
                idx = int(c.strip())
            except ValueError:
                raise PipelineError(f"{src} entry {part.strip()!r}: chunk index {c.strip()!r} is not an int") from None
            entries.append((idx, text.strip()))
    elif isinstance(spec, dict):
        entries = []
        for k, v in spec.items():
            try:
                entries.append((int(k), v))
            except (TypeError, ValueError):
                raise PipelineError(f"{src}: key {k!r} is not a chunk index") from None
    elif isinstance(spec, (list, tuple)):
        entries = []
        for e in spec:
            if isinstance(e, dict):
                if set(e) != {"chunk", "prompt"}:
                    extra = sorted(set(e) - {"chunk", "prompt"}, key=str)
                    why = (f"unknown key {extra[0]!r} (allowed: chunk, prompt)" if extra
                           else f"missing key {sorted({'chunk', 'prompt'} - set(e))[0]!r}")
                    raise PipelineError(f"{src} entry {e!r}: {why}")
                e = (e["chunk"], e["prompt"])
            entries.append(tuple(e) if isinstance(e, (list, tuple)) else e)
    else:
        raise PipelineError(f"{src}: need a list of (chunk, prompt), a mapping or 'CHUNK:PROMPT;...'")
    try:
        board = check_storyboard(entries)
    except ValueError as e:
        raise PipelineError(f"{src}: {e}") from None
    for c, text in board:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or \
                any(not isinstance(t, str) or not t.strip() for t in texts):
            raise PipelineError(f"{src}: the prompt at chunk {c} must be a non-empty string (or a list of them)")
    return board


def split_storyboard(storyboard, context, num_chunks: int) -> tuple[Any, dict[int, Any]]:
    """A checked storyboard of (generated chunk, payload) -> (initial payload, {chunk: payload} of the
    switches). An entry at chunk 0 is the initial payload (then `context` must be None); otherwise
    `context` is. ValueError (one line) for a bad storyboard or a missing / doubled initial one."""
    switches: dict[int, Any] = {}
    if storyboard is not None:
        board = check_storyboard(storyboard, num_chunks)
        if board[0][0] == 0:
            if context is not None:
                raise ValueError("give the initial context as `context` or as a storyboard entry at chunk 0, not both")
            context = board.pop(0)[1]
        switches = dict(board)
    if context is None:
        raise ValueError("no context: pass `context` or a storyboard entry at chunk 0")
    return context, switches


def check_prompts(prompts) -> None:
    """Given prompts: a string or a list of strings (None is resolve_prompts' to judge). PipelineError."""
    if prompts is not None and not isinstance(prompts, str) and not (
            isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)):
        raise PipelineError(f"prompts: a string or a list of strings, got {type(prompts).__name__} {prompts!r:.60}")


def check_switch_cache(switch_cache: str, has_storyboard: bool, name: str = "switch_cache") -> None:
    """The one rule of `switch_cache`: a known mode, and 'recache' only with a storyboard (it acts at a
    prompt switch). PipelineError naming `name` (the API argument or the CLI flag)."""
    if switch_cache not in SWITCH_CACHE_MODES:
        raise PipelineError(f"{name}={switch_cache!r}: choose one of {', '.join(SWITCH_CACHE_MODES)}")
    if switch_cache != "keep" and not has_storyboard:
        raise PipelineError(f"{name}={switch_cache!r} acts at a prompt switch: pass a storyboard (or leave it 'keep')")


def resolve_prompts(prompts: Union[str, Sequence[str], None], storyboard,
                    num_chunks: int) -> tuple[list[str], Optional[list[tuple[int, Any]]]]:
    """The prompts of a rollout and its storyboard (anything parse_storyboard takes, or None) ->
    (prompts, one per sample; the board with list prompts of the batch size, or None).
    `prompts` may be omitted when the storyboard has an entry at chunk 0 (its prompt is the
    initial one). PipelineError (one line) for contradictions and batch-size mismatches."""
    board = parse_storyboard(storyboard) if storyboard is not None else None
    if board is not None:
        try:
            check_storyboard(board, num_chunks)
        except ValueError as e:
            raise PipelineError(str(e)) from None
    if prompts is None:
        if board is None or board[0][0] != 0:
            raise PipelineError("no prompts given (pass prompts, or a storyboard with an entry at chunk 0)")
        first = board[0][1]
        prompts = [first] if isinstance(first, str) else list(first)
    else:
        check_prompts(prompts)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # '' is allowed: no text
        if board is not None and board[0][0] == 0:
            raise PipelineError("the storyboard has an entry at chunk 0 and prompts were given too; give one of them")
    if not prompts:
        raise PipelineError("no prompts given")
    bsz = len(prompts)
    if board is not None:
        board = [(c, p if isinstance(p, str) else list(p)) for c, p in board]
        for c, p in board:
            if isinstance(p, list) and len(p) != bsz:
                raise PipelineError(f"storyboard chunk {c}: {len(p)} prompts for a batch of {bsz}")
    return prompts, board


def storyboard_record(prompts: list[str], board: Optional[list[tuple[int, Any]]]) -> Optional[list[dict]]:
    """What a result records of its storyboard: [{"chunk": g, "prompt": ...}] from chunk 0 on (the
    initial prompts first when the board has no entry at 0); None without a storyboard."""
    if board is None:
        return None
    head = [] if board[0][0] == 0 else [dict(chunk=0, prompt=prompts[0] if len(prompts) == 1 else prompts)]
    return head + [dict(chunk=c, prompt=p) for c, p in board]


def _slug(text: str, n: int = 40) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_").lower()
    return s[:n].rstrip("_") or "prompt"


def video_paths(output: Union[str, Path], prompts: Sequence[str]) -> list[Path]:
    """out.mp4 for one prompt; out_000_<slug>.mp4 ... for several; DIR/000_<slug>.mp4 for a directory
    (an existing one, or a path ending with / or without a suffix)."""
    import os

    output = str(output)
    out = Path(output)
    is_dir = output.endswith(("/", os.sep)) or out.is_dir() or out.suffix == ""
    if is_dir:
        return [out / f"{i:03d}_{_slug(p)}.mp4" for i, p in enumerate(prompts)]
    if out.suffix.lower() != ".mp4":
        raise PipelineError(f"output {output}: must end with .mp4 (or name a directory)")
    if len(prompts) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}_{_slug(p)}.mp4") for i, p in enumerate(prompts)]


