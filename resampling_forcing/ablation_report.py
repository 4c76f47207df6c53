"""The ablation's evaluation protocols and its report: entries, Holm's adjustment, the markdown table.

Protocols: the inference attention every arm is evaluated under (ablation.py ``--protocols``).
- ``dense``: the whole history, the given chunk included (the paper's setting). A clean given chunk
  in view anchors a rollout: it can copy the objects from it however degraded its own frames are.
- ``sliding``: a sliding window of the training clip's history (its latent chunks - 1; 5 for the CPU
  preset), no sink. Every relative distance the model reads was seen in training and nothing anchors the
  rollout after the window has moved past the given chunk: the next chunk depends on the model's own
  chunks only, so it measures error accumulation (exposure bias) without the anchor.
"""
from __future__ import annotations

from pathlib import Path

from .ablation_eval import METRICS, extrapolation_mean, paired
from .stats import holm, interval, sig

__all__ = ["PROTOCOLS", "protocol_routing", "parse_protocols", "eval_entry", "with_holm", "table"]

PROTOCOLS = {
    "dense": "the whole history, the given chunk included (the paper's inference)",
    "sliding": "a sliding window of the training clip's history (its chunks - 1), no sink: only distances "
               "seen in training and no clean anchor once the window has left the given chunk",
}


def protocol_routing(name: str, cfg) -> tuple | None:
    """RoutingSpec arguments of protocol `name` for the config `cfg` (None: dense attention)."""
    from .options import training_horizon

    if name == "dense":
        return None
    if name == "sliding":
        return ("window", None, 0, training_horizon(cfg))
    raise ValueError(f"unknown protocol {name!r}")


def parse_protocols(text: str) -> list[str]:
    """'dense,sliding' -> ['dense', 'sliding']; ValueError (one line) unless every name is known, none
    repeats and dense is among them (the reference of the routing section and of report['arms'])."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROTOCOLS]
    if bad or not names:
        raise ValueError(f"--protocols {text!r}: choose from {', '.join(PROTOCOLS)} (comma list)")
    if len(set(names)) < len(names):
        raise ValueError(f"--protocols {text!r} names a protocol twice")
    if "dense" not in names:
        raise ValueError(f"--protocols {text!r}: dense is required (the report's reference); e.g. dense,sliding")
    return ["dense"] + [p for p in names if p != "dense"]


def eval_entry(result: dict, ref: dict | None = None, ref_key: str = "vs_tf") -> dict:
    """A report entry of one evaluation (`_evaluate`'s {arrays, summary, seconds}): per-segment summary,
    extrapolation means with intervals and, against `ref` (same clips), the paired differences."""
    d = dict(summary=result["summary"], eval_seconds=result["seconds"],
             extrapolation={m: interval(extrapolation_mean(result["arrays"][m])) for m in METRICS})
    if ref is not None:
        d[ref_key] = {m: paired(result["arrays"][m], ref["arrays"][m]) for m in METRICS}
    return d


def with_holm(entries: dict, key: str) -> dict:
    """Adds p_holm to every entry's `key` (vs_tf, vs_dense) [metric]: Holm's adjustment of one metric's
    p-values over the entries that have one (the family a reader scans); both p's then rounded to 3
    significant figures."""
    compared = {n: e[key] for n, e in entries.items() if key in e}
    for m in METRICS:
        adjusted = holm({n: v[m]["p"] for n, v in compared.items()})
        for n, v in compared.items():
            v[m]["p"], v[m]["p_holm"] = sig(v[m]["p"]), sig(adjusted[n])
    return entries


_COLS = ("psnr", "center_error", "object_fidelity", "color_acc", "motion_score", "collapse")


def _cell(s) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['ci95']:.3f}"


def _diff(v) -> str:
    p = "" if v.get("p_holm") is None else f" (p_Holm {v['p_holm']:.2g})"
    return "n/a" if v["mean"] is None else f"{v['mean']:+.3f} ± {v['ci95']:.3f}{p}"


def _arm_table(entries: list[tuple[str, dict]], arms: dict, title: str) -> list[str]:
    rows = [f"| {title} | gap ratio | " + " | ".join(_COLS) + " |", "|---" * (len(_COLS) + 2) + "|"]
    for name, a in entries:
        gap = a.get("gap")
        g = "" if not gap or gap.get("ratio") is None else f"{gap['ratio']:.3g}"
        rows.append(f"| {name} | {g} | " + " | ".join(_cell(a["extrapolation"][c]) for c in _COLS) + " |")
    diffs = [(n, a["vs_tf"]) for n, a in arms.items() if "vs_tf" in a]
    if diffs:  # paired against tf, with Holm-adjusted p (over the arms, per metric)
        rows += ["", f"| {title} - tf (paired) | " + " | ".join(_COLS) + " |", "|---" * (len(_COLS) + 1) + "|"]
        rows += [f"| {n} | " + " | ".join(_diff(v[c]) for c in _COLS) + " |" for n, v in diffs]
    return rows


def table(report: dict) -> str:
    """Markdown: extrapolation means (95% interval) per arm under dense attention, then the routing rows,
    then each further protocol's arms."""
    routed = [(f"{report['routing_arm']} {k}", v) for k, v in report["routing"].items()]
    rows = _arm_table(list(report["arms"].items()) + routed, report["arms"], "arm")
    for name, p in report.get("protocols", {}).items():
        rows += ["", f"{name} attention (routing {p['routing']}):", ""]
        rows += _arm_table(list(p["arms"].items()), p["arms"], f"arm, {name}")
    return "\n".join(rows)
