"""The spec is the contract all the way down: workers receive the validated spec sections, not copies of fields.

A field added to a spec section in one place must reach the worker that uses it with no other edit. These tests add
a field to a section (a pydantic subclass, as a new declaration in spec.py would) and follow it to what each
stage hands its workers; they also pin the enumerations to their one declaration in `ray_jobs.names`.
"""

from __future__ import annotations

import typing

import pytest
from pydantic import Field, create_model

from ray_jobs import losses, names
from ray_jobs.distill.loop import distill_task, policy_info
from ray_jobs.ensemble.stage import member_tasks
from ray_jobs.evaluate.stage import sampling
from ray_jobs.layout import PAIRS, JobLayout
from ray_jobs.spec import DistillSpec, EnsembleSpec, GenerationSpec, JobSpec


def _with_new_field(section: type, default: object) -> type:
    return create_model(f"{section.__name__}WithNewField", __base__=section, new_field=(type(default), default))


def _job_spec(**sections: type) -> type:
    fields = {name: (cls, Field(default_factory=cls)) for name, cls in sections.items()}
    return create_model("JobSpecWithNewFields", __base__=JobSpec, **fields)


def test_a_new_distill_field_reaches_the_training_loop_and_the_policy_record(tmp_path):
    spec_cls = _job_spec(distill=_with_new_field(DistillSpec, 7))
    spec = spec_cls.model_validate({"reference": "tiny:llama", "distill": {"new_field": 9, "lr": 1e-3}})
    task = distill_task(spec, tmp_path)
    # The loop reads task.spec: the very section that was validated, new field included.
    assert task.spec is spec.distill and task.spec.new_field == 9 and task.spec.lr == 1e-3
    assert task.pairs == str(JobLayout(tmp_path).pairs)
    assert policy_info(task, steps=3, final_metrics={})["new_field"] == 9


def test_a_new_ensemble_field_reaches_every_member_with_overrides_applied(tmp_path):
    spec = _with_new_field(EnsembleSpec, "x").model_validate(
        {"size": 2, "backbone": "tiny:bert", "new_field": "y", "members": [{"lr": 1e-3}]}
    )
    tasks = member_tasks(spec, tmp_path, tmp_path / "out")
    assert [t.spec.new_field for t in tasks] == ["y", "y"]
    assert [t.spec.lr for t in tasks] == [1e-3, spec.lr]


def test_evaluation_samples_with_the_jobs_generation_settings():
    """The old evaluation sampler copied five generation fields and silently dropped batch_size and max_model_len."""
    spec = _job_spec(generation=_with_new_field(GenerationSpec, 0)).model_validate(
        {
            "generation": {"new_field": 5, "batch_size": 3, "max_model_len": 256, "replicas": 2, "top_p": 0.5},
            "evaluate": {"temperature": 0.3, "max_new_tokens": 11, "seed": 4},
        }
    )
    gen = sampling(spec)
    assert (gen.new_field, gen.batch_size, gen.max_model_len, gen.replicas) == (5, 3, 256, 2)
    assert (gen.temperature, gen.max_new_tokens, gen.seed) == (0.3, 11, 4)
    assert gen.top_p == 1.0  # the KL estimate needs the policy's whole distribution
    assert spec.generation.top_p == 0.5  # a copy: the job's own section is untouched


@pytest.mark.parametrize(
    ("section", "field", "values"),
    [
        (DistillSpec, "loss", names.LOSSES),
        (DistillSpec, "family", names.FAMILIES),
        (GenerationSpec, "engine", names.ENGINES),
    ],
)
def test_spec_enumerations_are_the_declared_ones(section, field, values):
    assert typing.get_args(section.model_fields[field].annotation) == values


def test_enumerations_have_one_declaration():
    assert losses.FAMILIES is names.FAMILIES
    assert set(names.JOB_STATES) > names.FINAL_STATES
    assert set(names.LOSSES) > names.LABELLED_LOSSES
    # One name per stage: the module, the event stage and the job folder.
    for stage in names.STAGES:
        assert JobLayout("/j").stage(stage).name == stage
        assert __import__(f"ray_jobs.{stage}.stage", fromlist=["run"]).run.__module__ == f"ray_jobs.{stage}.stage"
    with pytest.raises(ValueError, match="unknown stage"):
        JobLayout("/j").stage("policy")


def test_the_pairs_table_is_what_the_distill_reader_requires(tmp_path):
    import pandas as pd

    from ray_jobs.distill.data import PairsError, read_pairs

    row = {
        "prompt": "p",
        "response_a": "a",
        "response_b": "b",
        "source": "dataset",
        "label": 1,
        "ref_logp_a": -1.0,
        "ref_logp_b": -2.0,
        "rewards_a": [0.5],
        "rewards_b": [0.1],
        "prompt_ids": [5],
        "ids_a": [6, 2],
        "ids_b": [7, 2],
    }
    PAIRS.write(pd.DataFrame([row]), tmp_path / "pairs.parquet")
    assert list(read_pairs(tmp_path / "pairs.parquet", labelled=True).columns) == list(PAIRS.names)
    pd.DataFrame([{k: v for k, v in row.items() if k != "source"}]).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(PairsError, match="missing column.*source"):
        read_pairs(tmp_path / "old.parquet", labelled=True)
