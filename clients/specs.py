"""The example specs, shipped inside the package (clients/examples is the checkout's examples/ folder), so
`rmdistill init` and `rmdistill demo` work from an installed package as from a checkout."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

# The job specs a user can start from, by case; examples/experiment.yaml is an experiment, not a job spec.
CASES = {
    "quickstart": "the quickstart: SmolLM2 on the built-in reviews task with a length bias, e-DPO, judged by VADER",
    "own-data": "your own preference file and a Hugging Face model folder",
    "tldr": "Reddit TL;DR summarisation preferences (OpenAI's and Google's layouts)",
    "lora": "LoRA adapters for the policy and the reward models",
    "gpu-cluster": "a Ray cluster with GPUs: shared-GPU reward models, vLLM replicas, FSDP distillation",
    "losses": "several losses distilled from the same scored pairs of an earlier job",
}


def example(case: str) -> Traversable:
    """The packaged example spec of a case (KeyError for an unknown case)."""
    if case not in CASES:
        raise KeyError(f"unknown case {case!r}; expected one of {', '.join(CASES)}")
    return files("clients") / "examples" / f"{case}.yaml"
