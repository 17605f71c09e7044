"""Training diagnostics averaged over a logging window.

Besides loss and speed this tracks what the paper is about: β·h (the implicit reward margin) and the change of
log π on chosen and rejected responses relative to π_ref, the likelihood displacement DPO is known for. Rows
without a label have no chosen side, so they are reported as a/b.
"""

from __future__ import annotations

from typing import Any

import torch


class MetricsWindow:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.beta_h_max = float("-inf")
        self.member_losses: torch.Tensor | None = None
        self.argmin_counts: torch.Tensor | None = None
        self.micro = 0
        self.steps = 0
        self.tokens = self.pairs = 0
        self.seconds = 0.0
        self.lr = self.grad_norm = 0.0

    def _mean(self, key: str, values: torch.Tensor) -> None:
        if values.numel():
            self.sums[key] = self.sums.get(key, 0.0) + float(values.float().sum())
            self.counts[key] = self.counts.get(key, 0) + values.numel()

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], labelled: torch.Tensor, tokens: int, pairs: int):
        labelled = labelled.to(stats["disp_a"].device)
        self._mean("loss", loss.reshape(1))
        self._mean("beta_h_mean", stats["beta_h"])
        self.beta_h_max = max(self.beta_h_max, float(stats["beta_h"].max()))
        self._mean("logp_shift_chosen", stats["disp_a"][labelled])
        self._mean("logp_shift_rejected", stats["disp_b"][labelled])
        self._mean("logp_shift_a", stats["disp_a"][~labelled])
        self._mean("logp_shift_b", stats["disp_b"][~labelled])
        if "forward_kl" in stats:
            self._mean("forward_kl", stats["forward_kl"].reshape(1))
        if "member_losses" in stats:
            ml, ac = stats["member_losses"].float().cpu(), stats["argmin_counts"].float().cpu()
            self.member_losses = ml if self.member_losses is None else self.member_losses + ml
            self.argmin_counts = ac if self.argmin_counts is None else self.argmin_counts + ac
        self.micro += 1
        self.tokens += tokens
        self.pairs += pairs

    def add_step(self, grad_norm: float, lr: float, seconds: float) -> None:
        self.steps += 1
        self.grad_norm, self.lr = grad_norm, lr
        self.seconds += seconds

    def flush(self) -> dict[str, Any]:
        """Window means (None where no row contributed) plus the latest lr and grad norm; then start anew."""
        keys = ("loss", "beta_h_mean", "logp_shift_chosen", "logp_shift_rejected", "logp_shift_a", "logp_shift_b")
        out: dict[str, Any] = {k: (self.sums[k] / self.counts[k] if k in self.counts else None) for k in keys}
        out["beta_h_max"] = self.beta_h_max
        if "forward_kl" in self.counts:
            out["forward_kl"] = self.sums["forward_kl"] / self.counts["forward_kl"]
        if self.member_losses is not None:
            out["member_losses"] = (self.member_losses / self.micro).tolist()
            out["member_argmin_counts"] = self.argmin_counts.tolist()
        seconds = max(self.seconds, 1e-9)
        out.update(
            lr=self.lr,
            grad_norm=self.grad_norm,
            tokens_per_s=self.tokens / seconds,
            pairs_per_s=self.pairs / seconds,
        )
        self._reset()
        return out
