"""Where and how a model runs, shared by encoders, generators and training: device, dtype and
quantization names, and their resolution (torch is imported only then, so configs can name them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pixelray.errors import PixelrayError

if TYPE_CHECKING:
    import torch

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "fp32", "fp16", "bf16"]
QuantizationName = Literal["4bit", "8bit"]  # bitsandbytes, CUDA only


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit device that is absent is an error."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PixelrayError(f"device {device!r} was asked for but CUDA is not available on this machine",
                            code="no_gpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PixelrayError(f"device {device!r} was asked for but Apple MPS is not available", code="no_gpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 everywhere but CUDA, where it is bf16 when supported and fp16 otherwise."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(dtypes)}")
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is not supported on CPU; use fp32 or bf16")
    return dtypes[dtype]
