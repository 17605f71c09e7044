"""The mixed-precision policy of every training forward and of the frozen numbers it is compared with.

Weights are always stored in fp32 and the optimizer updates them there: a bf16 weight of 1.0 does not move under
an update below its half-ulp (0.004), so at learning rates like 5e-6 most updates would round away. bf16 is used
for compute only, through `torch.autocast`. π_ref's log-probs, precomputed at scoring time, are computed under
the same policy as the policy's forward, so that h = 0 at step 0 (up to bf16 rounding) instead of starting at the
difference between two precisions.

`auto` means bf16 wherever the hardware computes it natively: every GPU we run on, and CPUs with bf16 units
(x86's AVX512-BF16 or AMX, Arm's BF16 extension). On a 2-core Zen 4 the distillation step runs 1.5× faster and
follows the same loss curve (docs/RESULTS.md, "bf16 on the CPU"). A CPU without them would emulate bf16, slower
than fp32, so it stays in fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ray_jobs.names import Precision

# /proc/cpuinfo flags of native bf16 arithmetic: x86 (AVX512-BF16, AMX) and Arm (FEAT_BF16).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively. Read from Linux's flags: torch's own check
    (`mkldnn._is_mkldnn_bf16_supported`) also answers yes for AVX-512 CPUs that only emulate bf16."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool(_BF16_FLAGS & set(value.split()))
    return False


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """The compute context of a forward pass on `device` under `precision`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
