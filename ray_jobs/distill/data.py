"""Reading the scored pairs for distillation: validation, label orientation and endless batch streams.

The same stream shape serves both runners: pandas slices when `train_loop` runs alone, Ray Data shard batches
under Ray Train. Streams cycle over epochs forever; the loop stops at its step budget, which is identical on
every worker, so DDP ranks never wait on a rank that ran out of data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ray_jobs.layout import PAIRS, REF_SAMPLES


class PairsError(ValueError):
    """The scored pairs cannot feed the requested loss; the message names the file, field and row."""


def _check_columns(df: pd.DataFrame, needed: tuple[str, ...], path: str | Path) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PairsError(f"{path}: missing column(s) {', '.join(missing)}")


def keep_labelled(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["label"].notna()].reset_index(drop=True)


def read_pairs(path: str | Path, labelled: bool) -> pd.DataFrame:
    """The pairs a loss trains on: labelled ones only for dpo/ipo/p-dpo, all of them for reward distillation."""
    df = pd.read_parquet(path)
    _check_columns(df, PAIRS.names, path)
    if labelled:
        df = keep_labelled(df)
        if df.empty:
            raise PairsError(f"{path}: no labelled pairs (label is null everywhere); dpo/ipo/p-dpo need labels")
    elif df.empty:
        raise PairsError(f"{path}: no pairs")
    return df


def read_ref_samples(path: str | Path) -> pd.DataFrame:
    if not Path(path).exists():
        raise PairsError(
            f"{path}: missing; distill.alpha > 0 needs reference samples (generation.kl_samples_per_prompt)"
        )
    df = pd.read_parquet(path)
    _check_columns(df, REF_SAMPLES.names, path)
    if df.empty:
        raise PairsError(f"{path}: no reference samples; distill.alpha > 0 needs at least one")
    return df


def local_batches(df: pd.DataFrame, batch_size: int, seed: int) -> Iterator[pd.DataFrame]:
    """Endless shuffled batches, a fresh permutation per epoch (seed + epoch) so a resumed run can skip ahead."""
    for epoch in itertools.count():
        order = np.random.default_rng(seed + epoch).permutation(len(df))
        for start in range(0, len(df), batch_size):
            yield df.iloc[order[start : start + batch_size]]


def shard_batches(shard: Any, batch_size: int, seed: int) -> Iterator[pd.DataFrame]:
    """Endless batches of a Ray Data shard (`ray.train.get_dataset_shard`), reshuffled locally each epoch."""
    for epoch in itertools.count():
        empty = True
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="pandas",
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
        ):
            empty = False
            yield batch
        if empty:
            raise PairsError("this worker's data shard is empty: fewer rows than workers")


def _reward_matrix(column: pd.Series, name: str) -> torch.Tensor:
    rows = [np.asarray(v if v is not None else [], dtype=np.float64) for v in column]
    sizes = {len(r) for r in rows}
    if len(sizes) > 1:
        bad = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
        raise PairsError(f"{name}: row {column.index[bad]} has {len(rows[bad])} rewards, row 0 has {len(rows[0])}")
    return torch.from_numpy(np.stack(rows))


def _ids(column: pd.Series) -> list[list[int]]:
    """Token id lists as plain ints (Ray Data hands list columns over as NumPy arrays)."""
    return [np.asarray(v, dtype=np.int64).tolist() for v in column]


def collate_pairs(df: pd.DataFrame) -> dict[str, Any]:
    """Token ids plus float tensors, oriented so a is the chosen response wherever a label exists.

    Orienting is what labelled losses need and changes nothing for distillation (its loss is symmetric), and it
    lets every loss report the displacement of the chosen response on labelled rows.
    """
    label = df["label"].to_numpy(dtype=np.float64, na_value=np.nan)
    swap = label == 0
    ref_a, ref_b = df["ref_logp_a"].to_numpy(np.float64), df["ref_logp_b"].to_numpy(np.float64)
    r_a, r_b = _reward_matrix(df["rewards_a"], "rewards_a"), _reward_matrix(df["rewards_b"], "rewards_b")
    ids_a, ids_b = _ids(df["ids_a"]), _ids(df["ids_b"])
    swap_t = torch.from_numpy(swap)[:, None]
    return {
        "prompt_ids": _ids(df["prompt_ids"]),
        "ids_a": [b if s else a for a, b, s in zip(ids_a, ids_b, swap, strict=True)],
        "ids_b": [a if s else b for a, b, s in zip(ids_a, ids_b, swap, strict=True)],
        "ref_a": torch.from_numpy(np.where(swap, ref_b, ref_a)).float(),
        "ref_b": torch.from_numpy(np.where(swap, ref_a, ref_b)).float(),
        "r_a": torch.where(swap_t, r_b, r_a).float(),
        "r_b": torch.where(swap_t, r_a, r_b).float(),
        "labelled": torch.from_numpy(~np.isnan(label)),
    }


def collate_samples(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "prompt_ids": _ids(df["prompt_ids"]),
        "ids": _ids(df["ids"]),
        "ref": torch.tensor(df["ref_logp"].to_numpy(np.float64), dtype=torch.float32),
    }
