"""The job spec: one document for REST, CLI and the driver.

Imports only pydantic and yaml so the service and the clients can validate specs without torch or Ray.
Every field has a default, so `JobSpec()` is the quickstart-shaped job; unknown fields and impossible values
raise `SpecError` whose messages name the field path (``distill.beta: must be > 0``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ray_jobs.names import LABELLED_LOSSES, DataFormat, Diversity, Engine, Family, Loss, Pairing, Precision

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]

# Upper bounds: generous for any real job, but a spec cannot ask for what no cluster could ever hold (a job that
# would wait forever, or allocate without limit, is refused at submission, naming the field).
MAX_ROWS = 10_000_000
MAX_EPOCHS = 1_000
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_ACCUM = 4_096
MAX_TOKENS = 131_072
MAX_NEW_TOKENS = 32_768
MAX_WORKERS = 1_024
MAX_SAMPLES = 64
MAX_RANK = 1_024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LengthBias(_Strict):
    """The paper's induced length shift (PAPER.md §4.1), applied to the training split only.

    The test split is cut by prompt first and stays as the data had it, so held-out numbers never see the bias.
    """

    rho: float = Field(0.8, ge=0.0, le=1.0, description="Fraction of kept pairs whose longer response is preferred.")
    min_ratio: float = Field(
        1.1, ge=1.0, description="Pairs count as length-different when longer/shorter >= this ratio."
    )
    match_rhos: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=list,
        max_length=64,
        description="Keep as many pairs as every rho in this list could keep (the largest common size), so jobs of "
        "a rho sweep differ in bias and not in training-set size. Empty: as many as this rho allows.",
    )
    similar_length: Literal["drop", "keep"] = Field(
        "drop",
        description="Pairs below min_ratio carry no length signal: drop them (the paper) or keep them all, the same "
        "ones for every rho, on top of the biased subset.",
    )


class LoraSpec(_Strict):
    r: PositiveInt = Field(16, le=MAX_RANK, description="LoRA rank.")
    alpha: PositiveFloat = Field(32.0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability on the LoRA path; 0 = none.")
    target_modules: list[str] | None = Field(None, description="Module names to adapt; None lets PEFT choose.")


class ColumnMap(_Strict):
    """Your dataset's column names for the fields rmdistill reads; a field left unset keeps its usual name."""

    prompt: str | None = Field(None, description="Column holding the prompt (read as `prompt`).")
    chosen: str | None = Field(None, description="Column holding the preferred response (read as `chosen`).")
    rejected: str | None = Field(None, description="Column holding the dispreferred response (read as `rejected`).")
    response_a: str | None = Field(None, description="Column holding an unranked pair's first response.")
    response_b: str | None = Field(None, description="Column holding an unranked pair's second response.")
    label: str | None = Field(
        None, description="Column holding the label of response_a/response_b pairs (1 = a preferred, 0 = b, null)."
    )


# Sources that are one file (by their suffix) or the built-in task: no file selection applies to them.
_ONE_FILE = re.compile(r"^builtin:|\.(jsonl|json|parquet|csv)(\.gz)?$", re.IGNORECASE)
# Sources that cannot be hub datasets (paths and the built-in task): hub-only options refuse them.
_NOT_HUB = re.compile(r"^[/.~]|" + _ONE_FILE.pattern, re.IGNORECASE)


class DataSpec(_Strict):
    source: str = Field(
        "builtin:reviews",
        description="builtin:reviews, a local .jsonl/.json/.parquet/.csv(.gz) file or save_to_disk folder, "
        "or a Hugging Face hub id.",
    )
    format: DataFormat = Field("auto", description="Row format; auto detects it from the columns.")
    split: str = Field("train", description="Split to read from a hub dataset or a DatasetDict folder.")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of prompts held out (split by prompt).")
    seed: int = Field(
        0, description="Seeds the train/test split by prompt hash and the subsampling of max_pairs and length_bias."
    )
    apply_chat_template: bool = Field(
        True, description="Render prompts with the reference tokenizer's chat template when it has one."
    )
    on_error: Literal["fail", "skip"] = Field("fail", description="What a malformed row does: fail the job or skip.")
    max_pairs: PositiveInt | None = Field(
        None,
        le=MAX_ROWS,
        description="Keep at most this many training pairs (the test split is cut first and not capped).",
    )
    relabel: str | None = Field(
        None,
        description="Relabel every pair with this oracle before the split and the bias (builtin:vader or a "
        "reward-model path), so the oracle that judges the policy also labels its data, as in the paper. Ties are "
        "dropped.",
    )
    num_prompts: PositiveInt = Field(
        200, le=MAX_ROWS, description="builtin:reviews only: how many of its prompts to sample candidates for."
    )
    candidates_per_prompt: int = Field(
        3,
        ge=2,
        le=MAX_SAMPLES,
        description="builtin:reviews only: responses sampled from the reference per prompt; every two of them make "
        "a pair (3 → 3 pairs). Independent of generation.samples_per_prompt, which adds generated pairs for training.",
    )
    length_bias: LengthBias | None = Field(
        None, description="The paper's induced length bias on the training split; None leaves the labels as they are."
    )
    config: str | None = Field(
        None,
        description="Hub datasets only: the configuration (subset) to load, as datasets.load_dataset's `name` "
        "(e.g. comparisons for openai/summarize_from_feedback). None: the dataset's default.",
    )
    revision: str | None = Field(
        None, description="Hub datasets only: the branch, tag or commit to load. None: the default branch."
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None,
        description="Which files to read, as glob patterns: relative to a folder data.source (JSON Lines, JSON, "
        "Parquet or CSV files, optionally .gz), or within a hub dataset. A mapping {split: patterns} names each "
        "split's files and data.split picks one. None: a folder must be a save_to_disk folder; a hub dataset reads "
        "its own file layout.",
    )
    columns: ColumnMap | None = Field(
        None, description="Your names for the columns rmdistill reads (prompt, chosen, rejected, ...)."
    )
    max_prompt_tokens: PositiveInt | None = Field(
        None,
        le=MAX_TOKENS,
        description="Prompt budget in the reference tokenizer's tokens, counted on the rendered prompt (chat "
        "template included). Longer prompts are cut or dropped (long_prompts); data/summary.json counts them. "
        "None: no budget.",
    )
    long_prompts: Literal["truncate", "drop"] = Field(
        "truncate",
        description="What max_prompt_tokens does to a longer prompt: truncate keeps its last max_prompt_tokens "
        "tokens (the end holds the question and the turn the response follows); drop removes the pair.",
    )

    @field_validator("config", "revision")
    @classmethod
    def _hub_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source", "")
        if value is not None and _NOT_HUB.search(source):
            raise ValueError(f"applies to hub datasets only; data.source {source!r} is not one")
        return value

    @field_validator("data_files")
    @classmethod
    def _files_of_a_collection(cls, value: Any, info: ValidationInfo) -> Any:
        source = info.data.get("source", "")
        if value is not None and _ONE_FILE.search(source):
            raise ValueError(f"selects files of a folder or a hub dataset; data.source {source!r} is a single file")
        if isinstance(value, list | dict) and not value:
            raise ValueError("names no files")
        return value

    @field_validator("columns")
    @classmethod
    def _columns_of_user_data(cls, value: ColumnMap | None, info: ValidationInfo) -> ColumnMap | None:
        if value is not None and info.data.get("source") == "builtin:reviews":
            raise ValueError("builtin:reviews has no columns to rename")
        return value

    @field_validator("long_prompts")
    @classmethod
    def _needs_a_budget(cls, value: str, info: ValidationInfo) -> str:
        # The default (truncate) must pass: a dumped spec names every field, and it must validate again.
        if value == "drop" and info.data.get("max_prompt_tokens") is None:
            raise ValueError("drop has nothing to act on without data.max_prompt_tokens")
        return value


class MemberOverride(_Strict):
    """Per-member changes, so one family can mix backbones, learning rates or LoRA ranks."""

    backbone: str | None = Field(None, description="This member's backbone; None = ensemble.backbone.")
    lr: PositiveFloat | None = Field(None, description="This member's learning rate; None = ensemble.lr.")
    lora_r: PositiveInt | None = Field(
        None, description="This member's LoRA rank (needs ensemble.lora); None = ensemble.lora.r."
    )
    seed: int | None = Field(None, description="This member's init and data-order seed; None = ensemble.seed + k.")
    model: str | None = Field(
        None,
        description="A reward model you already have, used as this member as it is (not trained): a local folder "
        "or hub id of a sequence-classification model with one output (num_labels = 1), such as TRL's "
        "RewardTrainer saves. It reads (prompt, response) as trained members do and is scored at "
        "ensemble.max_length; its held-out accuracy is measured like theirs. None: the member is trained.",
    )
    input: Literal["auto", "pair", "text"] = Field(
        "auto",
        description="How the given model reads a (prompt, response). pair: an encoder's text pair ([CLS] prompt "
        "[SEP] response [SEP]), as rmdistill trains encoders; text: the one text prompt + response + EOS token "
        "through its tokenizer, special tokens included, as TRL's RewardTrainer trains any model; auto: pair for "
        "encoders, prompt + response + EOS for causal LMs, as rmdistill trains them.",
    )

    @model_validator(mode="after")
    def _given_is_not_trained(self) -> MemberOverride:
        training = [name for name in ("backbone", "lr", "lora_r", "seed") if getattr(self, name) is not None]
        if self.model is not None and training:
            raise ValueError(f"model is a reward model used as it is: {', '.join(training)} would train it")
        if self.model is None and self.input != "auto":
            raise ValueError("input applies to a given model: a trained member reads its inputs as rmdistill trains")
        return self


class EnsembleSpec(_Strict):
    size: int = Field(3, ge=0, le=64, description="Number of reward models K; 0 skips the ensemble stage.")
    backbone: str = Field("builtin:minilm-l6", description="Encoder or causal LM under a scalar reward head.")
    diversity: Diversity = Field(
        "bootstrap",
        description="How members differ: seed (all rows, own init and order), bootstrap (n rows drawn with "
        "replacement per member), disjoint (each member its own share of the rows).",
    )
    members: list[MemberOverride] = Field(default_factory=list, description="Overrides for member 0, 1, ...")
    epochs: PositiveInt = Field(2, le=MAX_EPOCHS, description="Passes over each member's training rows.")
    lr: PositiveFloat = Field(2.0e-5, description="AdamW learning rate of every member (constant).")
    batch_size: PositiveInt = Field(16, le=MAX_BATCH, description="Pairs per micro-batch, per worker.")
    gradient_accumulation_steps: PositiveInt = Field(
        1, le=MAX_ACCUM, description="Micro-batches summed into each optimizer step (1 = none)."
    )
    max_length: int = Field(
        256, ge=8, le=MAX_TOKENS, description="Token budget of prompt + response; members score at it too."
    )
    margin: float = Field(0.0, ge=0.0, description="Constant margin m in -log σ(r_w - r_l - m).")
    center_rewards_coefficient: float = Field(0.0, ge=0.0, description="Weight of the (r_w + r_l)² penalty.")
    precision: Precision = Field(
        "auto",
        description="Compute precision of member training: auto = bf16 autocast on GPUs and on CPUs with bf16 "
        "units (AVX512-BF16, AMX, Arm BF16), fp32 on other CPUs.",
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of training prompts (by prompt hash) each member holds out to choose its epoch; the saved "
        "weights are the chosen epoch's. 0 keeps the last epoch. The test split is never used to choose.",
    )
    early_stopping_patience: PositiveInt | None = Field(
        None, description="Stop a member after this many epochs without a lower validation loss."
    )
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters on the backbone; None = full fine-tuning.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: less memory "
        "for longer texts or larger backbones, about a third more compute. Off: activations are kept.",
    )
    seed: int = Field(0, description="Member k's seed is seed + k (head init, data order, bootstrap draw).")
    workers_per_member: PositiveInt = Field(
        1,
        le=MAX_WORKERS,
        description="Data-parallel workers per member; more than 1 makes each member a Ray Train run.",
    )
    cpus_per_worker: PositiveFloat = Field(
        1.0,
        le=MAX_WORKERS,
        description="CPUs each member worker reserves; it computes with floor(this) torch threads, at least 1. "
        "Fractions let several members train at once on few cores.",
    )
    gpus_per_worker: float = Field(0.0, ge=0.0, le=64, description="Fractions let several members share one GPU.")
    max_concurrent: PositiveInt | None = Field(None, description="Members trained at once; None = all that fit.")
    max_retries: int = Field(1, ge=0, description="Retries of a failed member before the stage fails.")

    @model_validator(mode="after")
    def _members_fit(self) -> EnsembleSpec:
        if len(self.members) > self.size:
            raise ValueError(f"members has {len(self.members)} overrides but size is {self.size}")
        return self

    @property
    def given(self) -> dict[int, str]:
        """The members that are reward models the user brought (member index → model reference)."""
        return {k: m.model for k, m in enumerate(self.members) if m.model is not None}

    @property
    def trained(self) -> list[int]:
        """The members this stage fits."""
        return [k for k in range(self.size) if k not in self.given]


class GenerationSpec(_Strict):
    engine: Engine = Field("auto", description="auto = vLLM when it loads, else HF generate.")
    samples_per_prompt: int = Field(
        2, ge=0, le=MAX_SAMPLES, description="Responses sampled from π_ref per prompt (0 = none)."
    )
    pairing: Pairing = Field("all", description="All distinct pairs per prompt, or one random pair.")
    max_new_tokens: PositiveInt = Field(
        48, le=MAX_NEW_TOKENS, description="Token cap of each sampled response; a response cut there is `capped`."
    )
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 1 = π_ref's own distribution, 0 = greedy."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = no truncation.")
    seed: int = Field(0, description="Sampling seed; with the prompt's position it fixes each prompt's samples.")
    max_prompts: PositiveInt | None = Field(
        None, le=MAX_ROWS, description="Sample for at most this many training prompts."
    )
    include_dataset_pairs: bool = Field(True, description="Also distil on the dataset's own pairs.")
    capped: Literal["keep", "drop"] = Field(
        "keep",
        description="Sampled responses cut at max_new_tokens: keep (scored and trained without EOS, since π_ref did "
        "not choose to stop there) or drop them from the pairs and the KL samples. Counts are reported either way.",
    )
    kl_samples_per_prompt: int = Field(
        1,
        ge=0,
        le=MAX_SAMPLES,
        description="π_ref samples per prompt for the forward-KL term (used when distill.alpha > 0). They are drawn "
        "at temperature 1 and top_p 1 whatever the candidates' settings: the term estimates KL under π_ref itself.",
    )
    replicas: PositiveInt = Field(
        1, le=MAX_WORKERS, description="Generation engines run in parallel (one per GPU or CPU worker)."
    )
    batch_size: PositiveInt = Field(16, le=MAX_BATCH, description="Prompts sent to an engine per call.")
    max_model_len: PositiveInt = Field(
        1024,
        le=MAX_TOKENS,
        description="Tokens of prompt + response an engine holds per sequence (vLLM's max_model_len).",
    )


class ScoreSpec(_Strict):
    batch_size: PositiveInt = Field(16, le=MAX_BATCH, description="Texts per scoring batch (rewards and log π_ref).")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="Token budget of prompt + response when scoring.")
    replicas: PositiveInt = Field(
        1,
        le=MAX_WORKERS,
        description="Scoring actors, each holding π_ref and every member (one per CPU or GPU worker).",
    )
    precision: Precision = Field(
        "auto",
        description="Compute precision of the reward models' forward when they score the pairs: auto = bf16 "
        "autocast on GPUs and on CPUs with bf16 units, else fp32; bf16; fp32. π_ref's log-probs follow "
        "distill.precision instead, so that h = 0 at the first step. Scoring trains nothing, so it has no gradient "
        "checkpointing.",
    )


class DistillSpec(_Strict):
    loss: Loss = Field(
        "e-dpo",
        description="dpo, ipo (labels), distill (one reward model or the ensemble mean), e-dpo (the ensemble, "
        "pessimistically), p-dpo (dpo + alpha·forward KL).",
    )
    beta: PositiveFloat = Field(0.1, description="KL strength β of the implicit reward β·log(π/π_ref).")
    alpha: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the forward KL(π_ref‖π) term, estimated on π_ref samples; > 0 for p-dpo. With alpha = 0 "
        "e-dpo's min and hull have no unique minimiser on pairs every member can fit exactly (each member's optimum "
        "has zero loss), so which member wins depends on the data and the optimiser: sweep alpha in experiments.",
    )
    family: Family = Field(
        "min",
        description="e-dpo's reduction over members: min (the member whose loss on the optimizer step's batch is "
        "least), example_min (per pair), mean (the ensemble-mean reward), hull (the least-loss mixture).",
    )
    member: int | None = Field(
        None, ge=0, description="distill only: the reward-model member to distil from; None = ensemble mean."
    )
    epochs: PositiveInt = Field(1, le=MAX_EPOCHS, description="Passes over the pairs (unless max_steps stops first).")
    max_steps: PositiveInt | None = Field(None, le=MAX_STEPS, description="Stop after this many optimizer steps.")
    lr: PositiveFloat = Field(5.0e-6, description="AdamW peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup (transformers' get_scheduler)."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0; 0 = none.")
    batch_size: PositiveInt = Field(8, le=MAX_BATCH, description="Pairs per micro-batch, per worker.")
    gradient_accumulation_steps: PositiveInt = Field(
        1, le=MAX_ACCUM, description="Micro-batches summed into each optimizer step (1 = none)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm; None = no clipping.")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="Token budget of prompt + response.")
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters (saved as distill.policy_format says); None = full fine-tuning."
    )
    policy_format: Literal["merged", "adapter", "both"] = Field(
        "merged",
        description="How a LoRA policy is saved in distill/: merged (a whole model, LoRA folded in), adapter (the "
        "PEFT adapter alone, loaded on top of the reference with PEFT; rmdistill merges it when it serves or "
        "evaluates it), or both (the merged model, and the adapter in distill/adapter/). adapter and both need "
        "distill.lora.",
    )
    num_workers: PositiveInt = Field(1, le=MAX_WORKERS, description="Ray Train data-parallel workers.")
    cpus_per_worker: PositiveFloat | None = Field(
        None,
        le=MAX_WORKERS,
        description="CPUs each training worker reserves and computes with (its torch threads: the floor, at least "
        "1). None: each worker reserves 1 CPU, as Ray Train does, and computes with the largest node's CPUs shared "
        "evenly among the workers, so a lone worker uses the whole machine without waiting for it to be free.",
    )
    use_gpu: bool = Field(False, description="One GPU per training worker; False trains on CPUs.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How workers share the model: ddp (a full copy each) or fsdp (sharded)."
    )
    precision: Precision = Field(
        "auto",
        description="Compute precision of the policy's forward (and of π_ref's log-probs at scoring): auto = bf16 "
        "autocast on GPUs and on CPUs with bf16 units, fp32 on other CPUs; bf16 = bf16 autocast everywhere; fp32. "
        "Weights stay fp32.",
    )
    compile: bool = Field(False, description="torch.compile the policy.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: less memory "
        "for longer texts or larger policies, about a third more compute. Off: activations are kept.",
    )
    checkpoint_every: PositiveInt = Field(50, le=MAX_STEPS, description="Save a resumable checkpoint every N steps.")
    log_every: PositiveInt = Field(
        1, le=MAX_STEPS, description="Optimizer steps per metrics event (means over the window; the last step always)."
    )
    max_failures: int = Field(2, ge=0, description="Worker restarts Ray Train may make, resuming from checkpoints.")
    seed: int = Field(0, description="Seeds the policy's pair order and any dropout.")

    @field_validator("policy_format")
    @classmethod
    def _adapters_need_lora(cls, value: str, info: ValidationInfo) -> str:
        if value != "merged" and info.data.get("lora") is None:
            raise ValueError(f"{value} saves a LoRA adapter: set distill.lora")
        return value

    @model_validator(mode="after")
    def _alpha_for_pdpo(self) -> DistillSpec:
        if self.loss == "p-dpo" and self.alpha <= 0:
            raise ValueError("loss p-dpo needs alpha > 0 (with alpha = 0 it is plain dpo)")
        return self


class EvaluateSpec(_Strict):
    oracle: str | None = Field("builtin:vader", description="builtin:vader, a reward-model path, or None to skip.")
    prompts: str = Field(
        "auto",
        description="Where evaluation prompts come from: held_out (the data stage's test split), builtin:reviews "
        "(a fixed set of 200 review prompts whose subjects never occur in builtin:reviews' training prompts), a "
        ".txt file with one prompt per line, or auto (builtin:reviews for that source, else held_out). A fixed set "
        "keeps evaluation the same for every job of a sweep, whatever the data's bias or split.",
    )
    num_prompts: PositiveInt = Field(64, le=MAX_ROWS, description="The first this-many prompts of that set.")
    samples_per_prompt: PositiveInt = Field(
        1, le=MAX_SAMPLES, description="Samples per prompt from the policy and from π_ref, compared one to one."
    )
    kl_prompts: PositiveInt | None = Field(
        None,
        le=MAX_ROWS,
        description="Estimate KL(π‖π_ref) on the samples of the first this-many prompts only (None = all): two "
        "models' log-probs over every sample cost more than the sampling itself on CPUs.",
    )
    chosen_pairs: int = Field(
        64,
        ge=0,
        le=MAX_ROWS,
        description="Training pairs on which to report log π(chosen) − log π_ref(chosen) (0 = skip): DPO is known to "
        "push it down even as it fits the labels.",
    )
    max_new_tokens: PositiveInt = Field(48, le=MAX_NEW_TOKENS, description="Token cap of each evaluation sample.")
    temperature: float = Field(
        0.7, ge=0.0, description="Sampling temperature of the policy and π_ref alike (top_p 1); 0 = greedy."
    )
    seed: int = Field(
        0, description="Evaluation sampling seed: the same seed gives π_ref the same samples in every job."
    )


class MlflowSpec(_Strict):
    """Log the job's training metrics to MLflow. Credentials come only from the environment
    (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""

    tracking_uri: str | None = Field(
        None,
        description="Where runs go: a tracking server URL or a local store such as sqlite:////path/mlflow.db. "
        "None: the SQLite file mlflow.db in the data home (RMDISTILL_HOME), a local store that needs no server. "
        "Through the service a SQLite file must lie in the data roots (a relative path: in your data area) and no "
        "other local store is taken.",
    )
    experiment: str = Field(
        "rmdistill", min_length=1, max_length=256, description="MLflow experiment the runs are filed under."
    )


class WandbSpec(_Strict):
    """Log the job's training metrics to Weights & Biases. The API key, for online mode only, comes only from the
    environment (WANDB_API_KEY)."""

    project: str = Field("rmdistill", min_length=1, max_length=128, description="W&B project of the runs.")
    entity: str | None = Field(None, description="W&B team or user; None: the API key's default.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline writes runs into the job folder (wandb/), to upload later with `wandb sync`; online "
        "sends them to the W&B server as they run.",
    )


class TrackingSpec(_Strict):
    """Where training metrics go besides the job's event log. Every tracker run is named and tagged with the job id
    (the job folder's name) and its stage."""

    tensorboard: bool = Field(
        True, description="Write TensorBoard event files for every training stage into the job's tensorboard/."
    )
    mlflow: MlflowSpec | None = Field(None, description="Also log to MLflow (through Ray's MLflow integration).")
    wandb: WandbSpec | None = Field(None, description="Also log to W&B (through Ray's W&B integration).")


class ReuseSpec(_Strict):
    """Start from an earlier job's artifacts instead of recomputing them (a job id or a job folder)."""

    ensemble: str | None = Field(
        None, description="Take the reward models (ensemble/) of this job; None = fit them (if the loss needs them)."
    )
    pairs: str | None = Field(
        None,
        description="Take the scored pairs (and data, generations, ensemble) of this job, e.g. to distil several "
        "losses from the same pairs; None = compute them.",
    )


class JobSpec(_Strict):
    name: str = Field(
        "job",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="A label for listings and filters (not unique; the service gives each job its own id).",
    )
    reference: str = Field("builtin:smollm2-135m", description="π_ref and the policy's starting point.")
    data: DataSpec = Field(default_factory=DataSpec, description="The data stage: preference pairs in, split, biased.")
    ensemble: EnsembleSpec = Field(
        default_factory=EnsembleSpec, description="The ensemble stage: K Bradley-Terry reward models."
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="The generate stage: responses sampled from π_ref."
    )
    score: ScoreSpec = Field(
        default_factory=ScoreSpec, description="The score stage: every response scored by every member, and log π_ref."
    )
    distill: DistillSpec = Field(default_factory=DistillSpec, description="The distill stage: training the policy.")
    evaluate: EvaluateSpec = Field(
        default_factory=EvaluateSpec, description="The evaluate stage: oracle win rate against π_ref, KL, lengths."
    )
    reuse: ReuseSpec = Field(default_factory=ReuseSpec, description="Start from an earlier job's artifacts.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers: TensorBoard (on by default), MLflow, W&B."
    )

    @model_validator(mode="after")
    def _ensemble_for_distillation(self) -> JobSpec:
        needs_rewards = self.distill.loss not in LABELLED_LOSSES
        if needs_rewards and self.ensemble.size == 0 and self.reuse.ensemble is None and self.reuse.pairs is None:
            raise ValueError(f"ensemble.size must be >= 1 for loss {self.distill.loss} (it distils reward models)")
        if self.distill.member is not None and self.distill.member >= max(self.ensemble.size, 1):
            raise ValueError(f"distill.member {self.distill.member} is not below ensemble.size {self.ensemble.size}")
        return self

    @property
    def needs_rewards(self) -> bool:
        return self.distill.loss not in LABELLED_LOSSES

    @property
    def trains_ensemble(self) -> bool:
        """Whether the ensemble stage fits reward models (not when the loss needs none or they are reused)."""
        return self.needs_rewards and self.ensemble.size > 0 and not (self.reuse.ensemble or self.reuse.pairs)


class SpecError(ValueError):
    """A spec that cannot run; `errors` lists ``{"field": "a.b", "message": ...}`` for API bodies."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def friendly_error(err: dict[str, Any]) -> dict[str, str]:
    """One pydantic error as {field: dotted path, message: what is wrong} for API bodies."""
    field = ".".join(str(p) for p in err["loc"]) or "spec"
    kind, ctx = err["type"], err.get("ctx") or {}
    messages = {
        "extra_forbidden": "unknown field",
        "greater_than": f"must be > {ctx.get('gt')}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "less_than": f"must be < {ctx.get('lt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
    }
    message = messages.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    return {"field": field, "message": message}


def parse_spec(data: Any) -> JobSpec:
    """Validate a mapping (parsed YAML/JSON) into a JobSpec, raising SpecError that names each bad field."""
    if isinstance(data, JobSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": f"must be a mapping, got {type(data).__name__}"}])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([friendly_error(e) for e in exc.errors()]) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a spec from a .yaml/.yml or .json file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError([{"field": "spec", "message": f"{path} is not valid YAML: {exc}"}]) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError([{"field": "spec", "message": f"{path} is not valid JSON: {exc}"}]) from None
    return parse_spec(data or {})
