"""The dtype names of configs and command lines, and their sizes: torch-free, so the CLIs check their
arguments (and estimate memory) before importing torch. models.loading.DTYPES maps them to torch dtypes."""
from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_NAMES = tuple(DTYPE_BYTES)


def dtype_name(dtype) -> str:
    """A torch dtype (or its name) -> "fp32" | "bf16" | "fp16" (ValueError for any other)."""
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).replace("torch.", ""), str(dtype))
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype}: not one of {', '.join(DTYPE_NAMES)}")
    return name


def host_tier_problem(host: str | None, model: str) -> str | None:
    """Why a bounded cache's host tier in dtype `host` makes no sense for a model in `model` (names), or
    None: a larger host dtype holds the same values in more memory."""
    if host is not None and DTYPE_BYTES[host] > DTYPE_BYTES[model]:
        return (f"{host} is larger than the model's {model}: the host tier would hold the same values in more "
                f"memory; use {model} (the default) or smaller")
    if host is not None and host != model and DTYPE_BYTES[host] == DTYPE_BYTES[model]:
        return (f"{host} is as large as the model's {model} but rounds its values (fp16 overflows bf16's range, "
                f"bf16 drops fp16's precision): no memory saved; use {model} (the default)")
    return None
