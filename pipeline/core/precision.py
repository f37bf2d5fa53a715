"""Mixed precision: one autocast rule for feature extraction, MIST's encoder fine-tuning and scoring."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: fp32 on the CPU; on CUDA bf16 where the GPU supports it, else fp16 (MIST stage II's
    mixed precision, which the official code runs with apex O1). Other values are returned as given."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` (fp32 / bf16 / fp16 / auto) on ``device``; fp32 is no
    autocast at all.

    Raises:
        ValueError: fp16 off CUDA, or bf16 on a device that is neither CUDA nor the CPU.
    """
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda" or (device.type == "cpu" and precision == "bf16"):
        return torch.autocast(device_type=device.type, dtype=dtype)
    raise ValueError(f"precision {precision} is not supported on {device}: fp16 needs CUDA, bf16 needs CUDA or the CPU")


def grad_scaler(device: torch.device, precision: str) -> Any:
    """A gradient scaler when training in fp16 on CUDA (fp16 gradients underflow without one), else None."""
    if device.type == "cuda" and resolve_precision(device, precision) == "fp16":
        return torch.amp.GradScaler("cuda")
    return None
