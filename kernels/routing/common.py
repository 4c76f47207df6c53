"""What every Triton kernel wrapper checks beyond the library's input checks (attention.selection /
attention.routed): the dtypes the kernels compile for, and a device they can run on."""
from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted(kernel) -> bool:
    """True when `kernel` (a @triton.jit function) was defined under TRITON_INTERPRET=1: it runs on CPU."""
    return type(kernel).__name__ == "InterpretedFunction"


def on_device(t: torch.Tensor):
    """Context of a launch for tensors on `t`'s device: Triton launches on the CURRENT CUDA device, not the
    tensors', so a tensor on cuda:1 while cuda:0 is current (a process of a launcher, --device cuda:1) needs it."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_runnable(what: str, kernel, fix: str, *tensors: torch.Tensor) -> None:
    """fp16/bf16/fp32 tensors, on CUDA unless `kernel` is interpreted; one-line errors ending in `fix`."""
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{what}: inputs must be fp16, bf16 or fp32, got {t.dtype}")
    if tensors and tensors[0].device.type != "cuda" and not interpreted(kernel):
        raise RuntimeError(f"{what}: Triton needs CUDA tensors (got {tensors[0].device}) or TRITON_INTERPRET=1 set "
                           f"before import; {fix}")
