"""The job folder: every path, file name and Parquet schema a stage writes and another part reads.

Readers and writers (stages, the service, tests) take their paths from `JobLayout` and their tables' schemas from
the `Table`s here, so a name or a column changes in one place. The rule that makes the folder trustworthy:
a stage writes into ``<job>/.partial/<stage>`` and the folder is renamed into place only when every output is
written, so a stage folder that exists is complete and a crash leaves nothing that looks finished.

    <job>/spec.json             the validated spec
    <job>/events.jsonl          the event log (ray_jobs.events)
    <job>/data/                 train.parquet, test.parquet (PREFERENCES), summary.json
    <job>/ensemble/             member-<k>/ (HF folder + metrics.json), manifest.json
    <job>/generate/             candidates.parquet (CANDIDATES), kl_samples.parquet (KL_SAMPLES)
    <job>/score/                pairs.parquet (PAIRS), ref_samples.parquet (REF_SAMPLES), scored_with.json
    <job>/distill/              the policy: an HF folder (or a PEFT adapter, or both: adapter/), rmdistill.json (how it
                                was trained) and README.md (its card)
    <job>/evaluate/             report.json and PNG plots
    <job>/checkpoints/ .ray/ tensorboard/    working state outside the published stages

Imports only the standard library (pyarrow on demand), so the service reads it without torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.names import STAGES

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.json"
MEMBER_METRICS_FILE = "metrics.json"
POLICY_INFO_FILE = "rmdistill.json"
REPORT_FILE = "report.json"
SCORED_WITH_FILE = "scored_with.json"
POLICY_CARD_FILE = "README.md"
# distill.policy_format both: the LoRA adapter beside the merged policy.
ADAPTER_DIR = "adapter"


def home() -> Path:
    """Root of everything rmdistill keeps on this machine: jobs, the database, the model cache."""
    return Path(os.environ.get("RMDISTILL_HOME", "~/.rmdistill")).expanduser()


def model_cache() -> Path:
    """Where built-in and tiny models are materialised as Hugging Face folders (shared by every job)."""
    return Path(os.environ.get("RMDISTILL_CACHE", str(home() / "cache"))).expanduser()


JOBS_DIR = "jobs"


def jobs_root() -> Path:
    """Where job folders live under the data home (the service's `data_dir`, which it passes to jobs as home)."""
    return home() / JOBS_DIR


@dataclass(frozen=True)
class Table:
    """A Parquet table's columns as (name, Arrow type name); `arrow()` builds the pyarrow schema.

    `defaults` fills a column its writer does not know about (preference data from files has no token caps).
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        """The columns a reader can insist on: those without a default."""
        optional = {c for c, _ in self.defaults}
        return tuple(c for c in self.names if c not in optional)

    def arrow(self) -> Any:
        import pyarrow as pa

        types = {
            "string": pa.string(),
            "int8": pa.int8(),
            "int32": pa.int32(),
            "float64": pa.float64(),
            "bool": pa.bool_(),
            "list<bool>": pa.list_(pa.bool_()),
            "list<string>": pa.list_(pa.string()),
            "list<int32>": pa.list_(pa.int32()),
            "list<float64>": pa.list_(pa.float64()),
        }
        return pa.schema([(c, types[t]) for c, t in self.columns])

    def write(self, data: Any, path: str | os.PathLike[str]) -> None:
        """Write a pandas frame or a column mapping with exactly this schema (extra columns are an error)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.arrow()
        if isinstance(data, pd.DataFrame):
            data = data.assign(**{c: v for c, v in self.defaults if c not in data.columns})
            table = pa.Table.from_pandas(data[list(self.names)], schema=schema, preserve_index=False)
        else:
            extra = set(data) - set(self.names)
            if extra:
                raise ValueError(f"{self.name}: unknown column(s) {sorted(extra)}")
            rows = len(next(iter(data.values()))) if data else 0
            data = {**{c: [v] * rows for c, v in self.defaults}, **data}
            table = pa.table({c: data[c] for c in self.names}, schema=schema)
        pq.write_table(table, path)


# `ended` columns: False where a generation token cap cut the response, which is then scored without EOS.
_ENDED = (("ended_a", True), ("ended_b", True))

# Preference pairs in the normal form: label 1 = a preferred, 0 = b preferred, null = unlabelled.
PREFERENCES = Table(
    "preferences",
    (
        ("prompt", "string"),
        ("response_a", "string"),
        ("response_b", "string"),
        ("label", "int8"),
        ("ended_a", "bool"),
        ("ended_b", "bool"),
    ),
    _ENDED,
)
CANDIDATES = Table("candidates", (("prompt", "string"), ("responses", "list<string>"), ("ended", "list<bool>")))
KL_SAMPLES = Table("kl_samples", (("prompt", "string"), ("response", "string"), ("ended", "bool")), (("ended", True),))
PAIRS = Table(
    "pairs",
    (
        ("prompt", "string"),
        ("response_a", "string"),
        ("response_b", "string"),
        ("source", "string"),  # dataset | generated
        ("label", "int8"),
        ("ended_a", "bool"),
        ("ended_b", "bool"),
        ("ref_logp_a", "float64"),
        ("ref_logp_b", "float64"),
        ("rewards_a", "list<float64>"),  # one reward per ensemble member
        ("rewards_b", "list<float64>"),
        # π_ref's token ids (ray_jobs.models.logps.encode): distillation tokenizes nothing per step.
        ("prompt_ids", "list<int32>"),
        ("ids_a", "list<int32>"),  # EOS appended where ended_a
        ("ids_b", "list<int32>"),
    ),
    _ENDED,
)
REF_SAMPLES = Table(
    "ref_samples",
    (
        ("prompt", "string"),
        ("response", "string"),
        ("ended", "bool"),
        ("ref_logp", "float64"),
        ("prompt_ids", "list<int32>"),
        ("ids", "list<int32>"),
    ),
    (("ended", True),),
)


class JobLayout:
    """The paths of one job folder."""

    def __init__(self, job_dir: str | os.PathLike[str]):
        self.root = Path(job_dir)

    def stage(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.root / stage

    def is_complete(self, stage: str) -> bool:
        return self.stage(stage).is_dir()

    def published(self) -> dict[str, Path]:
        """The stage folders that exist, that is, the finished ones."""
        return {s: self.stage(s) for s in STAGES if self.is_complete(s)}

    @property
    def spec(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    def split(self, name: str) -> Path:
        if name not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {name!r}")
        return self.root / "data" / f"{name}.parquet"

    @property
    def train(self) -> Path:
        return self.split("train")

    @property
    def test(self) -> Path:
        return self.split("test")

    @property
    def data_summary(self) -> Path:
        return self.root / "data" / SUMMARY_FILE

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    @property
    def manifest(self) -> Path:
        return self.ensemble / MANIFEST_FILE

    @property
    def candidates(self) -> Path:
        return self.root / "generate" / "candidates.parquet"

    @property
    def kl_samples(self) -> Path:
        return self.root / "generate" / "kl_samples.parquet"

    @property
    def pairs(self) -> Path:
        return self.root / "score" / "pairs.parquet"

    @property
    def ref_samples(self) -> Path:
        return self.root / "score" / "ref_samples.parquet"

    @property
    def scored_with(self) -> Path:
        """What the pairs were scored with (reference, lengths, members): a reuse must match it."""
        return self.root / "score" / SCORED_WITH_FILE

    @property
    def policy(self) -> Path:
        return self.root / "distill"

    @property
    def policy_info(self) -> Path:
        return self.policy / POLICY_INFO_FILE

    @property
    def report(self) -> Path:
        return self.root / "evaluate" / REPORT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def ray_storage(self, stage: str) -> Path:
        """Ray Train/Tune run storage of a stage: working state, removed once the stage is published."""
        return self.root / ".ray" / stage

    @contextlib.contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """Yield an empty folder to write the stage's outputs into; publish it atomically on success."""
        final = self.stage(stage)
        partial = self.root / ".partial" / stage
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        yield partial
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)


def member_dir(ensemble_dir: str | os.PathLike[str], k: int) -> Path:
    """Member k's folder inside an ensemble folder (published or staging)."""
    return Path(ensemble_dir) / f"member-{k}"
