"""An experiment spec expands into ordinary, comparable job specs; bad grids are refused naming the cell and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_jobs.experiment.grid import expand, experiment_id, groups, load_experiment, parse_experiment
from ray_jobs.experiment.runner import FolderInUse, pending_cells, write_plan
from ray_jobs.spec import SpecError

EXAMPLE = Path(__file__).parents[1] / "examples" / "experiment.yaml"


def small(**grid) -> dict:
    return {
        "name": "study",
        "base": {"data": {"source": "builtin:reviews", "seed": 5}, "distill": {"max_steps": 4}},
        "grid": {
            "rho": [0.2, 0.8],
            "seeds": [0, 1],
            "arms": [
                {"name": "dpo", "loss": "dpo", "alpha": [0.0]},
                {"name": "e-dpo-min", "loss": "e-dpo", "family": "min", "alpha": [0.0, 0.1]},
            ],
            **grid,
        },
    }


def test_the_example_expands_to_the_issue_grid():
    full = expand(load_experiment(EXAMPLE))
    # 3 rho x 3 seeds x (dpo, ipo, distill, e-dpo min at two alphas, e-dpo hull, p-dpo)
    assert len(full) == 3 * 3 * 7 and len({c.id for c in full}) == len(full)
    assert {c.spec.distill.loss for c in full} == {"dpo", "ipo", "distill", "e-dpo", "p-dpo"}
    assert {c.spec.distill.max_steps for c in full} == {24} and {c.spec.distill.batch_size for c in full} == {8}
    # Same training pairs for every arm: no generated pairs, and every rho trains on the common size.
    assert {c.spec.generation.samples_per_prompt for c in full} == {0}
    assert {tuple(c.spec.data.length_bias.match_rhos) for c in full} == {(0.2, 0.5, 0.8)}
    quick = expand(load_experiment(EXAMPLE, quick=True))
    assert [c.id for c in quick] == [
        "rho0.2-dpo-a0-s0",
        "rho0.2-e-dpo-min-a0.1-s0",
        "rho0.8-dpo-a0-s0",
        "rho0.8-e-dpo-min-a0.1-s0",
    ]
    assert quick[0].spec.distill.max_steps == 10 and quick[0].spec.evaluate.num_prompts == 32
    assert quick[0].spec.name == "robustness-quick-rho0.2-dpo-a0-s0"


def test_cells_set_what_varies_and_keep_evaluation_fixed_within_a_seed():
    cells = expand(parse_experiment(small()))
    assert len(cells) == 2 * 2 * 3
    by_id = {c.id: c for c in cells}
    cell = by_id["rho0.8-e-dpo-min-a0.1-s1"]
    spec = cell.spec
    assert (spec.data.length_bias.rho, spec.distill.loss, spec.distill.family, spec.distill.alpha) == (
        0.8,
        "e-dpo",
        "min",
        0.1,
    )
    assert (spec.data.seed, spec.ensemble.seed, spec.distill.seed, spec.evaluate.seed) == (6, 1, 1, 1)
    assert cell.params() == {"rho": 0.8, "arm": "e-dpo-min", "loss": "e-dpo", "family": "min", "alpha": 0.1, "seed": 1}
    assert by_id["rho0.2-dpo-a0-s1"].params()["family"] is None
    # Everything evaluation depends on is the same for every cell of a seed, whatever rho or arm.
    for seed in (0, 1):
        same_seed = [c.spec.evaluate for c in cells if c.seed == seed]
        assert all(e == same_seed[0] for e in same_seed)


def test_groups_share_a_leader_that_computes_what_all_need():
    cells = expand(parse_experiment(small()))
    found = groups(cells)
    assert [(g.rho, g.seed, g.generated_pairs) for g in found] == [(0.2, 0, 2), (0.8, 0, 2), (0.2, 1, 2), (0.8, 1, 2)]
    for group in found:
        leader = group.ordered()[0]
        # Rewards for e-dpo and KL samples for alpha > 0: only e-dpo at alpha 0.1 computes both.
        assert (leader.arm.name, leader.alpha) == ("e-dpo-min", 0.1)
        assert len(group.cells) == 3


def test_an_arm_with_generated_pairs_is_its_own_group():
    arms = [
        {"name": "dpo", "loss": "dpo"},
        {"name": "e-dpo", "loss": "e-dpo", "alpha": [0.1]},
        {"name": "e-dpo-gen", "loss": "e-dpo", "alpha": [0.1], "generated_pairs": 3},
    ]
    plan = {**small(arms=arms, rho=[0.2], seeds=[0])}
    plan["base"]["generation"] = {"samples_per_prompt": 0}
    cells = expand(parse_experiment(plan))
    assert [c.spec.generation.samples_per_prompt for c in cells] == [0, 0, 3]
    found = groups(cells)
    assert [(g.generated_pairs, [c.arm.name for c in g.cells]) for g in found] == [
        (0, ["dpo", "e-dpo"]),
        (3, ["e-dpo-gen"]),
    ]


def test_refusals_name_the_cell_or_field():
    with pytest.raises(SpecError, match="base.distill.max_steps: must be set"):
        expand(parse_experiment({**small(), "base": {"distill": {}}}))
    no_oracle = small()
    no_oracle["base"]["evaluate"] = {"oracle": None}
    with pytest.raises(SpecError, match="base.evaluate.oracle: must be set"):
        expand(parse_experiment(no_oracle))
    with pytest.raises(SpecError, match=r"cell rho0.2-p-a0-s0: distill: loss p-dpo needs alpha > 0"):
        expand(parse_experiment(small(arms=[{"name": "dpo", "loss": "dpo"}, {"name": "p", "loss": "p-dpo"}])))
    with pytest.raises(SpecError, match="baseline 'dpo' is not one of the arms"):
        parse_experiment(small(arms=[{"name": "ipo", "loss": "ipo"}]))
    with pytest.raises(SpecError, match="grid.rho.0: must be <= 1|grid.bogus: unknown field"):
        parse_experiment(small(bogus=1))
    with pytest.raises(SpecError, match="quick: --quick needs a quick section"):
        parse_experiment(small(), quick=True)
    # e-dpo at alpha 0 needs rewards and p-dpo needs KL samples, but no one cell computes both for the group.
    with pytest.raises(SpecError, match="no single cell both distils rewards and has alpha > 0"):
        expand(
            parse_experiment(
                small(
                    arms=[
                        {"name": "dpo", "loss": "dpo"},
                        {"name": "e", "loss": "e-dpo"},
                        {"name": "p", "loss": "p-dpo", "alpha": [0.1]},
                    ]
                )
            )
        )


def test_the_id_follows_the_content_and_done_cells_are_skipped(tmp_path):
    plan = parse_experiment(small())
    assert experiment_id(plan) == experiment_id(parse_experiment(small()))
    assert experiment_id(plan) != experiment_id(parse_experiment(small(seeds=[0])))
    cells = expand(plan)
    (tmp_path / f"{cells[3].id}.json").write_text("{}")
    assert [c.id for c in pending_cells(cells, tmp_path)] == [c.id for c in cells if c is not cells[3]]
    write_plan(tmp_path, plan, cells)
    write_plan(tmp_path, plan, cells)  # the same experiment again: resuming is fine
    with pytest.raises(FolderInUse, match="holds experiment study-"):
        write_plan(tmp_path, parse_experiment(small(seeds=[0])), cells)
