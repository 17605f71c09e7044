"""Every enumeration the system shares, declared once: stages, losses, families, engines, job states, hub ids.

Each is a `Literal` (what pydantic validates and type checkers read) with its values as a tuple beside it.
Imports nothing but the standard library, so the spec, the service and the clients can all use it.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

# One name per stage: the module `ray_jobs/<stage>/`, the `stage` of its events, and its folder in the job.
Stage = Literal["data", "ensemble", "generate", "score", "distill", "evaluate"]
STAGES: tuple[str, ...] = get_args(Stage)

Loss = Literal["dpo", "ipo", "distill", "e-dpo", "p-dpo"]
LOSSES: tuple[str, ...] = get_args(Loss)
# Losses that learn from the preference labels (pairs oriented chosen-first); the others distil rewards.
LABELLED_LOSSES = frozenset({"dpo", "ipo", "p-dpo"})

# e-dpo's reduction over the ensemble (PAPER.md §2.4).
Family = Literal["min", "example_min", "mean", "hull"]
FAMILIES: tuple[str, ...] = get_args(Family)

# Generation engines: auto = vLLM when it loads the model, else transformers' generate.
Engine = Literal["auto", "vllm", "hf"]
ENGINES: tuple[str, ...] = get_args(Engine)

# Compute precision: auto = bf16 autocast on GPUs and on CPUs with bf16 units, fp32 on other CPUs
# (ray_jobs.precision); bf16 = bf16 autocast everywhere; fp32 = none. Weights stay fp32 in every case: the
# optimizer updates fp32 master weights.
Precision = Literal["auto", "fp32", "bf16"]

Diversity = Literal["seed", "bootstrap", "disjoint"]
Pairing = Literal["all", "random"]
DataFormat = Literal["auto", "standard", "implicit", "conversational", "unlabeled", "tldr_openai", "tldr_vertex"]

# queued: recorded, waiting for a running slot (the service's queue); nothing is on Ray yet.
JobState = Literal["queued", "pending", "running", "cancelling", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

# Model references that are not paths: built-ins and tiny test models carry a prefix; anything else shaped like
# `org/name` (or `name`) is a Hugging Face hub id.
MODEL_PREFIXES = ("builtin:", "tiny:")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
