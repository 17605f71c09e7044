"""The paper's induced length shift (PAPER.md §4.1).

From labelled pairs whose responses differ in length by a ratio of at least ``min_ratio`` (length in
whitespace-separated words, the closest stand-in for tokens that needs no tokenizer), keep a subset in which the
longer response is the preferred one in a fraction ``rho`` of pairs, as large as the data allows.

A robustness study compares several ρ: `match_rhos` makes every ρ keep the same number of pairs (the largest size all
of them reach), so cells differ in bias and not in data size. Similar-length pairs carry no length signal; they are
dropped by default (the paper's protocol) or kept whole with `keep_similar`, the same ones for every ρ.
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
    similar_length_kept: int = 0
    size_matched_over: list[float] | None = None
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


def reachable_size(longer: int, shorter: int, rho: float) -> int:
    """The most pairs a subset with a share rho of longer-preferred pairs can hold."""
    if rho >= 1.0:
        return longer
    if rho <= 0.0:
        return shorter
    return int(min(longer / rho, shorter / (1.0 - rho)))


def subsample_counts(longer: int, shorter: int, rho: float, limit: int | None = None) -> tuple[int, int]:
    """(longer-preferred, shorter-preferred) to keep: the largest total (at most `limit`) with the ratio nearest rho."""
    total = reachable_size(longer, shorter, rho)
    if limit is not None:
        total = min(total, limit)
    keep_longer = min(longer, round(rho * total))
    return keep_longer, min(shorter, total - keep_longer)


def apply_length_bias(
    rows: Sequence[dict[str, Any]],
    rho: float,
    min_ratio: float,
    seed: int,
    limit: int | None = None,
    match_rhos: Sequence[float] = (),
    keep_similar: bool = False,
) -> tuple[list[dict[str, Any]], LengthBiasReport]:
    """The kept rows (in their original order) and what was achieved; deterministic for a seed.

    At most `limit` length-different pairs are kept, and no more than every ρ in `match_rhos` could keep.
    `keep_similar` adds every labelled pair whose lengths are too close to count (it does not count towards `limit`).
    """
    longer_idx, shorter_idx, similar_idx = [], [], []
    for i, row in enumerate(rows):
        flag = longer_is_preferred(row, min_ratio)
        if flag is not None:
            (longer_idx if flag else shorter_idx).append(i)
        elif row["label"] is not None and min(words(row["response_a"]), words(row["response_b"])) > 0:
            similar_idx.append(i)
    if match_rhos:
        common = min(reachable_size(len(longer_idx), len(shorter_idx), r) for r in (*match_rhos, rho))
        limit = common if limit is None else min(limit, common)
    n_long, n_short = subsample_counts(len(longer_idx), len(shorter_idx), rho, limit)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(longer_idx, n_long, replace=False).tolist() if n_long else []
    chosen += rng.choice(shorter_idx, n_short, replace=False).tolist() if n_short else []
    biased = n_long + n_short
    if keep_similar:
        chosen += similar_idx
    kept = [rows[i] for i in sorted(chosen)]
    report = LengthBiasReport(
        rho_requested=rho,
        rho_achieved=n_long / biased if biased else float("nan"),
        min_ratio=min_ratio,
        pairs_in=len(rows),
        unlabeled=sum(r["label"] is None for r in rows),
        length_different=len(longer_idx) + len(shorter_idx),
        longer_preferred_available=len(longer_idx),
        shorter_preferred_available=len(shorter_idx),
        kept=len(kept),
        longer_preferred_kept=n_long,
        similar_length_kept=len(similar_idx) if keep_similar else 0,
        size_matched_over=sorted({*match_rhos, rho}) if match_rhos else None,
    )
    return kept, report
