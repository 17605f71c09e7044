"""The reference tokenizer's ids of the scored texts, stored next to them so distillation never tokenizes.

Untruncated: `ray_jobs.models.logps.fit` cuts them to `distill.max_length` at packing time, so the stored ids
depend on the tokenizer alone (which `scored_with.json` pins through the reference).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ray_jobs.models.logps import encode


def _ids(tokenizer: Any, prompts: pd.Series, responses: pd.Series, ended: pd.Series) -> tuple[pd.Series, pd.Series]:
    prompt_ids, response_ids = encode(
        tokenizer, prompts.astype(str).tolist(), responses.astype(str).tolist(), ended.astype(bool).tolist()
    )
    # Object columns even when empty: an empty list column would otherwise be float64, which Arrow cannot cast.
    return tuple(pd.Series(ids, index=prompts.index, dtype=object) for ids in (prompt_ids, response_ids))


def encode_pairs(pairs: pd.DataFrame, tokenizer: Any) -> pd.DataFrame:
    """`pairs` with prompt_ids, ids_a and ids_b (EOS appended to the responses that ended)."""
    prompt_ids, ids_a = _ids(tokenizer, pairs["prompt"], pairs["response_a"], pairs["ended_a"])
    _, ids_b = _ids(tokenizer, pairs["prompt"], pairs["response_b"], pairs["ended_b"])
    return pairs.assign(prompt_ids=prompt_ids, ids_a=ids_a, ids_b=ids_b)


def encode_samples(samples: pd.DataFrame, tokenizer: Any) -> pd.DataFrame:
    """π_ref samples with prompt_ids and ids."""
    prompt_ids, ids = _ids(tokenizer, samples["prompt"], samples["response"], samples["ended"])
    return samples.assign(prompt_ids=prompt_ids, ids=ids)
