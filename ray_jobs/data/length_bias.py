"""The paper's induced length shift (PAPER.md §4.1).

From labelled pairs whose responses differ in length by a ratio of at least ``min_ratio`` (length in
whitespace-separated words, the closest stand-in for tokens that needs no tokenizer), keep a subset in which the
longer response is the preferred one in a fraction ``rho`` of pairs, as large as the data allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class LengthBiasReport:
    rho_requested: float
    rho_achieved: float
    min_ratio: float
    pairs_in: int
    unlabeled: int
    length_different: int
    longer_preferred_available: int
    shorter_preferred_available: int
    kept: int
    longer_preferred_kept: int
    length_unit: str = "words"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def words(text: str) -> int:
    return len(text.split())


def longer_is_preferred(row: dict[str, Any], min_ratio: float) -> bool | None:
    """None when the pair is unlabeled or its lengths are too close to count as length-different."""
    if row["label"] is None:
        return None
    la, lb = words(row["response_a"]), words(row["response_b"])
    if min(la, lb) == 0 or max(la, lb) / min(la, lb) < min_ratio or la == lb:
        return None
    return (la > lb) == (row["label"] == 1)


def subsample_counts(longer: int, shorter: int, rho: float, limit: int | None = None) -> tuple[int, int]:
    """(longer-preferred, shorter-preferred) to keep: the largest total (at most `limit`) with the ratio nearest rho."""
    if rho >= 1.0:
        total = longer
    elif rho <= 0.0:
        total = shorter
    else:
        total = int(min(longer / rho, shorter / (1.0 - rho)))
    if limit is not None:
        total = min(total, limit)
    keep_longer = min(longer, round(rho * total))
    return keep_longer, min(shorter, total - keep_longer)


def apply_length_bias(
    rows: Sequence[dict[str, Any]], rho: float, min_ratio: float, seed: int, limit: int | None = None
) -> tuple[list[dict[str, Any]], LengthBiasReport]:
    """The kept rows (in their original order, at most `limit`) and what was achieved; deterministic for a seed."""
    longer_idx, shorter_idx = [], []
    for i, row in enumerate(rows):
        flag = longer_is_preferred(row, min_ratio)
        if flag is not None:
            (longer_idx if flag else shorter_idx).append(i)
    n_long, n_short = subsample_counts(len(longer_idx), len(shorter_idx), rho, limit)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(longer_idx, n_long, replace=False).tolist() if n_long else []
    chosen += rng.choice(shorter_idx, n_short, replace=False).tolist() if n_short else []
    kept = [rows[i] for i in sorted(chosen)]
    report = LengthBiasReport(
        rho_requested=rho,
        rho_achieved=n_long / len(kept) if kept else float("nan"),
        min_ratio=min_ratio,
        pairs_in=len(rows),
        unlabeled=sum(r["label"] is None for r in rows),
        length_different=len(longer_idx) + len(shorter_idx),
        longer_preferred_available=len(longer_idx),
        shorter_preferred_available=len(shorter_idx),
        kept=len(kept),
        longer_preferred_kept=n_long,
    )
    return kept, report
