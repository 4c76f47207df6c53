"""The layout of an ablation work folder OUT, in one place (torch-free): ablation.py and ablation_memory.py
write it; ablation_seeds.py and bench/pixel_drift.py read it.

    OUT/report.json             the report (REPORT_FILE)
    OUT/arms/<arm>/             each arm's training run (arm_dir)
    OUT/eval/<stem>.npz         cached evaluations (eval_path, eval_file)
    OUT/sheets/<stem>.png       contact sheets (sheet_path)
"""
from __future__ import annotations

from pathlib import Path

REPORT_FILE = "report.json"


def arm_dir(out, name: str) -> Path:
    """The training run folder of arm `name`."""
    return Path(out) / "arms" / name


def eval_file(out, stem: str, suffix: str = ".npz") -> Path:
    return Path(out) / "eval" / f"{stem}{suffix}"


def sheets_dir(out) -> Path:
    return Path(out) / "sheets"


def sheet_path(out, stem: str) -> Path:
    return sheets_dir(out) / f"{stem}.png"


def file_stem(name: str) -> str:
    """A name such as '<arm> <routing>' or 'a+b' as a file name."""
    return name.replace(" ", "_").replace("+", "and")


def eval_path(out, name: str, split: str = "eval", protocol: str = "dense"):
    """Where ablation.py caches the evaluation of `name` (an arm, 'warmup' or '<arm> <routing>') on the
    held-out set `split` under `protocol`: OUT/eval/[<split>_]<name>[_<protocol>].npz (ablation_seeds
    reads it back)."""
    full = name if protocol == "dense" else f"{name} {protocol}"
    return eval_file(out, ("" if split == "eval" else f"{split}_") + file_stem(full))
