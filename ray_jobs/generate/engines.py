"""Sampling from a causal LM for the generation stage, the builtin:reviews data and evaluation.

vLLM runs as Ray Data batch inference (an actor pool where every actor owns one engine); transformers' `generate`
is the fallback where vLLM cannot load the model, and the in-process path where Ray is not running. Every caller
passes a `GenerationSpec`, the job's own settings (evaluation overrides its sampling fields on a copy).

`ray.data.llm` (vLLMEngineProcessorConfig) was considered and not used: its engine stage reserves one GPU per
replica unless given a hand-written placement group, drives vLLM's async engine, and has not been checked against
the CPU build pinned here. A `map_batches` actor that owns a plain `vllm.LLM` runs unchanged on CPU and GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ray_jobs.events import EventLog
from ray_jobs.generate.vllm import VLLMUnavailableError, make_llm, shutdown_llm, vllm_or_fallback
from ray_jobs.names import Stage
from ray_jobs.spec import GenerationSpec


def stage_seed(seed: int, stage: str) -> int:
    """The sampling seed a stage uses: the spec's seed mixed with the stage's name, so that stages sampling the same
    prompts with the same settings (builtin:reviews' data stage and the generate stage) draw different responses."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:4], "big")


def kl_sampling(gen: GenerationSpec) -> GenerationSpec:
    """π_ref's own distribution (temperature 1, top_p 1) for the forward-KL samples, on a stream of its own."""
    if gen.temperature == 1.0 and gen.top_p == 1.0:
        return gen
    return gen.model_copy(update={"temperature": 1.0, "top_p": 1.0, "seed": gen.seed + 1})


def _prompt_seed(seed: int, index: int, n: int) -> int:
    # Derived from the prompt's position, not from the batch or the actor that served it: vLLM (a seed per request,
    # seed + j for its j-th completion) then samples the same texts for any batch size or replica count, and no
    # two prompts share a random stream. transformers seeds once per batch, from the batch's first prompt.
    return seed + index * max(n, 1)


class VLLMPredictor:
    """Ray Data actor: one vLLM engine, loaded once, sampling `n` completions for each prompt in a batch."""

    def __init__(self, model: str, n: int, gen: GenerationSpec, bind_threads: bool = True):
        import vllm

        self._vllm, self.n, self.gen = vllm, n, gen
        self.llm = make_llm(model, max_model_len=gen.max_model_len, seed=gen.seed, bind_threads=bind_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        params = [
            self._vllm.SamplingParams(
                n=self.n,
                temperature=self.gen.temperature,
                top_p=self.gen.top_p,
                max_tokens=self.gen.max_new_tokens,
                seed=_prompt_seed(self.gen.seed, int(i), self.n),
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
                "ended": [[c.finish_reason != "length" for c in cs] for cs in completions],
            }
        )

    def __del__(self) -> None:
        shutdown_llm(getattr(self, "llm", None))


class HFPredictor:
    """Ray Data actor (or in-process helper): transformers `generate` with the same output format as vLLM."""

    def __init__(self, model: str, n: int, gen: GenerationSpec):
        from ray_jobs.models.registry import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model)
        self.n, self.gen = n, gen

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        from ray_jobs.models.hf_generate import hf_generate

        responses, ended = hf_generate(
            self.model,
            self.tokenizer,
            [str(p) for p in batch["prompt"]],
            n=self.n,
            max_new_tokens=self.gen.max_new_tokens,
            temperature=self.gen.temperature,
            top_p=self.gen.top_p,
            seed=_prompt_seed(self.gen.seed, int(batch["index"][0]), self.n),
            batch_size=self.gen.batch_size,
        )
        # hf_generate returns text only: re-encoding counts tokens exactly for ordinary text, approximately where
        # decoding was lossy (partial UTF-8 bytes from a random model).
        num_tokens = [
            [len(ids) for ids in self.tokenizer(list(r), add_special_tokens=False)["input_ids"]] for r in responses
        ]
        return pd.DataFrame(
            {
                "index": batch["index"],
                "responses": [list(r) for r in responses],
                "num_tokens": num_tokens,
                "ended": ended,
            }
        )


@dataclass
class Generation:
    texts: list[list[str]]  # n completions per prompt, in prompt order
    num_tokens: list[list[int]]  # generated tokens of each completion
    ended: list[list[bool]]  # False where max_new_tokens cut the completion (no EOS: the model did not stop)
    engine: str  # "vllm", "hf", or "none" when nothing was asked for


def drop_capped(texts: list[list[str]], ended: list[list[bool]]) -> tuple[list[list[str]], list[list[bool]]]:
    """Each prompt's completions without those cut at the token cap (`generation.capped: drop`)."""
    kept = [[(t, e) for t, e in zip(ts, es, strict=True) if e] for ts, es in zip(texts, ended, strict=True)]
    return [[t for t, _ in k] for k in kept], [[e for _, e in k] for k in kept]


def count_capped(ended: list[list[bool]]) -> int:
    return sum(not e for es in ended for e in es)


def _run_pool(
    predictor: type, kwargs: dict, prompts: list[str], gen: GenerationSpec, events: EventLog | None, stage: Stage
) -> tuple[list[list[str]], list[list[int]], list[list[bool]]]:
    from ray_jobs.pools import run_indexed

    texts: list[list[str]] = [[] for _ in prompts]
    num_tokens: list[list[int]] = [[] for _ in prompts]
    ended: list[list[bool]] = [[] for _ in prompts]

    def place(batch: pd.DataFrame) -> None:
        for index, responses, counts, flags in zip(
            batch["index"], batch["responses"], batch["num_tokens"], batch["ended"], strict=True
        ):
            i = int(index)
            texts[i], num_tokens[i], ended[i] = (
                [str(r) for r in responses],
                [int(c) for c in counts],
                list(map(bool, flags)),
            )

    def progress(done: int, total: int) -> None:
        if events is not None:
            events.progress(stage, done, total, what="prompts generated")

    run_indexed(
        predictor,
        kwargs,
        [{"prompt": p} for p in prompts],
        replicas=gen.replicas,
        batch_size=gen.batch_size,
        on_batch=place,
        on_progress=progress,
        batch_format="pandas",
    )
    return texts, num_tokens, ended


def generate(
    model_ref: str | Path,
    prompts: list[str],
    n: int,
    gen: GenerationSpec,
    events: EventLog | None = None,
    stage: Stage = "generate",
) -> Generation:
    """Sample `n` completions (new text only) for each already-rendered prompt, in prompt order.

    With Ray running, generation is Ray Data batch inference over `gen.replicas` actors: vLLM engines for engine
    "vllm" or "auto" (auto falls back to transformers with a `log` event when vLLM is missing or cannot load the
    model), transformers for "hf". Without Ray it runs transformers in this process. Sampling is seeded by
    `stage_seed(gen.seed, stage)` and each prompt's position, so a stage's texts do not depend on batching.
    """
    import ray

    from ray_jobs.models.registry import resolve_model_path

    if not prompts or n == 0:
        return Generation([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts], "none")
    model = str(resolve_model_path(model_ref))
    gen = gen.model_copy(update={"seed": stage_seed(gen.seed, stage)})
    if not ray.is_initialized():
        if gen.engine == "vllm":
            raise VLLMUnavailableError("engine 'vllm' runs through Ray Data: initialise Ray first (ray.init)")
        frame = HFPredictor(model, n, gen)(
            {"index": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object)}
        )
        return Generation(list(frame["responses"]), list(frame["num_tokens"]), list(frame["ended"]), "hf")

    def with_vllm() -> Generation:
        kwargs = dict(model=model, n=n, gen=gen, bind_threads=gen.replicas == 1)
        return Generation(*_run_pool(VLLMPredictor, kwargs, prompts, gen, events, stage), "vllm")

    def with_hf() -> Generation:
        return Generation(*_run_pool(HFPredictor, dict(model=model, n=n, gen=gen), prompts, gen, events, stage), "hf")

    def note(reason: str) -> None:
        if events is not None:
            events.emit("log", stage, message=f"falling back to transformers generate: {reason}")

    return vllm_or_fallback(gen.engine, model, with_vllm, with_hf, note)
