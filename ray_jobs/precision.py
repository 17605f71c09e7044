"""The mixed-precision policy of every training forward and of the frozen numbers it is compared with.

Weights are always stored in fp32 and the optimizer updates them there: a bf16 weight of 1.0 does not move under
an update below its half-ulp (0.004), so at learning rates like 5e-6 most updates would round away. bf16 is used
for compute only, through `torch.autocast`. π_ref's log-probs, precomputed at scoring time, are computed under
the same policy as the policy's forward, so that h = 0 at step 0 (up to bf16 rounding) instead of starting at the
difference between two precisions.
"""

from __future__ import annotations

import torch

from ray_jobs.names import Precision


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """The compute context of a forward pass on `device` under `precision`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
