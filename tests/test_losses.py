"""The losses against closed forms, autograd, their symmetries and their error contract (issue: Foundation)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ray_jobs import losses

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(b: int = 6, k: int = 3, seed: int = 0, dtype=torch.float64, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    t = {name: torch.randn(b, generator=g, dtype=dtype) * 3 for name in ("pi_a", "pi_b", "ref_a", "ref_b")}
    t["r_a"] = torch.randn(b, k, generator=g, dtype=dtype)
    t["r_b"] = torch.randn(b, k, generator=g, dtype=dtype)
    return {name: v.to(device) for name, v in t.items()}


def test_hand_computed_values():
    # h = (-1 - -2) - (-3 - -1) = 1 - (-2) = 3
    pi_a, pi_b = torch.tensor([-1.0]), torch.tensor([-3.0])
    ref_a, ref_b = torch.tensor([-2.0]), torch.tensor([-1.0])
    beta = 0.5
    assert losses.dpo(pi_a, pi_b, ref_a, ref_b, beta).item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert losses.ipo(pi_a, pi_b, ref_a, ref_b, beta).item() == pytest.approx((3 - 1.0) ** 2)
    r_a, r_b = torch.tensor([2.0]), torch.tensor([0.25])
    assert losses.distill(pi_a, pi_b, ref_a, ref_b, r_a, r_b, beta).item() == pytest.approx((1.5 - 1.75) ** 2)
    assert losses.forward_kl(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_random_inputs_match_formulas(device):
    t = _batch(b=32, k=4, seed=1, dtype=torch.float32, device=device)
    beta = 0.3
    h = (t["pi_a"] - t["ref_a"]) - (t["pi_b"] - t["ref_b"])
    dr = t["r_a"] - t["r_b"]
    base = (t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"])

    torch.testing.assert_close(losses.dpo(*base, beta), torch.log1p(torch.exp(-beta * h)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses.ipo(*base, beta), (h - 1 / (2 * beta)) ** 2, atol=1e-6, rtol=1e-6)
    per = (beta * h[:, None] - dr) ** 2
    expected = {
        "min": per.mean(0).min(),
        "example_min": per.min(1).values.mean(),
        "mean": ((beta * h - dr.mean(1)) ** 2).mean(),
    }
    for family, want in expected.items():
        got = losses.ensemble_distill(*base, t["r_a"], t["r_b"], beta, family)
        assert got.dim() == 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    single = losses.distill(*base, t["r_a"][:, 0], t["r_b"][:, 0], beta)
    torch.testing.assert_close(single, per[:, 0], atol=1e-6, rtol=1e-6)


def test_gradcheck_float64():
    t = _batch(b=5, k=3, seed=2)
    beta = 0.7
    ref_a, ref_b, r_a, r_b = t["ref_a"], t["ref_b"], t["r_a"], t["r_b"]
    inputs = (t["pi_a"].requires_grad_(), t["pi_b"].requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: losses.dpo(a, b, ref_a, ref_b, beta), inputs)
    assert torch.autograd.gradcheck(lambda a, b: losses.ipo(a, b, ref_a, ref_b, beta), inputs)
    assert torch.autograd.gradcheck(lambda a, b: losses.distill(a, b, ref_a, ref_b, r_a[:, 0], r_b[:, 0], beta), inputs)
    for family in ("min", "example_min", "mean", "hull"):
        fn = lambda a, b, f=family: losses.ensemble_distill(a, b, ref_a, ref_b, r_a, r_b, beta, f)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs), family
    assert torch.autograd.gradcheck(lambda a: losses.forward_kl(a, ref_a), (inputs[0],))


def test_distill_is_label_free():
    t = _batch(seed=3)
    fwd = losses.distill(t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"], t["r_a"][:, 0], t["r_b"][:, 0], 0.2)
    swapped = losses.distill(t["pi_b"], t["pi_a"], t["ref_b"], t["ref_a"], t["r_b"][:, 0], t["r_a"][:, 0], 0.2)
    torch.testing.assert_close(fwd, swapped)
    for family in losses.FAMILIES:
        a = losses.ensemble_distill(t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"], t["r_a"], t["r_b"], 0.2, family)
        b = losses.ensemble_distill(t["pi_b"], t["pi_a"], t["ref_b"], t["ref_a"], t["r_b"], t["r_a"], 0.2, family)
        torch.testing.assert_close(a, b)


def test_hull_never_above_min_and_is_the_simplex_optimum():
    for seed in range(20):
        t = _batch(b=8, k=3, seed=seed)
        args = (t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"], t["r_a"], t["r_b"], 0.5)
        hull = losses.ensemble_distill(*args, "hull").item()
        assert hull <= losses.ensemble_distill(*args, "min").item() + 1e-12
        # Brute force over a fine simplex grid: nothing beats the exact solution.
        h = (t["pi_a"] - t["ref_a"]) - (t["pi_b"] - t["ref_b"])
        gaps = t["r_a"] - t["r_b"]
        steps = 60
        grid = min(
            ((0.5 * h - gaps @ torch.tensor([i / steps, j / steps, 1 - (i + j) / steps], dtype=torch.float64)) ** 2)
            .mean()
            .item()
            for i, j in itertools.product(range(steps + 1), repeat=2)
            if i + j <= steps
        )
        assert hull <= grid + 1e-12
        assert grid - hull < 1e-2  # the grid is close to, never below, the optimum


def test_hull_equals_min_when_one_member_dominates():
    # Member 0's reward gaps equal β·h exactly: its loss is 0, which no mixture can beat.
    t = _batch(b=7, k=3, seed=4)
    h = (t["pi_a"] - t["ref_a"]) - (t["pi_b"] - t["ref_b"])
    r_a = t["r_a"].clone()
    r_a[:, 0] = t["r_b"][:, 0] + 0.5 * h
    args = (t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"], r_a, t["r_b"], 0.5)
    hull, stats = losses.ensemble_distill(*args, "hull", return_stats=True)
    assert hull.item() == pytest.approx(losses.ensemble_distill(*args, "min").item(), abs=1e-12)
    assert hull.item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(stats.weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_member_statistics():
    t = _batch(b=10, k=3, seed=5)
    args = (t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"], t["r_a"], t["r_b"], 0.5)
    loss, stats = losses.ensemble_distill(*args, "example_min", return_stats=True)
    assert stats.argmin_counts.sum().item() == 10
    loss, stats = losses.ensemble_distill(*args, "min", return_stats=True)
    assert stats.argmin_counts.sum().item() == 1
    assert loss.item() == pytest.approx(stats.member_losses.min().item())
    assert stats.argmin_counts[stats.member_losses.argmin()].item() == 1


def test_stable_at_large_margins():
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    zero = torch.zeros(2)
    for value in (losses.dpo(big, zero, zero, zero, 1.0), losses.ipo(big, zero, zero, zero, 1.0)):
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(big.grad).all()
        big.grad = None
    assert losses.dpo(big, zero, zero, zero, 1.0)[0].item() == 0.0
    assert losses.dpo(big, zero, zero, zero, 1.0)[1].item() == pytest.approx(1e4)
    rewards = torch.tensor([[1e4, -1e4], [-1e4, 1e4]])
    for family in losses.FAMILIES:
        value = losses.ensemble_distill(big, zero, zero, zero, rewards, torch.zeros(2, 2), 1.0, family)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(big.grad).all(), family
        big.grad = None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda z, r: losses.dpo(z, z[:2], z, z, 0.1), "1-D tensors of one shape"),
        (lambda z, r: losses.dpo(z, z, z, z, 0.0), "beta must be > 0"),
        (lambda z, r: losses.ipo(z, z, z, z, -1.0), "beta must be > 0"),
        (lambda z, r: losses.dpo(z, z * float("nan"), z, z, 0.1), "pi_b contains NaN"),
        (lambda z, r: losses.distill(z, z, z, z, r, r, 0.1), r"\[B\]"),
        (lambda z, r: losses.ensemble_distill(z, z, z, z, r[:, :0], r[:, :0], 0.1, "min"), "K = 0"),
        (lambda z, r: losses.ensemble_distill(z, z, z, z, r, r, 0.1, "max"), "unknown family 'max'"),
        (lambda z, r: losses.ensemble_distill(z, z, z, z, r, r * float("nan"), 0.1, "min"), "r_b contains NaN"),
        (lambda z, r: losses.ensemble_distill(z, z, z, z, r[:2], r[:2], 0.1, "min"), "B=3"),
        (lambda z, r: losses.forward_kl(z[:0], z[:0]), "at least one"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    z = torch.zeros(3)
    r = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=message):
        call(z, r)


def test_gap_statistics_add_up_to_the_whole_batch_and_choose_as_it_would():
    """Member losses and hull weights from statistics summed over parts equal those of the whole batch, and a
    fixed selection gives the loss of that mixture (what a micro-batch of an optimizer step trains on)."""
    t = _batch(b=12, k=3, seed=4)
    beta = 0.7
    target = beta * losses.margin(t["pi_a"], t["pi_b"], t["ref_a"], t["ref_b"])
    gaps = t["r_a"] - t["r_b"]
    whole = losses.GapStats.from_batch(target, gaps)
    parts = losses.GapStats.from_batch(target[:5], gaps[:5]) + losses.GapStats.from_batch(target[5:], gaps[5:])
    _, stats = losses.ensemble_distill(*t.values(), beta, "min", return_stats=True)
    torch.testing.assert_close(parts.member_losses(), stats.member_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.hull_weights(), losses.hull_weights(target, gaps), rtol=1e-9, atol=1e-9)
    assert int(parts.min_member().argmax()) == int(stats.member_losses.argmin())
    assert parts.all_reduce() is parts  # no process group: nothing to reduce
    w = whole.selection("hull")
    fixed = losses.ensemble_distill(*t.values(), beta, "hull", selection=w)
    assert float(fixed) == pytest.approx(whole.loss(w), rel=1e-12)
    with pytest.raises(ValueError, match="selection applies"):
        losses.ensemble_distill(*t.values(), beta, "mean", selection=w)
