"""Every file in examples/ is a spec the service accepts as written (a job spec, or an experiment document), and
the copies `rmdistill init` ships are the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clients.specs import CASES, example
from ray_jobs.experiment.grid import expand, load_experiment
from ray_jobs.spec import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} should open with a comment saying what it is for"
    if "grid" in yaml.safe_load(text):
        # Every cell of both grids expands into a job spec that validates.
        assert expand(load_experiment(path)) and expand(load_experiment(path, quick=True))
    else:
        load_spec(path)  # raises SpecError naming each bad field


def test_init_ships_every_case_as_its_example() -> None:
    assert {p.stem for p in EXAMPLES} >= set(CASES)
    for case in CASES:
        shipped = example(case).read_text(encoding="utf-8")
        assert shipped == (EXAMPLES[0].parent / f"{case}.yaml").read_text(encoding="utf-8")
        assert load_spec(EXAMPLES[0].parent / f"{case}.yaml")
