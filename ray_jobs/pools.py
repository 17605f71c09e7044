"""Batch inference over a Ray Data actor pool, results put back in input order.

Scoring sends a list of rows through actors that load a model once (`map_batches` with a callable class); each
row carries its position as ``index`` so results can be placed back whatever order the
pool returns them in, progress can be reported as batches land, and a row the pool never returned is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def run_indexed(
    actor: type,
    actor_kwargs: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    replicas: int,
    batch_size: int,
    on_batch: Callable[[dict[str, np.ndarray]], None],
    on_progress: Callable[[int, int], None] | None = None,
    batch_format: str = "numpy",
) -> None:
    """Run `actor` over `rows` with `replicas` one-CPU actors (one GPU each where the cluster has GPUs).

    `on_batch(batch)` receives each output batch (with its ``index`` column); `on_progress(done, total)` follows.
    Raises RuntimeError naming the first row that came back from no actor.
    """
    import ray

    if not rows:
        return
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    dataset = ray.data.from_items([{"index": i, **row} for i, row in enumerate(rows)])
    out = dataset.map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        concurrency=replicas,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=gpus,
    )
    returned = np.zeros(len(rows), dtype=bool)
    for batch in out.iter_batches(batch_size=None, batch_format=batch_format):
        on_batch(batch)
        returned[np.asarray(batch["index"], dtype=np.int64)] = True
        if on_progress is not None:
            on_progress(int(returned.sum()), len(rows))
    if not returned.all():
        missing = np.flatnonzero(~returned)
        raise RuntimeError(
            f"{actor.__name__} returned nothing for {missing.size} of {len(rows)} rows (first: {missing[0]})"
        )
