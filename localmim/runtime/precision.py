"""Precision: the autocast dtype for ``amp`` on a device, the one place autocast is entered, and the loss scaler.

bf16 autocast on CUDA where supported, fp16 with a ``GradScaler`` where not (pre-Ampere GPUs such as the paper's
V100s), fp32 on CPU. Training and evaluation both autocast through :func:`autocast`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``auto`` | ``bf16`` | ``fp16`` | ``none``) on ``device``.

    CPU: none (fp32). CUDA ``auto``: bf16 where the GPU supports it, else fp16, which needs loss scaling
    (:class:`Precision`).
    """
    if amp == "none" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class Precision:
    """The autocast dtype and the loss scaler (enabled only for fp16: a pass-through otherwise)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, amp: str, device: torch.device) -> Precision:
        dtype = amp_dtype(amp, device)
        return cls(device, dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))

    def autocast(self):
        return autocast(self.device, self.dtype)
