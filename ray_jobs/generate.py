"""Generation stage: sample responses from the reference policy π_ref.

vLLM runs as Ray Data batch inference (an actor pool where every actor owns one engine); transformers' `generate`
is the fallback where vLLM cannot load the model, and the in-process path where Ray is not running.

`ray.data.llm` (vLLMEngineProcessorConfig) was considered and not used: its engine stage reserves one GPU per
replica unless given a hand-written placement group, drives vLLM's async engine, and has not been checked against
the CPU build pinned here. A `map_batches` actor that owns a plain `vllm.LLM` runs unchanged on CPU and GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs.artifacts import staging
from ray_jobs.events import EventLog
from ray_jobs.spec import GenerationSpec, JobSpec

ENGINES = ("auto", "vllm", "hf")
# KV cache in GiB for CPU engines; vLLM's CPU default (4 GiB per engine) is too much for small shared machines.
_DEFAULT_CPU_KVCACHE_GIB = "1"
CANDIDATES_SCHEMA = pa.schema([("prompt", pa.string()), ("responses", pa.list_(pa.string()))])
KL_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])


def _prompt_seed(seed: int, index: int, n: int) -> int:
    # Derived from the prompt's position, not from the batch or the actor that served it: vLLM (a seed per request,
    # seed + j for its j-th completion) then samples the same texts for any batch size or replica count, and no
    # two prompts share a random stream. transformers seeds once per batch, from the batch's first prompt.
    return seed + index * max(n, 1)


class VLLMPredictor:
    """Ray Data actor: one vLLM engine, loaded once, sampling `n` completions for each prompt in a batch."""

    def __init__(
        self,
        model: str,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        max_model_len: int,
        dtype: str = "auto",
        bind_threads: bool = True,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _DEFAULT_CPU_KVCACHE_GIB)
        if not bind_threads:
            # vLLM's CPU auto-binding pins every engine on a node to the same cores; with several replicas per
            # node, leave placement to the OS and the thread count to Ray (OMP_NUM_THREADS = the actor's CPUs).
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # The actor is already a dedicated process: running the engine core and its worker in it too saves two
        # process spawns (each re-imports vLLM) and leaves no grandchildren to outlive the actor.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self._vllm = vllm
        self.n, self.max_new_tokens, self.temperature, self.top_p, self.seed = (
            n,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        )
        self.llm = vllm.LLM(
            model=model,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=True,
            distributed_executor_backend="uni",
            disable_log_stats=True,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        params = [
            self._vllm.SamplingParams(
                n=self.n,
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_new_tokens,
                seed=_prompt_seed(self.seed, int(i), self.n),
            )
            for i in batch["index"]
        ]
        outputs = self.llm.generate([str(p) for p in batch["prompt"]], params, use_tqdm=False)
        completions = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        return pd.DataFrame(
            {
                "index": batch["index"],
                "responses": [[c.text for c in cs] for cs in completions],
                "num_tokens": [[len(c.token_ids) for c in cs] for cs in completions],
            }
        )

    def __del__(self) -> None:
        # Frees the KV cache now rather than at interpreter exit (and ends the engine-core process when vLLM was
        # told to run one).
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()


class HFPredictor:
    """Ray Data actor (or in-process helper): transformers `generate` with the same output format as vLLM."""

    def __init__(
        self,
        model: str,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        batch_size: int = 16,
    ):
        from ray_jobs.models.registry import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model)
        self.n, self.max_new_tokens, self.temperature, self.top_p, self.seed, self.batch_size = (
            n,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            batch_size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        from ray_jobs.models.hf_generate import hf_generate

        responses = hf_generate(
            self.model,
            self.tokenizer,
            [str(p) for p in batch["prompt"]],
            n=self.n,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=_prompt_seed(self.seed, int(batch["index"][0]), self.n),
            batch_size=self.batch_size,
        )
        # hf_generate returns text only: re-encoding counts tokens exactly for ordinary text, approximately where
        # decoding was lossy (partial UTF-8 bytes from a random model).
        num_tokens = [
            [len(ids) for ids in self.tokenizer(list(r), add_special_tokens=False)["input_ids"]] for r in responses
        ]
        return pd.DataFrame(
            {"index": batch["index"], "responses": [list(r) for r in responses], "num_tokens": num_tokens}
        )


@dataclass
class Generation:
    texts: list[list[str]]  # n completions per prompt, in prompt order
    num_tokens: list[list[int]]  # generated tokens of each completion
    engine: str  # "vllm", "hf", or "none" when nothing was asked for


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed here, or its engine could not load the model."""


_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): *(.*)$", re.MULTILINE)
_WRAPPERS = ("UserCodeException", "RayTaskError", "RayActorError")


def _describe_failure(err: BaseException) -> str:
    # Ray Data wraps the actor's exception and its cause does not survive the trip back to the driver; only the
    # remote traceback text, whose last non-wrapper exception line is the engine's own error, does.
    found = [m for m in _EXCEPTION_LINE.finditer(str(err)) if not m.group(1).endswith(_WRAPPERS)]
    if found:
        return f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2).strip()[:300]}"
    return f"{type(err).__name__}: {str(err).strip()[-300:]}"


def _max_model_len(model: str, requested: int) -> int:
    # vLLM refuses a max_model_len above the model's own position limit; clamp instead of failing on small models.
    config = Path(model) / "config.json"
    if not config.is_file():
        return requested
    limit = json.loads(config.read_text()).get("max_position_embeddings")
    return min(requested, int(limit)) if limit else requested


def _run_ray_data(
    predictor: type,
    kwargs: dict[str, Any],
    prompts: list[str],
    *,
    replicas: int,
    batch_size: int,
    events: EventLog | None,
    stage: str | None,
) -> tuple[list[list[str]], list[list[int]]]:
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    ds = ray.data.from_items([{"index": i, "prompt": p} for i, p in enumerate(prompts)])
    out = ds.map_batches(
        predictor,
        fn_constructor_kwargs=kwargs,
        concurrency=replicas,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=gpus,
    )
    texts: list[list[str]] = [[] for _ in prompts]
    num_tokens: list[list[int]] = [[] for _ in prompts]
    returned = np.zeros(len(prompts), dtype=bool)
    for batch in out.iter_batches(batch_size=None, batch_format="pandas"):
        for index, responses, counts in zip(batch["index"], batch["responses"], batch["num_tokens"], strict=True):
            texts[int(index)], num_tokens[int(index)] = [str(r) for r in responses], [int(c) for c in counts]
            returned[int(index)] = True
        if events is not None:
            events.progress(stage or "samples", int(returned.sum()), len(prompts), what="prompts generated")
    if not returned.all():
        missing = np.flatnonzero(~returned)
        raise RuntimeError(f"generation returned nothing for {missing.size} prompts (first: row {missing[0]})")
    return texts, num_tokens


def generate(
    model_ref: str | Path,
    prompts: list[str],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    engine: str = "auto",
    replicas: int = 1,
    events: EventLog | None = None,
    stage: str | None = None,
    batch_size: int = 16,
    max_model_len: int = 1024,
) -> Generation:
    """`generate_texts` with token counts and the engine that produced the texts."""
    import ray

    from ray_jobs.models.registry import resolve_model_path

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not prompts or n == 0:
        return Generation([[] for _ in prompts], [[] for _ in prompts], "none")
    model = str(resolve_model_path(model_ref))
    sampling = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    if not ray.is_initialized():
        if engine == "vllm":
            raise VLLMUnavailableError("engine 'vllm' runs through Ray Data: initialise Ray first (ray.init)")
        predictor = HFPredictor(model, batch_size=batch_size, **sampling)
        frame = predictor({"index": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object)})
        return Generation(list(frame["responses"]), list(frame["num_tokens"]), "hf")

    run = dict(replicas=replicas, batch_size=batch_size, events=events, stage=stage)
    if engine in ("vllm", "auto"):
        reason = None
        if importlib.util.find_spec("vllm") is None:
            reason = "vLLM is not installed (pip install 'rmdistill[vllm]')"
        else:
            try:
                kwargs = dict(
                    model=model,
                    max_model_len=_max_model_len(model, max_model_len),
                    bind_threads=replicas == 1,
                    **sampling,
                )
                return Generation(*_run_ray_data(VLLMPredictor, kwargs, prompts, **run), "vllm")
            except Exception as err:  # auto falls back on any engine failure, and says why
                reason = f"vLLM could not run {model}: {_describe_failure(err)}"
        if engine == "vllm":
            raise VLLMUnavailableError(reason)
        if events is not None:
            events.emit("log", stage, message=f"falling back to transformers generate: {reason}")
    hf_kwargs = dict(model=model, batch_size=batch_size, **sampling)
    return Generation(*_run_ray_data(HFPredictor, hf_kwargs, prompts, **run), "hf")


def generate_texts(model_ref: str | Path, prompts: list[str], n: int, **options: Any) -> list[list[str]]:
    """Sample `n` completions (new text only) for each already-rendered prompt, in prompt order.

    Takes `generate`'s options. With Ray running, generation is Ray Data batch inference over `replicas` actors:
    vLLM engines for engine "vllm" or "auto" (auto falls back to transformers with a `log` event when vLLM is
    missing or cannot load the model), transformers for "hf". Without Ray it runs transformers in this process.
    """
    return generate(model_ref, prompts, n, **options).texts


def generate_with_spec(
    model_ref: str | Path,
    prompts: list[str],
    n: int,
    gen: GenerationSpec,
    events: EventLog | None = None,
    stage: str | None = None,
) -> Generation:
    """`generate` with the sampling, engine and batching settings of a job's `generation` section."""
    return generate(
        model_ref,
        prompts,
        n,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        seed=gen.seed,
        engine=gen.engine,
        replicas=gen.replicas,
        events=events,
        stage=stage,
        batch_size=gen.batch_size,
        max_model_len=gen.max_model_len,
    )


def _training_prompts(job_dir: Path, max_prompts: int | None, seed: int) -> list[str]:
    train = job_dir / "data" / "train.parquet"
    if not train.is_file():
        raise FileNotFoundError(f"{train} is missing: run the data stage first")
    prompts = list(dict.fromkeys(pd.read_parquet(train, columns=["prompt"])["prompt"].astype(str)))
    if max_prompts is not None and len(prompts) > max_prompts:
        # A seeded subset, kept in data order, so the choice is reproducible and not biased to the file's head.
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), size=max_prompts, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def run_generation(spec: JobSpec, job_dir: Path, events: EventLog) -> dict[str, Any]:
    """Sample candidates (and forward-KL samples when distill.alpha > 0) from π_ref for the training prompts.

    Writes ``samples/candidates.parquet`` (prompt, responses) and ``samples/kl_samples.parquet`` (prompt, response).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_generation needs a running Ray (the pipeline calls ray.init)")
    job_dir = Path(job_dir)
    gen = spec.generation
    prompts = _training_prompts(job_dir, gen.max_prompts, gen.seed)
    n_kl = gen.kl_samples_per_prompt if spec.distill.alpha > 0 else 0
    n = gen.samples_per_prompt + n_kl
    if gen.temperature == 0 and gen.samples_per_prompt > 1:
        events.emit("log", "samples", message="temperature 0 samples identical responses: no generated pairs")
    # Candidates and KL samples are both i.i.d. draws from π_ref, so one call serves both and starts one engine.
    result = generate_with_spec(spec.reference, prompts, n, gen, events, stage="samples")
    samples = result.texts
    candidates = pd.DataFrame({"prompt": prompts, "responses": [s[: gen.samples_per_prompt] for s in samples]})
    kl = [(p, r) for p, s in zip(prompts, samples, strict=True) for r in s[gen.samples_per_prompt :]]
    kl_samples = pd.DataFrame(kl, columns=["prompt", "response"])
    with staging(job_dir, "samples") as out:
        pq.write_table(
            pa.Table.from_pandas(candidates, schema=CANDIDATES_SCHEMA, preserve_index=False), out / "candidates.parquet"
        )
        pq.write_table(
            pa.Table.from_pandas(kl_samples, schema=KL_SCHEMA, preserve_index=False), out / "kl_samples.parquet"
        )
    return {
        "prompts": len(prompts),
        "candidates": len(prompts) * gen.samples_per_prompt,
        "kl_samples": len(kl),
        "engine": result.engine,
    }
