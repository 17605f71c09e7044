"""Train/test split by prompt: every row of a prompt goes to the same side, decided by a stable hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def prompt_key(prompt: str, seed: int) -> int:
    """A stable 64-bit hash of (seed, prompt): the same on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def split_by_prompt(prompts: Sequence[str], test_fraction: float, seed: int) -> list[bool]:
    """For each row, True when it belongs to the test split.

    The distinct prompts are ranked by their hash and the first round(test_fraction * n) go to test, so the split
    is exact in prompts and, with at least two prompts, neither side is empty.
    """
    distinct = sorted(set(prompts), key=lambda p: prompt_key(p, seed))
    if len(distinct) < 2:
        return [False] * len(prompts)
    n_test = min(max(1, round(test_fraction * len(distinct))), len(distinct) - 1)
    test = set(distinct[:n_test])
    return [p in test for p in prompts]
