"""PAPER.md §3's theory claims on the tabular toy: one prompt, a softmax policy over a handful of responses.

With a tabular policy, log π(y) is exactly log_softmax(θ)[y], so the losses in ray_jobs.losses act on the true
sequence log-probabilities and the claims can be checked to tight tolerances.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ray_jobs import losses

F64 = torch.float64

ALL_PAIRS = list(itertools.combinations(range(5), 2))  # full-support ρ over Y × Y
PI_REF_T6 = torch.tensor([0.30, 0.45, 0.009, 0.001, 0.24], dtype=F64)


def dirichlet_ref(seed: int = 0, k: int = 5) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).dirichlet(np.ones(k)), dtype=F64)


def pair_logps(theta: torch.Tensor, log_ref: torch.Tensor, pairs):
    logp = torch.log_softmax(theta, dim=0)
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    return logp[a], logp[b], log_ref[a], log_ref[b]


def exact_forward_kl(theta: torch.Tensor, pi_ref: torch.Tensor) -> torch.Tensor:
    """KL(π_ref‖π_θ) in closed form; `losses.forward_kl` is its Monte-Carlo estimate (checked below)."""
    return (pi_ref * (pi_ref.log() - torch.log_softmax(theta, dim=0))).sum()


def minimise(objective, theta0: torch.Tensor, iters: int = 20) -> torch.Tensor:
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    for _ in range(iters):
        opt.step(closure)
    return theta.detach()


def rlhf_optimum(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """π_r = π_ref · exp(r/β) / Z, the KL-regularised RLHF optimum."""
    return torch.softmax(pi_ref.log() + reward / beta, dim=0)


# --- T1 / T2: DPO's infimum is 0, reached only as margins diverge, including by policies that drop y_w ---


@pytest.mark.parametrize(("beta", "t", "loss", "p_win"), [(1.0, 10, 4.5e-5, 4.5e-5), (1.0, 50, 1.9e-22, 1.9e-22)])
def test_t2_degenerate_dpo_minimiser_drops_preferred_responses(beta, t, loss, p_win):
    # Uniform π_ref; pairs (0 ≻ 1), (2 ≻ 3); response 4 never appears in D.
    # θ_w = −t, θ_l = −2t, θ_unseen = 0: the mass leaves every response in the data (PAPER.md §3.1 T2).
    log_ref = torch.full((5,), -math.log(5), dtype=F64)
    theta = torch.tensor([-t, -2 * t, -t, -2 * t, 0.0], dtype=F64)
    value = losses.dpo(*pair_logps(theta, log_ref, [(0, 1), (2, 3)]), beta).mean()
    probs = torch.softmax(theta, dim=0)
    assert value.item() == pytest.approx(loss, rel=0.02)
    assert probs[0].item() == pytest.approx(p_win, rel=0.02)
    assert probs[4].item() > 0.9999


def test_t2_holds_for_small_beta():
    log_ref = torch.full((5,), -math.log(5), dtype=F64)
    theta = torch.tensor([-50.0, -100.0, -50.0, -100.0, 0.0], dtype=F64)
    assert losses.dpo(*pair_logps(theta, log_ref, [(0, 1), (2, 3)]), 0.1).mean().item() == pytest.approx(
        6.7e-3, rel=0.01
    )


def test_t1_dpo_loss_goes_to_zero_only_as_margins_diverge():
    log_ref = dirichlet_ref().log()
    pairs = [(0, 1), (2, 3)]
    theta = log_ref.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.5)
    history = []
    for step in range(1, 601):
        opt.zero_grad()
        value = losses.dpo(*pair_logps(theta, log_ref, pairs), 0.5).mean()
        value.backward()
        opt.step()
        if step in (50, 200, 600):
            pa, pb, ra, rb = pair_logps(theta.detach(), log_ref, pairs)
            history.append((value.item(), (0.5 * losses.margin(pa, pb, ra, rb)).min().item()))
    (l1, m1), (l2, m2), (l3, m3) = history
    assert l1 > l2 > l3 > 0  # never attained
    assert m3 > m2 + 0.5 > m1 + 1.0  # the margins keep growing: no finite minimiser
    # A mean DPO loss L over n pairs forces every margin above −log(exp(nL) − 1) ≈ log(1/(nL)).
    assert m3 >= -math.log(math.expm1(len(pairs) * l3)) - 1e-9


# --- T4: distillation with full-support ρ recovers the RLHF optimum exactly ---


def test_t4_distill_recovers_rlhf_optimum():
    pi_ref = dirichlet_ref()
    reward = torch.tensor(np.random.default_rng(1).normal(size=5), dtype=F64)
    beta = 0.5
    a = torch.tensor([p[0] for p in ALL_PAIRS])
    b = torch.tensor([p[1] for p in ALL_PAIRS])

    def objective(theta):
        return losses.distill(*pair_logps(theta, pi_ref.log(), ALL_PAIRS), reward[a], reward[b], beta).mean()

    theta = minimise(objective, torch.zeros(5, dtype=F64))
    policy = torch.softmax(theta, dim=0)
    torch.testing.assert_close(policy, rlhf_optimum(pi_ref, reward, beta), atol=1e-5, rtol=0)
    # Implicit margins equal the reward model's: finite, unlike DPO's.
    pa, pb, ra, rb = pair_logps(theta, pi_ref.log(), ALL_PAIRS)
    torch.testing.assert_close(beta * losses.margin(pa, pb, ra, rb), reward[a] - reward[b], atol=1e-5, rtol=0)


# --- T6: p-DPO (DPO + α·KL(π_ref‖π)) has a finite minimiser that keeps y_w; margins shrink as α grows ---


def test_forward_kl_estimates_the_exact_kl():
    pi_ref = PI_REF_T6
    theta = torch.tensor([0.3, -0.2, 1.0, 0.5, -1.0], dtype=F64)
    samples = torch.multinomial(pi_ref, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = losses.forward_kl(torch.log_softmax(theta, 0)[samples], pi_ref.log()[samples])
    assert estimate.item() == pytest.approx(exact_forward_kl(theta, pi_ref).item(), abs=0.01)


def test_t6_pdpo_minimiser_is_finite_and_margins_shrink_with_alpha():
    pi_ref, beta, pairs = PI_REF_T6, 0.5, [(0, 1), (3, 2)]
    pa, pb = torch.tensor([0, 3]), torch.tensor([1, 2])

    def solve(alpha):
        def objective(theta):
            dpo = losses.dpo(*pair_logps(theta, pi_ref.log(), pairs), beta).mean()
            return dpo + alpha * exact_forward_kl(theta, pi_ref)

        theta = minimise(objective, pi_ref.log())
        grad = torch.func.grad(objective)(theta)
        logp = torch.log_softmax(theta, 0)
        margins = beta * ((logp[pa] - pi_ref.log()[pa]) - (logp[pb] - pi_ref.log()[pb]))
        return grad.abs().max().item(), torch.softmax(theta, 0), margins

    results = {alpha: solve(alpha) for alpha in (0.01, 0.1, 1.0)}
    for alpha, (grad, policy, margins) in results.items():
        assert torch.isfinite(margins).all()
        assert grad < 1e-8, f"alpha={alpha}: no stationary point reached"  # a true, finite minimiser
        assert (policy[pa] > 1e-3).all(), f"alpha={alpha}: a preferred response lost its mass"
        assert (policy > 0).all()
    m = [results[a][2] for a in (0.01, 0.1, 1.0)]
    assert (m[0] > m[1]).all() and (m[1] > m[2]).all()

    # Without the KL term the same optimiser keeps pushing margins up: DPO has no minimiser here.
    theta = pi_ref.log().clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.5)
    for _ in range(500):
        opt.zero_grad()
        losses.dpo(*pair_logps(theta, pi_ref.log(), pairs), beta).mean().backward()
        opt.step()
    logp = torch.log_softmax(theta.detach(), 0)
    dpo_margins = beta * ((logp[pa] - pi_ref.log()[pa]) - (logp[pb] - pi_ref.log()[pb]))
    assert (dpo_margins > m[1] + 1.0).all()


# --- T7: pessimism over a family selects the reward whose optimum moves least from π_ref (forward KL) ---


def _kl_to_optimum(pi_ref, reward, beta):
    return (pi_ref * (pi_ref.log() - rlhf_optimum(pi_ref, reward, beta).log())).sum()


def _maxmin_weight(pi_ref, r1, r2, beta) -> float:
    # KL(π_ref‖π_{r_w}) is convex in w (log-partition is convex, the rest linear): ternary search is exact.
    lo, hi = 0.0, 1.0
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if _kl_to_optimum(pi_ref, m1 * r1 + (1 - m1) * r2, beta) < _kl_to_optimum(
            pi_ref, m2 * r1 + (1 - m2) * r2, beta
        ):
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


def _pessimistic_policy(pi_ref, rewards, beta, family, alpha):
    a = torch.tensor([p[0] for p in ALL_PAIRS])
    b = torch.tensor([p[1] for p in ALL_PAIRS])

    def objective(theta):
        fit = losses.ensemble_distill(*pair_logps(theta, pi_ref.log(), ALL_PAIRS), rewards[a], rewards[b], beta, family)
        return fit + alpha * exact_forward_kl(theta, pi_ref)

    return torch.softmax(minimise(objective, pi_ref.log(), iters=40), 0)


def test_t7_hull_reaches_maxmin_policy_and_min_picks_closest_member():
    pi_ref, beta = dirichlet_ref(), 0.5
    rng = np.random.default_rng(3)
    r1, r2 = torch.tensor(rng.normal(size=5), dtype=F64), torch.tensor(rng.normal(size=5), dtype=F64)
    rewards = torch.stack([r1, r2], dim=1)  # [|Y|, K]
    w_star = _maxmin_weight(pi_ref, r1, r2, beta)
    assert 0.05 < w_star < 0.95, "the toy must have an interior max-min mixture to be a real test"
    maxmin = rlhf_optimum(pi_ref, w_star * r1 + (1 - w_star) * r2, beta)

    hull = _pessimistic_policy(pi_ref, rewards, beta, "hull", alpha=0.01)
    torch.testing.assert_close(hull, maxmin, atol=2e-3, rtol=0)
    # ...and it is not either member's optimum: the mixture matters.
    for r in (r1, r2):
        assert (hull - rlhf_optimum(pi_ref, r, beta)).abs().max() > 1e-2

    kls = [_kl_to_optimum(pi_ref, r, beta).item() for r in (r1, r2)]
    closest = rlhf_optimum(pi_ref, (r1, r2)[int(np.argmin(kls))], beta)
    member_min = _pessimistic_policy(pi_ref, rewards, beta, "min", alpha=0.01)
    torch.testing.assert_close(member_min, closest, atol=1e-2, rtol=0)
