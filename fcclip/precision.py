"""Reduced precision only where the hardware has it.

Under ``torch.autocast`` a CPU without native bfloat16 (or float16) instructions emulates them, and the model runs
several times *slower* than in float32 (about ten times for FC-CLIP's ConvNeXt-L on an AVX2-only CPU). So a
requested autocast dtype the device cannot run natively is not used: :func:`resolve_autocast_dtype` warns once per
process and dtype, and returns None (float32). The predictor applies it; ``--bf16`` on the command line goes through
the predictor, so a job started with it on a mixed cluster runs everywhere, at full speed where the hardware allows.

Native support on a CPU is read from the instruction-set flags Linux reports in /proc/cpuinfo:

- bfloat16: ``avx512_bf16`` (AVX-512 BF16, e.g. Cooper Lake, Zen 4) or ``amx_bf16`` (AMX, Sapphire Rapids);
- float16: ``avx512_fp16`` (Sapphire Rapids) or ``amx_fp16`` (Granite Rapids).

Where the flags cannot be read (not Linux), the CPU counts as lacking them. On CUDA, bfloat16 needs native support
(compute capability 8.0 or newer: A100, H100, L4, RTX 30xx and later): ``torch.cuda.is_bf16_supported()`` also
counts emulation by default, under which V100 and T4 would accept bf16 and run it slowly; float16 is always native.

Some parts of the model stay in float32 under autocast, as in the reference: the pixel decoder with its deformable
attention (sampling positions in bf16 lose their fraction beyond 128 px), and the class logits with the ensemble.
They run inside :func:`float32_region`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

__all__ = [
    "NATIVE_CPU_FLAGS", "cpu_flags", "cpu_has_native", "cuda_has_native_bf16", "float32_region",
    "resolve_autocast_dtype", "use_tf32",
]

NATIVE_CPU_FLAGS: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
_warned: set[tuple[str, torch.dtype]] = set()


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's instruction-set flags: the first ``flags`` line of ``cpuinfo`` (default: /proc/cpuinfo's text).

    Returns an empty set where there is no such line or the file cannot be read.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native(dtype: torch.dtype, flags: Iterable[str] | None = None) -> bool:
    """Whether a CPU with these flags (default: this machine's) computes ``dtype`` natively.

    float32 and float64 are always native; bfloat16 and float16 need one of :data:`NATIVE_CPU_FLAGS`.
    """
    if dtype in (torch.float32, torch.float64):
        return True
    needed = NATIVE_CPU_FLAGS.get(dtype)
    if needed is None:
        return False
    have = cpu_flags() if flags is None else frozenset(flags)
    return any(flag in have for flag in needed)


def cuda_has_native_bf16(device: torch.device | str | int | None = None) -> bool:
    """Whether the CUDA device computes bfloat16 natively (compute capability 8.0 or newer); emulation does not
    count."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def float32_region(device_type: str):
    """A context in which autocast is off for ``device_type``: what runs inside computes in its inputs' dtype (the
    caller casts them to float32). Inside ``torch.compile`` too."""
    return torch.autocast(device_type, enabled=False)


def use_tf32(device: torch.device | str) -> bool:
    """On a CUDA device, let float32 matrix products and convolutions run on TF32 tensor cores (A100 and newer:
    several times faster; 10 bits of mantissa in the products, float32 accumulation), as the reference's training
    does by PyTorch's defaults of its time. Process-wide (a torch setting): called where a process puts the model on
    its device (the label actor, a training worker, ``fcclip predict`` / ``eval``), not by the library, so a test
    that compares with a fixture keeps strict float32. Returns whether it was turned on (not on a CPU)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def resolve_autocast_dtype(
    dtype: torch.dtype | None, device: torch.device | str, flags: Iterable[str] | None = None
) -> torch.dtype | None:
    """The autocast dtype to use on ``device``: ``dtype`` where the hardware runs it natively, else None (float32).

    Warns once per process, device type and dtype when it drops ``dtype``.

    Args:
        dtype: the requested autocast dtype (None: float32, returned as is).
        device: where the model runs.
        flags: the CPU's flags, for a CPU device (default: this machine's, from /proc/cpuinfo).
    """
    if dtype is None or dtype == torch.float32:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        native = cpu_has_native(dtype, flags)
        why = f"this CPU has none of the {dtype} instruction sets ({', '.join(NATIVE_CPU_FLAGS.get(dtype, ()))})"
    elif device.type == "cuda":
        native = dtype != torch.bfloat16 or cuda_has_native_bf16(device)
        why = "this GPU has no native bfloat16 (compute capability below 8.0)"
    else:
        return dtype
    if native:
        return dtype
    key = (device.type, dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"autocast to {dtype} requested, but {why}: emulated, it would run several times slower than float32, "
            "so the model runs in float32",
            RuntimeWarning,
            stacklevel=3,
        )
    return None
