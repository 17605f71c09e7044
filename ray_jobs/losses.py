"""Preference losses of Fisch et al. (PAPER.md §2), pure torch.

Inputs are whole-response log-probabilities, 1-D tensors ``[B]`` (sums over response tokens):
``pi_*`` under the policy, ``ref_*`` under the frozen reference, so
``h = (pi_a - ref_a) - (pi_b - ref_b)``. Rewards are ``[B]`` for one reward model and ``[B, K]`` for an
ensemble. Per-pair losses return ``[B]``; ensemble reductions return a scalar.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ray_jobs.names import FAMILIES

# The exact hull solve enumerates supports (2^K - 1 of them); past this the enumeration stops being "small".
MAX_HULL_MEMBERS = 12


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def margin(pi_a: torch.Tensor, pi_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor) -> torch.Tensor:
    """h = log π(a)/π_ref(a) − log π(b)/π_ref(b), the implicit-reward margin divided by β."""
    shapes = {t.shape for t in (pi_a, pi_b, ref_a, ref_b)}
    if len(shapes) != 1 or pi_a.dim() != 1:
        raise ValueError(
            "pi_a, pi_b, ref_a, ref_b must be 1-D tensors of one shape [B], got "
            + ", ".join(str(tuple(t.shape)) for t in (pi_a, pi_b, ref_a, ref_b))
        )
    _check_finite(pi_a=pi_a, pi_b=pi_b, ref_a=ref_a, ref_b=ref_b)
    return (pi_a - ref_a) - (pi_b - ref_b)


def dpo(pi_a, pi_b, ref_a, ref_b, beta: float) -> torch.Tensor:
    """−log σ(β h) per pair, response a preferred. logsigmoid keeps it finite at any margin."""
    _check_beta(beta)
    return -F.logsigmoid(beta * margin(pi_a, pi_b, ref_a, ref_b))


def ipo(pi_a, pi_b, ref_a, ref_b, beta: float) -> torch.Tensor:
    """(h − 1/(2β))² per pair, TRL's convention (β plays IPO's τ)."""
    _check_beta(beta)
    return (margin(pi_a, pi_b, ref_a, ref_b) - 1.0 / (2.0 * beta)) ** 2


def _reward_gap(r_a: torch.Tensor, r_b: torch.Tensor, batch: int, ndim: int) -> torch.Tensor:
    if r_a.shape != r_b.shape or r_a.dim() != ndim or r_a.shape[0] != batch:
        want = "[B]" if ndim == 1 else "[B, K]"
        raise ValueError(f"r_a and r_b must both be {want} with B={batch}, got {tuple(r_a.shape)}, {tuple(r_b.shape)}")
    _check_finite(r_a=r_a, r_b=r_b)
    return r_a - r_b


def distill(pi_a, pi_b, ref_a, ref_b, r_a, r_b, beta: float) -> torch.Tensor:
    """d-DPO: (β h − (r(a) − r(b)))² per pair. Label-free: swapping a and b leaves it unchanged."""
    _check_beta(beta)
    h = margin(pi_a, pi_b, ref_a, ref_b)
    return (beta * h - _reward_gap(r_a, r_b, h.shape[0], 1)) ** 2


@dataclass
class GapStats:
    """Sufficient statistics of mean_b (t_b − Σ_k w_k Δr_bk)² over any set of pairs, for every w at once.

    With G = Σ_b Δr_b Δr_bᵀ, c = Σ_b t_b Δr_b and q = Σ_b t_b², the loss of mixture w is (q − 2 wᵀc + wᵀGw)/n.
    Sums add up across micro-batches and workers, so e-DPO's `min` and `hull` can choose their member (or mixture)
    once per optimizer step, on the whole step's pairs, as the objective is defined.
    """

    gram: torch.Tensor  # [K, K]
    lin: torch.Tensor  # [K]
    sq: torch.Tensor  # []
    n: torch.Tensor  # [], number of pairs

    @classmethod
    def from_batch(cls, target: torch.Tensor, gaps: torch.Tensor) -> GapStats:
        t, d = target.detach().double().cpu(), gaps.detach().double().cpu()
        return cls(d.T @ d, d.T @ t, t @ t, torch.tensor(float(t.numel()), dtype=torch.float64))

    def __add__(self, other: GapStats) -> GapStats:
        return GapStats(self.gram + other.gram, self.lin + other.lin, self.sq + other.sq, self.n + other.n)

    def all_reduce(self) -> GapStats:
        """Summed over every process of the default torch.distributed group (unchanged when there is none)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        flat = torch.cat([self.gram.flatten(), self.lin, self.sq.reshape(1), self.n.reshape(1)])
        torch.distributed.all_reduce(flat)
        k = self.lin.numel()
        return GapStats(flat[: k * k].reshape(k, k), flat[k * k : k * k + k], flat[-2], flat[-1])

    def loss(self, w: torch.Tensor) -> float:
        w = w.double()
        return float((self.sq - 2 * w @ self.lin + w @ self.gram @ w) / self.n)

    def member_losses(self) -> torch.Tensor:
        return (self.sq - 2 * self.lin + torch.diagonal(self.gram)) / self.n

    def min_member(self) -> torch.Tensor:
        """The one-hot weights of the member with the least loss."""
        best = int(self.member_losses().argmin())
        return F.one_hot(torch.tensor(best), self.lin.numel()).double()

    def hull_weights(self) -> torch.Tensor:
        """Exact argmin over the simplex of the mixture loss.

        A least-squares problem on the simplex: its minimiser is the affine-constrained optimum on some support
        (face), and on the smallest such support that optimum is unique. So we solve the KKT system of every
        support and keep the best feasible point — exact, and cheap for the handful of members an ensemble has.
        Done in float64 on detached values: the loss treats the optimal w as a constant (Danskin's theorem).
        """
        k = self.lin.numel()
        if k > MAX_HULL_MEMBERS:
            raise ValueError(f"family 'hull' solves exactly over at most {MAX_HULL_MEMBERS} members, got {k}")
        best_w, best_val = None, float("inf")
        for size in range(1, k + 1):
            for support in itertools.combinations(range(k), size):
                idx = list(support)
                kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
                kkt[:size, :size] = 2 * self.gram[idx][:, idx]
                kkt[:size, size] = 1.0
                kkt[size, :size] = 1.0
                rhs = torch.cat([2 * self.lin[idx], torch.ones(1, dtype=torch.float64)])
                sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)[:size]
                if (sol < -1e-10).any():
                    continue
                w = torch.zeros(k, dtype=torch.float64)
                w[idx] = sol.clamp_min(0)
                w = w / w.sum()
                val = self.loss(w)
                if val < best_val - 1e-15:
                    best_w, best_val = w, val
        assert best_w is not None  # every singleton support is feasible
        return best_w

    def selection(self, family: str) -> torch.Tensor:
        """The step's fixed weights over members for a family that chooses (`min`: one-hot, `hull`: mixture)."""
        if family == "min":
            return self.min_member()
        if family == "hull":
            return self.hull_weights()
        raise ValueError(f"family {family!r} does not choose members per step (only min and hull do)")


def hull_weights(target: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """Exact argmin over the simplex of mean_b (target_b − Σ_k w_k gaps_bk)² (see `GapStats.hull_weights`)."""
    return GapStats.from_batch(target, gaps).hull_weights().to(device=gaps.device, dtype=gaps.dtype)


STEP_FAMILIES = frozenset({"min", "hull"})


@dataclass
class FamilyStats:
    """Diagnostics of one e-DPO reduction: each member's batch loss and which member(s) set the loss."""

    member_losses: torch.Tensor  # [K], mean_b (β h − Δr_bk)²
    argmin_counts: torch.Tensor  # [K], how many pairs (example_min) or batches (min) each member was the min
    weights: torch.Tensor | None = field(default=None)  # hull mixture weights [K]


def ensemble_distill(
    pi_a,
    pi_b,
    ref_a,
    ref_b,
    r_a,
    r_b,
    beta: float,
    family: str = "min",
    return_stats: bool = False,
    selection: torch.Tensor | None = None,
):
    """e-DPO: distillation against K reward models (r_* are ``[B, K]``), reduced by ``family``.

    - ``min``: min_k mean_b (β h_b − Δr_bk)², the paper's pessimistic member-min (PAPER.md §2.4).
    - ``example_min``: mean_b min_k (β h_b − Δr_bk)².
    - ``mean``: distillation from the ensemble-mean reward, averaged over the batch.
    - ``hull``: min over mixtures w in the simplex of mean_b (β h_b − Σ_k w_k Δr_bk)², the exact max-min.
    ``selection`` (``min`` and ``hull`` only): the member weights chosen on a larger set of pairs than this batch
    (an optimizer step's, see `GapStats`); the loss is then this batch's mean under those fixed weights.
    Returns a scalar, or ``(scalar, FamilyStats)`` with ``return_stats``.
    """
    _check_beta(beta)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    h = margin(pi_a, pi_b, ref_a, ref_b)
    gaps = _reward_gap(r_a, r_b, h.shape[0], 2)
    if gaps.shape[1] == 0:
        raise ValueError("the ensemble has K = 0 members; e-DPO needs at least one reward model")
    target = beta * h
    per_member = (target.unsqueeze(1) - gaps) ** 2  # [B, K]
    member_losses = per_member.mean(dim=0)
    k = gaps.shape[1]
    weights = None
    if selection is not None:
        if family not in STEP_FAMILIES:
            raise ValueError(f"selection applies to families min and hull, not {family!r}")
        weights = selection.to(device=gaps.device, dtype=gaps.dtype)
        loss = ((target - gaps @ weights) ** 2).mean()
        counts = weights.detach().clone()
    elif family == "min":
        loss, best = member_losses.min(dim=0)
        counts = F.one_hot(best, k).to(per_member.dtype)
    elif family == "example_min":
        per_pair, best = per_member.min(dim=1)
        loss = per_pair.mean()
        counts = F.one_hot(best, k).sum(dim=0).to(per_member.dtype)
    elif family == "mean":
        loss = ((target - gaps.mean(dim=1)) ** 2).mean()
        counts = torch.zeros(k, dtype=per_member.dtype, device=per_member.device)
    else:
        weights = hull_weights(target, gaps)
        loss = ((target - gaps @ weights) ** 2).mean()
        counts = weights.detach().clone()
    if return_stats:
        return loss, FamilyStats(member_losses.detach(), counts.detach(), weights)
    return loss


def forward_kl(pi_s: torch.Tensor, ref_s: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(π_ref‖π) on responses sampled from π_ref: mean(log π_ref − log π).

    Only −log π carries gradient, so this is an NLL term on reference samples: it keeps π's mass wherever
    π_ref has mass, which is what stops DPO's collapse (PAPER.md §2.3e).
    """
    if pi_s.shape != ref_s.shape or pi_s.dim() != 1:
        raise ValueError(f"pi_s and ref_s must be 1-D of one shape, got {tuple(pi_s.shape)}, {tuple(ref_s.shape)}")
    if pi_s.numel() == 0:
        raise ValueError("forward_kl needs at least one reference sample")
    _check_finite(pi_s=pi_s, ref_s=ref_s)
    return (ref_s - pi_s).mean()
