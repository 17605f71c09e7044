"""The job spec: defaults, loading, and errors that name the field (issue: Foundation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.spec import JobSpec, SpecError, load_spec, parse_spec


def test_a_dumped_spec_validates_again():
    """The driver and the service re-validate the full dump, where every option is named with its default."""
    for data in ({}, {"data": {"source": "org/ds", "config": "c", "max_prompt_tokens": 8, "long_prompts": "drop"}}):
        spec = parse_spec(data)
        assert parse_spec(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_every_example_job_spec_is_valid():
    examples = Path(__file__).resolve().parents[1] / "examples"
    jobs = [path for path in sorted(examples.glob("*.yaml")) if path.name != "experiment.yaml"]
    assert len(jobs) >= 3
    for path in jobs:
        assert load_spec(path).name == path.stem.replace("_", "-"), path


def test_every_field_has_a_default():
    spec = parse_spec({})
    assert spec == JobSpec()
    assert (spec.distill.loss, spec.distill.family, spec.ensemble.size) == ("e-dpo", "min", 3)
    assert spec.needs_rewards


def test_importing_the_spec_does_not_import_torch_or_ray():
    code = "import sys, ray_jobs.spec; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"distill": {"beta": -1}}, "distill.beta", "must be > 0"),
        ({"distill": {"beta": 0}}, "distill.beta", "must be > 0"),
        ({"distill": {"loss": "kto"}}, "distill.loss", "dpo"),
        ({"distill": {"bogus": 1}}, "distill.bogus", "unknown field"),
        ({"nonsense": True}, "nonsense", "unknown field"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "must be < 1"),
        ({"data": {"length_bias": {"rho": 1.2}}}, "data.length_bias.rho", "must be <= 1"),
        ({"ensemble": {"size": -1}}, "ensemble.size", "must be >= 0"),
        ({"distill": {"loss": "p-dpo"}}, "distill", "alpha > 0"),
        ({"ensemble": {"size": 0}}, "spec", "ensemble.size must be >= 1 for loss e-dpo"),
        ({"name": "../etc"}, "name", "pattern"),
    ],
)
def test_bad_values_name_the_field(data, field, message):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    fields = {e["field"]: e["message"] for e in info.value.errors}
    assert field in fields, fields
    assert message in fields[field]
    assert field in str(info.value)


def test_labelled_losses_need_no_ensemble():
    spec = parse_spec({"ensemble": {"size": 0}, "distill": {"loss": "p-dpo", "alpha": 0.1}})
    assert not spec.needs_rewards


def test_load_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("name: demo\ndistill:\n  loss: dpo\n  beta: 0.5\n")
    assert load_spec(tmp_path / "a.yaml").distill.beta == 0.5
    (tmp_path / "b.json").write_text(json.dumps({"distill": {"family": "hull"}}))
    assert load_spec(tmp_path / "b.json").distill.family == "hull"
    (tmp_path / "c.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    ("section", "field", "value", "bound"),
    [
        ("generation", "samples_per_prompt", 10**6, 64),
        ("generation", "max_new_tokens", 10**9, 32768),
        ("generation", "replicas", 10**5, 1024),
        ("distill", "batch_size", 10**7, 65536),
        ("distill", "max_length", 10**7, 131072),
        ("ensemble", "workers_per_member", 10**5, 1024),
        ("evaluate", "num_prompts", 10**9, 10_000_000),
    ],
)
def test_sizes_have_upper_bounds_named_in_the_error(section, field, value, bound):
    """A spec cannot ask for what no cluster could hold: refused at submission, naming the field and the bound."""
    with pytest.raises(SpecError) as err:
        parse_spec({section: {field: value}})
    assert err.value.errors == [{"field": f"{section}.{field}", "message": f"must be <= {bound}"}]


JOB_EXAMPLES = [
    p for p in sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml")) if p.stem != "experiment"
]


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_a_spec_reads_back_from_what_it_writes(path: Path) -> None:
    """The service stores a spec with every default written out and the driver reads that back: no validator may
    refuse a default, or every job fails before its first stage."""
    spec = load_spec(path)
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert parse_spec(JobSpec().model_dump(mode="json")) == JobSpec()
