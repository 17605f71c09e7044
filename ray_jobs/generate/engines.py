"""Sampling from a causal LM for the generation stage, the builtin:reviews data and evaluation.

Engines run in Ray actors (one per replica, each owning one vLLM engine) held by a `SamplingEngines` session, so
several calls can share them: the pipeline holds one session for π_ref across the data and generate stages, which
then start one engine instead of two. transformers' `generate` is the fallback where vLLM cannot load the model,
and the in-process path where Ray is not running. Every caller passes a `GenerationSpec`, the job's own settings
(evaluation overrides its sampling fields on a copy).

Ray Data's `map_batches` ran these actors before, but its actor pool ends with each dataset execution and cannot be
handed to the next one; the session sends the same batches (consecutive runs of `batch_size` prompts) itself.
`ray.data.llm` (vLLMEngineProcessorConfig) was considered and not used: its engine stage reserves one GPU per
replica unless given a hand-written placement group, drives vLLM's async engine, and has not been checked against
the CPU build pinned here. An actor that owns a plain `vllm.LLM` runs unchanged on CPU and GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

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
    """One vLLM engine, loaded once, sampling `n` completions for each prompt in a batch."""

    def __init__(self, model: str, n: int, gen: GenerationSpec, bind_threads: bool = True):
        import vllm

        self._vllm, self.n, self.gen = vllm, n, gen
        self.llm = make_llm(model, max_model_len=gen.max_model_len, seed=gen.seed, bind_threads=bind_threads)

    def reset(self) -> None:
        """Forget cached prompt prefixes, so that a call on a used engine computes what a fresh engine would."""
        self.llm.reset_prefix_cache()

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        return self.sample(batch, self.n, self.gen)

    def sample(self, batch: dict[str, np.ndarray], n: int, gen: GenerationSpec) -> pd.DataFrame:
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=gen.temperature,
                top_p=gen.top_p,
                max_tokens=gen.max_new_tokens,
                seed=_prompt_seed(gen.seed, int(i), n),
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
    """transformers `generate` with the same output format as vLLM."""

    def __init__(self, model: str, n: int, gen: GenerationSpec):
        from ray_jobs.models.registry import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model)
        self.n, self.gen = n, gen

    def reset(self) -> None:
        """Nothing to forget: `generate` keeps no state between calls."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        return self.sample(batch, self.n, self.gen)

    def sample(self, batch: dict[str, np.ndarray], n: int, gen: GenerationSpec) -> pd.DataFrame:
        from ray_jobs.models.hf_generate import hf_generate

        responses, ended = hf_generate(
            self.model,
            self.tokenizer,
            [str(p) for p in batch["prompt"]],
            n=n,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=_prompt_seed(gen.seed, int(batch["index"][0]), n),
            batch_size=gen.batch_size,
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


_PREDICTORS: dict[str, type] = {"vllm": VLLMPredictor, "hf": HFPredictor}


class SamplingEngines:
    """Sampling engines for one model, started by the first call that needs them and kept for the calls after it
    until `close()` (also a context manager).

    One Ray actor per `generation.replicas`, each owning a predictor. Every call starts from what a fresh engine
    would hold (vLLM's prefix cache is emptied), so a call's texts are the same on a shared engine as on its own.
    A call that needs another engine (vLLM failed under engine auto, or another max_model_len or replica count)
    replaces the held one. Each start emits a `log` event with `engine_started` (the engine) and `replicas`.
    """

    def __init__(self, model_ref: str | Path, events: EventLog | None = None):
        self.model_ref, self.events = model_ref, events
        self._model: str | None = None
        self._actors: list[Any] = []
        self._key: tuple[str, int, int] | None = None
        self._vllm_failure: str | None = None

    @property
    def model(self) -> str:
        from ray_jobs.models.registry import resolve_model_path

        if self._model is None:
            self._model = str(resolve_model_path(self.model_ref))
        return self._model

    def __enter__(self) -> SamplingEngines:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the held engines now, so that the stages after them get the CPUs (or GPUs) and memory back."""
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
        self._actors, self._key = [], None

    def generate(self, prompts: list[str], n: int, gen: GenerationSpec, stage: Stage = "generate") -> Generation:
        """Sample `n` completions (new text only) for each already-rendered prompt, in prompt order.

        With Ray running: vLLM engines for engine "vllm" or "auto" (auto falls back to transformers with a `log`
        event when vLLM is missing or cannot load the model, and keeps to transformers for the session's later
        calls), transformers for "hf". Without Ray: transformers in this process. Sampling is seeded by
        `stage_seed(gen.seed, stage)` and each prompt's position, so a stage's texts do not depend on batching.
        """
        import ray

        if not prompts or n == 0:
            return Generation([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts], "none")
        gen = gen.model_copy(update={"seed": stage_seed(gen.seed, stage)})
        if not ray.is_initialized():
            if gen.engine == "vllm":
                raise VLLMUnavailableError("engine 'vllm' runs in Ray actors: initialise Ray first (ray.init)")
            frame = HFPredictor(self.model, n, gen)(
                {"index": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object)}
            )
            return Generation(list(frame["responses"]), list(frame["num_tokens"]), list(frame["ended"]), "hf")

        def note(reason: str) -> None:
            self._vllm_failure = reason
            if self.events is not None:
                self.events.emit("log", stage, message=f"falling back to transformers generate: {reason}")

        def with_vllm() -> Generation:
            return self._sample("vllm", prompts, n, gen, stage)

        def with_hf() -> Generation:
            return self._sample("hf", prompts, n, gen, stage)

        if gen.engine == "auto" and self._vllm_failure is not None:
            # vLLM already failed on this model in this session: say so again for this stage, not start it again.
            note(self._vllm_failure)
            return with_hf()
        return vllm_or_fallback(gen.engine, self.model, with_vllm, with_hf, note)

    def _engines(self, kind: str, n: int, gen: GenerationSpec, stage: Stage) -> list[Any]:
        import ray

        key = (kind, gen.max_model_len, gen.replicas)
        fresh = key != self._key
        if fresh:
            self.close()
            extra = {"bind_threads": gen.replicas == 1} if kind == "vllm" else {}
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            remote = ray.remote(_PREDICTORS[kind]).options(num_cpus=1, num_gpus=gpus)
            self._actors = [remote.remote(self.model, n, gen, **extra) for _ in range(gen.replicas)]
            self._key = key
        # Also waits for fresh engines to load, raising the error of one that could not.
        ray.get([actor.reset.remote() for actor in self._actors])
        if fresh and self.events is not None:
            self.events.emit(
                "log",
                stage,
                message=f"started {len(self._actors)} {kind} engine(s) for {self.model_ref}",
                engine_started=kind,
                replicas=len(self._actors),
            )
        return self._actors

    def _sample(self, kind: str, prompts: list[str], n: int, gen: GenerationSpec, stage: Stage) -> Generation:
        from ray.util import ActorPool

        texts: list[list[str]] = [[] for _ in prompts]
        num_tokens: list[list[int]] = [[] for _ in prompts]
        ended: list[list[bool]] = [[] for _ in prompts]
        size = gen.batch_size
        batches = [
            {
                "index": np.arange(i, min(i + size, len(prompts))),
                "prompt": np.array(prompts[i : i + size], dtype=object),
            }
            for i in range(0, len(prompts), size)
        ]
        done = 0
        try:
            pool = ActorPool(self._engines(kind, n, gen, stage))
            for frame in pool.map_unordered(lambda actor, batch: actor.sample.remote(batch, n, gen), batches):
                for index, responses, counts, flags in zip(
                    frame["index"], frame["responses"], frame["num_tokens"], frame["ended"], strict=True
                ):
                    i = int(index)
                    texts[i], num_tokens[i], ended[i] = (
                        [str(r) for r in responses],
                        [int(c) for c in counts],
                        list(map(bool, flags)),
                    )
                done += len(frame)
                if self.events is not None:
                    self.events.progress(stage, done, len(prompts), what="prompts generated")
        except BaseException:
            self.close()  # an engine that failed mid-call is not trusted with the next one
            raise
        return Generation(texts, num_tokens, ended, kind)


def generate(
    model_ref: str | Path,
    prompts: list[str],
    n: int,
    gen: GenerationSpec,
    events: EventLog | None = None,
    stage: Stage = "generate",
) -> Generation:
    """`SamplingEngines.generate` on engines of its own, ended when it returns."""
    with SamplingEngines(model_ref, events) as engines:
        return engines.generate(prompts, n, gen, stage)
