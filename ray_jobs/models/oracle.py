"""Oracle rewards r*(x, y): the ground truth that labels the built-in task and judges trained policies."""

from __future__ import annotations

import os
from typing import Protocol

import torch


class Oracle(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class VaderOracle:
    """VADER compound sentiment of the response alone, in [-1, 1]: the goal is positive, warm text."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


class RewardModelOracle:
    """A trained reward model (any folder or reference ``load_reward_model`` accepts) used as the oracle."""

    def __init__(self, ref: str | os.PathLike[str], batch_size: int = 16, max_length: int = 512) -> None:
        from ray_jobs.models.registry import load_reward_model

        self.model, self.tokenizer = load_reward_model(ref)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from ray_jobs.models.reward import score_pairs

        with torch.no_grad():
            scores = score_pairs(self.model, self.tokenizer, prompts, responses, self.batch_size, self.max_length)
        return scores.tolist()


def load_oracle(ref: str | os.PathLike[str]) -> Oracle:
    """``builtin:vader``, or a reward model (a local folder; hub ids work where a hub is reachable)."""
    return VaderOracle() if os.fspath(ref) == "builtin:vader" else RewardModelOracle(ref)
