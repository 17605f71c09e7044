"""The distillation stage's per-batch objective: sequence log-probs in, the spec's loss and its diagnostics out.

Kept apart from the training loop so the loss selection (which pairs, which rewards, which reduction) can be read
and tested without a model. The maths lives in `ray_jobs.losses`; this only routes tensors to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_jobs import losses
from ray_jobs.names import LABELLED_LOSSES
from ray_jobs.spec import DistillSpec


@dataclass(frozen=True)
class Objective:
    loss: str
    beta: float
    alpha: float = 0.0
    family: str = "min"
    member: int | None = None

    @classmethod
    def from_spec(cls, spec: DistillSpec) -> Objective:
        return cls(loss=spec.loss, beta=spec.beta, alpha=spec.alpha, family=spec.family, member=spec.member)

    @property
    def labelled(self) -> bool:
        """dpo/ipo/p-dpo learn from labels, so they see only labelled pairs, oriented a = chosen."""
        return self.loss in LABELLED_LOSSES

    @property
    def needs_ref_samples(self) -> bool:
        return self.alpha > 0

    @property
    def chooses_per_step(self) -> bool:
        """e-DPO's `min` and `hull` pick their member (mixture) once per optimizer step, on all the step's pairs."""
        return self.loss == "e-dpo" and self.family in losses.STEP_FAMILIES

    def gap_stats(
        self, pi_a: torch.Tensor, pi_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor, r_a, r_b
    ) -> losses.GapStats:
        """This batch's share of the step's member-choice statistics (`losses.GapStats`)."""
        target = self.beta * losses.margin(pi_a, pi_b, ref_a, ref_b)
        return losses.GapStats.from_batch(target, r_a - r_b)

    def __call__(
        self,
        pi_a: torch.Tensor,
        pi_b: torch.Tensor,
        ref_a: torch.Tensor,
        ref_b: torch.Tensor,
        r_a: torch.Tensor | None = None,
        r_b: torch.Tensor | None = None,
        pi_s: torch.Tensor | None = None,
        ref_s: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached diagnostics; r_* are ``[B, K]`` ensemble rewards, *_s reference samples.

        ``selection``: the step's member weights when `chooses_per_step` (else None).
        """
        stats: dict[str, torch.Tensor] = {}
        if self.loss in ("dpo", "p-dpo"):
            loss = losses.dpo(pi_a, pi_b, ref_a, ref_b, self.beta).mean()
        elif self.loss == "ipo":
            loss = losses.ipo(pi_a, pi_b, ref_a, ref_b, self.beta).mean()
        elif self.loss == "distill":
            ra, rb = self._single_reward(r_a), self._single_reward(r_b)
            loss = losses.distill(pi_a, pi_b, ref_a, ref_b, ra, rb, self.beta).mean()
        elif self.loss == "e-dpo":
            loss, fam = losses.ensemble_distill(
                pi_a, pi_b, ref_a, ref_b, r_a, r_b, self.beta, self.family, return_stats=True, selection=selection
            )
            stats["member_losses"] = fam.member_losses
            stats["argmin_counts"] = fam.argmin_counts
        else:
            raise ValueError(f"distill.loss: unknown loss {self.loss!r}")
        stats["preference_loss"] = loss.detach()
        if self.alpha > 0:
            if pi_s is None or ref_s is None:
                raise ValueError("distill.alpha > 0 needs reference samples (score/ref_samples.parquet)")
            kl = losses.forward_kl(pi_s, ref_s)
            loss = loss + self.alpha * kl
            stats["forward_kl"] = kl.detach()
        h = losses.margin(pi_a, pi_b, ref_a, ref_b).detach()
        stats["beta_h"] = self.beta * h
        stats["disp_a"] = (pi_a - ref_a).detach()
        stats["disp_b"] = (pi_b - ref_b).detach()
        return loss, stats

    def _single_reward(self, r: torch.Tensor | None) -> torch.Tensor:
        if r is None or r.dim() != 2 or r.shape[1] == 0:
            raise ValueError("distill.loss distill needs reward columns rewards_a/rewards_b with K >= 1 members")
        if self.member is None:
            return r.mean(dim=1)
        if self.member >= r.shape[1]:
            raise ValueError(f"distill.member {self.member} is not below the ensemble size {r.shape[1]} in pairs")
        return r[:, self.member]
