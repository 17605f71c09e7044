"""The data stage: any supported source → validated normal-form pairs → data/{train,test}.parquet + summary.json."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import numpy as np

from ray_jobs.data.columns import rename_columns
from ray_jobs.data.errors import DatasetError
from ray_jobs.data.formats import EXTRACTORS, Renderer, extract_pairs
from ray_jobs.data.length_bias import apply_length_bias
from ray_jobs.data.prompt_budget import apply_prompt_budget
from ray_jobs.data.reviews import label_by_oracle, reviews_records
from ray_jobs.data.sources import DataFiles, read_source
from ray_jobs.data.split import split_by_prompt
from ray_jobs.data.validate import collect
from ray_jobs.events import EventLog
from ray_jobs.generate.engines import SamplingEngines
from ray_jobs.layout import PREFERENCES, JobLayout
from ray_jobs.spec import ColumnMap, JobSpec

STAGE = "data"
BUILTIN_REVIEWS = "builtin:reviews"
_STEPS = 4


def read_pairs(
    source: str,
    format: str = "auto",
    *,
    split: str = "train",
    renderer: Renderer | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    config: str | None = None,
    revision: str | None = None,
    data_files: DataFiles | None = None,
    columns: ColumnMap | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Normal-form rows from a file, folder or hub id, plus {format, rows_read, skipped}.

    `config`, `revision`, `data_files` choose what is read (`ray_jobs.data.sources.read_source`); `columns` maps
    the data's own column names onto the ones the formats read."""
    records = read_source(source, split, config=config, revision=revision, data_files=data_files)
    if columns is not None:
        records = rename_columns(records, columns)
    fmt, collected = extract_pairs(records, format, on_error=on_error, source=source)
    render = renderer or Renderer(None)
    rows = [render.pair(pair, fmt) for pair in collected.rows]
    return rows, {"format": fmt, "rows_read": collected.rows_read, "skipped": collected.skipped}


def load_preference_data(
    source: str,
    format: str = "auto",
    *,
    split: str = "train",
    tokenizer: Any | None = None,
    apply_chat_template: bool = True,
    on_error: Literal["fail", "skip"] = "fail",
) -> Any:
    """A `datasets.Dataset` of normal-form rows {prompt, response_a, response_b, label (1 = a preferred, 0, None),
    ended_a, ended_b (False only for sampled responses cut at a token cap; always True for data read from files)}.

    `tokenizer` (a tokenizer or a model reference) renders prompts with its chat template; without one, text
    prompts are kept as they are and conversational data is refused.
    """
    import datasets

    rows, _ = read_pairs(
        source, format, split=split, renderer=Renderer(tokenizer, apply_chat_template), on_error=on_error
    )
    return datasets.Dataset(_table(rows))


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    defaults = dict(PREFERENCES.defaults)
    return pa.Table.from_pylist([{**defaults, **row} for row in rows], schema=PREFERENCES.arrow())


def _builtin_reviews(
    spec: JobSpec, renderer: Renderer, events: EventLog, engines: SamplingEngines | None
) -> tuple[list[dict[str, Any]], dict]:
    records, ended_of, sampled = reviews_records(spec, renderer, events, engines)
    # Generated text is never the user's fault: bad candidates (empty, identical) are always skipped and counted.
    collected = collect(records, EXTRACTORS["unlabeled"], on_error="skip", source=BUILTIN_REVIEWS)
    unlabeled = [
        {
            "prompt": p.prompt,
            "response_a": p.response_a,
            "response_b": p.response_b,
            "ended_a": ended_of[(p.prompt, p.response_a)],
            "ended_b": ended_of[(p.prompt, p.response_b)],
        }
        for p in collected.rows
    ]
    rows, ties = label_by_oracle(unlabeled)
    skipped = {**collected.skipped, **({"oracle tie": ties} if ties else {})}
    return rows, {"format": "builtin:reviews", "rows_read": collected.rows_read, "skipped": skipped, **sampled}


def _cap(rows: list[dict[str, Any]], max_pairs: int | None, seed: int) -> list[dict[str, Any]]:
    if max_pairs is None or len(rows) <= max_pairs:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), max_pairs, replace=False)
    return [rows[i] for i in sorted(keep.tolist())]


def run(
    spec: JobSpec, job_dir: str | os.PathLike[str], events: EventLog, engines: SamplingEngines | None = None
) -> dict[str, Any]:
    """Run the data stage; returns (and writes as data/summary.json) what was read, skipped, kept and split.

    builtin:reviews samples π_ref on `engines` when given (the pipeline's, shared with the generate stage)."""
    data = spec.data
    events.emit("log", STAGE, message=f"reading preference data from {data.source}")
    renderer = Renderer(spec.reference, data.apply_chat_template)
    if data.source == BUILTIN_REVIEWS:
        rows, summary = _builtin_reviews(spec, renderer, events, engines)
    else:
        rows, summary = read_pairs(
            data.source,
            data.format,
            split=data.split,
            renderer=renderer,
            on_error=data.on_error,
            config=data.config,
            revision=data.revision,
            data_files=data.data_files,
            columns=data.columns,
        )
    summary = {"source": data.source, **summary, "valid": len(rows)}
    if summary["skipped"]:
        events.emit("log", STAGE, message=f"skipped invalid rows: {summary['skipped']}")
    if data.max_prompt_tokens is not None:
        rows, summary["prompt_budget"] = apply_prompt_budget(
            rows, renderer.tokenizer, data.max_prompt_tokens, data.long_prompts
        )
        events.emit("log", STAGE, message=f"prompt budget: {summary['prompt_budget']}")
    events.progress(STAGE, 1, _STEPS)

    if data.relabel is not None:
        rows, ties = label_by_oracle(rows, data.relabel)
        summary["relabelled"] = {"oracle": data.relabel, "ties_dropped": ties}
    if not rows:
        raise DatasetError(f"{data.source}: no valid pairs")
    events.progress(STAGE, 2, _STEPS)

    # Split before biasing: the held-out side keeps the data's own distribution whatever rho asks of training.
    is_test = split_by_prompt([r["prompt"] for r in rows], data.test_fraction, data.seed)
    train = [r for r, t in zip(rows, is_test, strict=True) if not t]
    test = [r for r, t in zip(rows, is_test, strict=True) if t]
    if data.length_bias is not None:
        bias = data.length_bias
        # max_pairs is applied inside, so the cap keeps the requested rho instead of blurring it.
        train, report = apply_length_bias(
            train,
            bias.rho,
            bias.min_ratio,
            data.seed,
            limit=data.max_pairs,
            match_rhos=bias.match_rhos,
            keep_similar=bias.similar_length == "keep",
        )
        if not train:
            raise DatasetError(
                f"length_bias (min_ratio {bias.min_ratio}) left no training pairs: of {report.pairs_in}, "
                f"{report.unlabeled} are unlabeled and {report.length_different} are length-different"
            )
        summary["length_bias"] = report.as_dict()
    else:
        train = _cap(train, data.max_pairs, data.seed)
    summary.update(
        kept=len(train) + len(test),
        labelled=sum(r["label"] is not None for r in train + test),
        train=len(train),
        test=len(test),
        train_prompts=len({r["prompt"] for r in train}),
        test_prompts=len({r["prompt"] for r in test}),
    )
    events.progress(STAGE, 3, _STEPS)

    import pyarrow.parquet as pq

    layout = JobLayout(job_dir)
    with layout.staging(STAGE) as out:
        pq.write_table(_table(train), out / layout.train.name)
        pq.write_table(_table(test), out / layout.test.name)
        (out / layout.data_summary.name).write_text(json.dumps(summary, indent=2) + "\n")
    events.progress(STAGE, 4, _STEPS)
    events.emit("log", STAGE, message=f"data: {len(train)} train / {len(test)} test pairs ({summary['format']})")
    return summary


def load_split(job_dir: str | os.PathLike[str], split: Literal["train", "test"]) -> Any:
    """A finished job's data split as a `datasets.Dataset` in the normal form."""
    import datasets

    return datasets.Dataset.from_parquet(str(JobLayout(job_dir).split(split)))


def ray_split(job_dir: str | os.PathLike[str], split: Literal["train", "test"]) -> Any:
    """A finished job's data split as a Ray Dataset (needs a running Ray).

    Read on the driver and handed over as Arrow: splits are small, and this needs no read tasks or shared storage.
    """
    import pyarrow.parquet as pq
    import ray

    return ray.data.from_arrow(pq.read_table(JobLayout(job_dir).split(split)))
