"""An experiment spec and the grid of ordinary job specs it expands into.

One document names a base job and the axes to sweep: ρ (the induced length bias), arms (a loss and its options,
e.g. e-DPO with the `min` family), α (the forward-KL weight) and seeds. Every cell is a plain `JobSpec`; the only
things an experiment adds are the protocol that makes cells comparable, enforced here rather than trusted to the
spec's author:

- every ρ keeps the same number of training pairs (`length_bias.match_rhos` is set to the grid's ρ values),
- evaluation is the same for every cell of a seed (a fixed prompt set and sampling seed, so π_ref's samples are
  shared and cells can be compared sample by sample),
- every arm trains the same number of optimizer steps on the same batch size (`distill.max_steps` must be set),
- cells of one (ρ, seed) share the data, the reward models and the scored pairs (see `Group`).

Imports only pydantic and yaml, like `ray_jobs.spec`, so the service and the CLI expand grids without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_jobs.names import Family, Loss
from ray_jobs.spec import JobSpec, SpecError, friendly_error, parse_spec

MAX_CELLS = 1_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Arm(_Strict):
    """One training recipe compared across the grid."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=48, description="Label in tables and ids.")
    loss: Loss = Field(..., description="The arm's distill.loss (dpo, ipo, distill, e-dpo, p-dpo).")
    family: Family | None = Field(None, description="e-dpo's reduction over members; None keeps the base spec's.")
    member: int | None = Field(None, ge=0, description="distill only: one member instead of the ensemble mean.")
    alpha: list[float] | None = Field(
        None, description="This arm's α values; None = the grid's. Labelled baselines usually pin [0.0]."
    )
    generated_pairs: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Responses sampled from π_ref per training prompt whose pairs (scored by the ensemble) are "
        "added to the dataset pairs: generation.samples_per_prompt for this arm only. None keeps the base's. An arm "
        "with its own value trains on other pairs than the rest, so it is its own comparison, and computes its own.",
    )


class Grid(_Strict):
    rho: list[float] = Field(..., min_length=1, description="Induced length-bias levels (share of longer-preferred).")
    arms: list[Arm] = Field(..., min_length=1, description="The recipes compared; every one runs at every ρ and seed.")
    alpha: list[float] = Field(
        [0.0],
        min_length=1,
        description="Forward-KL weights for arms that do not pin their own. α = 0 leaves e-dpo's min and hull without "
        "a unique minimiser, so a robustness study should include an α > 0.",
    )
    seeds: list[int] = Field(
        [0],
        min_length=1,
        description="Each seed reseeds data subsampling, members, training "
        "and evaluation sampling; cells of one seed share evaluation samples.",
    )
    baseline: str = Field("dpo", description="The arm every other arm is compared with, pairwise.")

    @field_validator("rho", "alpha")
    @classmethod
    def _unique_numbers(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values):
            raise ValueError("values must be distinct")
        return values

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> Grid:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the arms {names}")
        return self


class ExperimentSpec(_Strict):
    name: str = Field(
        ...,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Names the experiment, its cells' jobs and its default results folder.",
    )
    base: dict[str, Any] = Field(
        ...,
        description="The job spec every cell starts from (its data.length_bias.rho, distill.loss, family, alpha "
        "and seeds are set per cell).",
    )
    grid: Grid = Field(..., description="The axes swept: ρ × arms × α × seeds.")
    quick: dict[str, Any] | None = Field(
        None, description="Overrides merged into {base, grid} by --quick: a small grid that runs in minutes."
    )


@dataclass(frozen=True)
class Cell:
    id: str
    rho: float
    arm: Arm
    alpha: float
    seed: int
    spec: JobSpec

    @property
    def group(self) -> tuple[float, int, int]:
        """Cells that can share data, reward models and scored pairs: same ρ, seed and generated pairs."""
        return (self.rho, self.seed, self.spec.generation.samples_per_prompt)

    def params(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "arm": self.arm.name,
            "loss": self.spec.distill.loss,
            "family": self.spec.distill.family if self.spec.distill.loss == "e-dpo" else None,
            "alpha": self.alpha,
            "seed": self.seed,
        }


@dataclass
class Group:
    """Cells of one (ρ, seed, generated pairs): they share data, reward models and scored pairs.

    The leader runs first and computes them; the others start from its job with `reuse.pairs`. The leader is a cell
    that needs everything the group needs: reward models if any cell distils them, π_ref's KL samples if any cell
    has α > 0.
    """

    rho: float
    seed: int
    generated_pairs: int
    cells: list[Cell] = field(default_factory=list)

    @property
    def needs_rewards(self) -> bool:
        return any(c.spec.needs_rewards for c in self.cells)

    @property
    def needs_kl_samples(self) -> bool:
        return any(c.alpha > 0 for c in self.cells)

    def can_lead(self, cell: Cell) -> bool:
        return (cell.spec.needs_rewards or not self.needs_rewards) and (cell.alpha > 0 or not self.needs_kl_samples)

    def ordered(self) -> list[Cell]:
        """Leaders first (stable otherwise), so the first cell run computes what the others reuse."""
        return sorted(self.cells, key=lambda c: not self.can_lead(c))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _number(value: float) -> str:
    return f"{value:g}"


def cell_id(rho: float, arm: str, alpha: float, seed: int) -> str:
    return f"rho{_number(rho)}-{arm}-a{_number(alpha)}-s{seed}"


def parse_experiment(data: Any, quick: bool = False) -> ExperimentSpec:
    """Validate an experiment document (with its quick overrides merged in when asked), naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "experiment", "message": f"must be a mapping, got {type(data).__name__}"}])
    try:
        experiment = ExperimentSpec.model_validate(data)
        if quick:
            if experiment.quick is None:
                raise SpecError([{"field": "quick", "message": "--quick needs a quick section in the experiment"}])
            merged = _merge(experiment.model_dump(exclude={"quick"}), experiment.quick)
            experiment = ExperimentSpec.model_validate({**merged, "name": f"{experiment.name}-quick"})
    except ValidationError as exc:
        raise SpecError([friendly_error(e) for e in exc.errors()]) from None
    return experiment


def load_experiment(path: str | Path, quick: bool = False) -> ExperimentSpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError([{"field": "experiment", "message": f"{path} is not valid YAML: {exc}"}]) from None
    return parse_experiment(data or {}, quick)


def _cell_spec(experiment: ExperimentSpec, rho: float, arm: Arm, alpha: float, seed: int) -> dict[str, Any]:
    base = experiment.base
    grid = experiment.grid
    data = base.get("data", {})
    distill = {**base.get("distill", {}), "loss": arm.loss, "alpha": alpha, "seed": seed}
    if arm.family is not None:
        distill["family"] = arm.family
    if arm.member is not None:
        distill["member"] = arm.member
    generation = {} if arm.generated_pairs is None else {"samples_per_prompt": arm.generated_pairs}
    bias = {**data.get("length_bias", {}), "rho": rho, "match_rhos": sorted(grid.rho)}
    evaluate = base.get("evaluate", {})
    return _merge(
        base,
        {
            "name": f"{experiment.name}-{cell_id(rho, arm.name, alpha, seed)}"[:128],
            "data": {"length_bias": bias, "seed": data.get("seed", 0) + seed},
            "ensemble": {"seed": base.get("ensemble", {}).get("seed", 0) + seed},
            "distill": distill,
            "generation": generation,
            # The same evaluation for every cell of a seed: prompts and sampling seed do not depend on the arm.
            "evaluate": {"seed": evaluate.get("seed", 0) + seed},
            "reuse": {"ensemble": None, "pairs": None},
        },
    )


def expand(experiment: ExperimentSpec) -> list[Cell]:
    """Every cell of the grid as a validated job spec; errors name the cell and the field."""
    grid = experiment.grid
    if "max_steps" not in experiment.base.get("distill", {}):
        raise SpecError(
            [{"field": "base.distill.max_steps", "message": "must be set: every arm trains the same number of steps"}]
        )
    if experiment.base.get("evaluate", {}).get("oracle", "unset") is None:
        raise SpecError([{"field": "base.evaluate.oracle", "message": "must be set: cells are compared by the oracle"}])
    cells, errors = [], []
    for seed in grid.seeds:
        for rho in grid.rho:
            for arm in grid.arms:
                for alpha in arm.alpha if arm.alpha is not None else grid.alpha:
                    cid = cell_id(rho, arm.name, alpha, seed)
                    try:
                        spec = parse_spec(_cell_spec(experiment, rho, arm, alpha, seed))
                    except SpecError as exc:
                        errors += [{"field": f"cell {cid}: {e['field']}", "message": e["message"]} for e in exc.errors]
                        continue
                    cells.append(Cell(cid, rho, arm, alpha, seed, spec))
    if errors:
        raise SpecError(errors)
    if len(cells) > MAX_CELLS:
        raise SpecError([{"field": "grid", "message": f"{len(cells)} cells; at most {MAX_CELLS}"}])
    for group in groups(cells):
        if not any(group.can_lead(c) for c in group.cells):
            raise SpecError(
                [
                    {
                        "field": "grid",
                        "message": f"cells of rho {group.rho}, seed {group.seed} need reward models and KL samples, "
                        "but no single cell both distils rewards and has alpha > 0 to compute them for the others",
                    }
                ]
            )
    return cells


def groups(cells: list[Cell]) -> list[Group]:
    """Cells by (ρ, seed, generated pairs), in grid order."""
    by_key: dict[tuple[float, int], Group] = {}
    for cell in cells:
        by_key.setdefault(cell.group, Group(*cell.group)).cells.append(cell)
    return list(by_key.values())


def experiment_id(experiment: ExperimentSpec) -> str:
    """Name plus a digest of everything that changes results: resubmitting the same document resumes it.

    Fields left at their defaults are not part of the digest, so an option added later does not orphan the results
    folders of earlier experiments.
    """
    document = experiment.model_dump(mode="json", exclude={"quick"}, exclude_defaults=True)
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:10]
    return f"{experiment.name}-{digest}"
