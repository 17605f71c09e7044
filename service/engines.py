"""Policy engines: one Ray actor per loaded policy, and the manager that loads, caches and evicts them.

An actor owns one model (vLLM when it loads, transformers otherwise) and a request queue: requests that arrive while
a batch is generating are collected and run together as the next batch, so concurrent HTTP clients share forward
passes. The manager lives in the FastAPI process; it loads a policy on first use, keeps at most ``max_loaded``
actors (least recently used evicted first, once the replacement has loaded) and restarts an actor that died,
retrying the request once. Loads of different policies run side by side: one owner's slow or broken checkpoint holds
up nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_jobs.names import ENGINES

log = logging.getLogger(__name__)


class EngineRequestError(ValueError):
    """The request cannot be served by this policy (prompt too long, no chat template...): a client error."""


class EngineUnavailableError(RuntimeError):
    """The policy's engine could not be loaded or died twice in a row: a server-side error."""


@dataclass
class SamplingRequest:
    """One client request; ``prompt`` is sent as is, ``messages`` go through the policy's chat template."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    seed: int | None = None


@dataclass
class Sample:
    text: str
    # Incremental decodes of each token: "".join(pieces) == text, what a stream sends chunk by chunk.
    pieces: list[str]
    token_ids: list[int]
    # Log-probability of each generated token under the policy (unwarped: temperature and top-p not applied).
    token_logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class GenerationResult:
    prompt: str
    prompt_tokens: int
    samples: list[Sample]
    engine: str

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class _Raw:
    """What a backend returns per sample: generated ids without the EOS, their log-probs, whether EOS ended it."""

    token_ids: list[int]
    logprobs: list[float] | None
    eos: bool


# Called from the generating thread with (request index in the batch, sample index, token id) for each new token.
TokenSink = Callable[[int, int, int], None]


def resolve_engine(engine: str | None = None) -> str:
    choice = (engine or os.environ.get("RMDISTILL_SERVING_ENGINE") or "auto").lower()
    if choice not in ENGINES:
        raise ValueError(f"RMDISTILL_SERVING_ENGINE={choice!r}: expected one of {', '.join(ENGINES)}")
    return choice


# --------------------------------------------------------------------------------------------------- model folders
def _materialise(path: str) -> Path:
    """A plain HF folder for ``path``: itself, or a PEFT adapter merged into its base (cached by content)."""
    from ray_jobs.models.registry import resolve_model_path

    return Path(resolve_model_path(path))


# -------------------------------------------------------------------------------------------------------- backends
class _HFBackend:
    name = "hf"

    def __init__(self, folder: Path, max_model_len: int, max_batch_rows: int = 32) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        self.max_model_len = min(max_model_len, getattr(self.model.config, "max_position_embeddings", max_model_len))
        self.max_batch_rows = max_batch_rows
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos = sorted(eos)

    def run(self, batch: list[tuple[list[int], SamplingRequest]], sink: TokenSink | None = None) -> list[list[_Raw]]:
        """Requests with the same sampling settings share one ``generate`` call (rows = prompts x n)."""
        out: list[list[_Raw]] = [[] for _ in batch]
        groups: dict[tuple[float, float], list[int]] = {}
        for i, (_, req) in enumerate(batch):
            groups.setdefault((req.temperature, req.top_p), []).append(i)
        for (temperature, top_p), members in groups.items():
            rows = [(i, k, batch[i][0]) for i in members for k in range(batch[i][1].n)]
            for start in range(0, len(rows), self.max_batch_rows):
                chunk = rows[start : start + self.max_batch_rows]
                raws = self._generate(chunk, batch, temperature, top_p, sink)
                for (i, _, _), raw in zip(chunk, raws, strict=True):
                    out[i].append(raw)
        return out

    def _generate(self, rows, batch, temperature: float, top_p: float, sink: TokenSink | None) -> list[_Raw]:
        torch = self.torch
        from transformers import GenerationConfig

        reqs = [batch[i][1] for i, _, _ in rows]
        width = max(len(ids) for *_, ids in rows)
        pad = self.tokenizer.pad_token_id
        # Left padding keeps every prompt's last token at the same position, where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for *_, ids in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for *_, ids in rows], device=self.device)
        streamer = _RowStreamer([(i, k, batch[i][1].max_tokens) for i, k, _ in rows], self.eos, sink) if sink else None
        recorder = _ChosenLogprobs() if any(r.logprobs for r in reqs) else None
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in reqs),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=pad,
            eos_token_id=self.eos,
            return_dict_in_generate=True,
        )
        with torch.no_grad():
            gen = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                streamer=streamer,
                logits_processor=[recorder] if recorder else None,
            )
        new = gen.sequences[:, width:]
        token_lp = recorder.finish(new) if recorder else None
        results = []
        for r, req in enumerate(reqs):
            ids = new[r].tolist()[: req.max_tokens]
            end = next((k for k, t in enumerate(ids) if t in self.eos), None)
            kept = ids if end is None else ids[:end]
            lps = token_lp[r, : len(kept)].tolist() if (token_lp is not None and req.logprobs) else None
            results.append(_Raw(kept, lps, end is not None))
        return results

    def close(self) -> None:
        pass


class _ChosenLogprobs:
    """A logits processor that keeps only the log-prob of each token generate picks, one step at a time.

    generate's own ``output_logits`` keeps [rows, vocab] logits for every step until the end: with a 50k vocabulary,
    32 rows and 2,048 tokens that is 13 GB before the log-softmax copies it twice. Here one step's log-softmax is
    held at a time, and each step's chosen token (the last column of the next step's ids) is read from it.
    Custom processors run before temperature and top-p are applied, so these are the unwarped log-probs.
    """

    def __init__(self) -> None:
        self.chosen: list[Any] = []
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.last is not None:
            self.chosen.append(self.last.gather(-1, input_ids[:, -1:])[:, 0])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_ids: Any) -> Any:
        """[rows, steps] log-probs of ``new_ids``, the generated ids; the last step's token is read from its ids."""
        import torch

        steps = new_ids.shape[1]
        if len(self.chosen) < steps:
            self.chosen.append(self.last.gather(-1, new_ids[:, steps - 1 : steps])[:, 0])
        return torch.stack(self.chosen[:steps], dim=1)


class _RowStreamer:
    """transformers streamer for a batch: forwards each row's new tokens until its EOS or its own max_tokens."""

    def __init__(self, rows: list[tuple[int, int, int]], eos: list[int], sink: TokenSink) -> None:
        self.rows, self.eos, self.sink = rows, set(eos), sink
        self.counts = [0] * len(rows)
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        for r, token in enumerate(value.reshape(-1).tolist()):
            i, k, limit = self.rows[r]
            if self.done[r]:
                continue
            if token in self.eos or self.counts[r] >= limit:
                self.done[r] = True
                continue
            self.counts[r] += 1
            self.sink(i, k, token)

    def end(self) -> None:
        pass


class _VLLMBackend:
    name = "vllm"

    def __init__(self, folder: Path, max_model_len: int) -> None:
        import torch

        from ray_jobs.generate.vllm import clamp_max_model_len, make_llm

        self.max_model_len = clamp_max_model_len(folder, max_model_len)
        # vLLM's CPU build casts to bf16 by default, whose attention kernel dies of an illegal instruction in a Ray
        # worker here; fp32 is what transformers serves too. Several policies may share a node, so no core binding.
        dtype = "auto" if torch.cuda.is_available() else "float32"
        self.llm = make_llm(folder, max_model_len=self.max_model_len, dtype=dtype, bind_threads=False)
        self.tokenizer = self.llm.get_tokenizer()

    def run(self, batch: list[tuple[list[int], SamplingRequest]], sink: TokenSink | None = None) -> list[list[_Raw]]:
        """One ``generate`` over the whole batch (vLLM schedules it); the offline API streams nothing, so a
        streaming request receives its text when the batch ends."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.max_tokens,
                stop=req.stop or None,
                logprobs=0 if req.logprobs else None,
                seed=req.seed,
            )
            for _, req in batch
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in batch], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        results = []
        for out, (_, req) in zip(outputs, batch, strict=True):
            raws = []
            for c in out.outputs:
                ids = list(c.token_ids)
                hit_eos = bool(ids) and ids[-1] == eos
                ids = ids[:-1] if hit_eos else ids
                lps = [c.logprobs[k][t].logprob for k, t in enumerate(ids)] if req.logprobs and c.logprobs else None
                raws.append(_Raw(ids, lps, hit_eos or c.finish_reason == "stop"))
            results.append(raws)
        return results

    def close(self) -> None:
        from ray_jobs.generate.vllm import shutdown_llm

        with contextlib.suppress(Exception):
            shutdown_llm(self.llm)


def _load_backend(folder: Path, engine: str, max_model_len: int) -> _HFBackend | _VLLMBackend:
    """vLLM when it loads the policy (e.g. not for an attention head size its CPU build rejects), else transformers;
    engine "vllm" never falls back."""
    from ray_jobs.generate.vllm import VLLMUnavailableError, vllm_or_fallback

    def warn(reason: str) -> None:
        log.warning("%s; serving it with transformers", reason)

    try:
        return vllm_or_fallback(
            engine,
            str(folder),
            lambda: _VLLMBackend(folder, max_model_len),
            lambda: _HFBackend(folder, max_model_len),
            warn,
        )
    except VLLMUnavailableError as exc:
        raise EngineUnavailableError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------- actor
def incremental_pieces(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Split the decoded text into one piece per token, holding back pieces that end inside a UTF-8 character."""
    pieces, emitted = [], ""
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        if text.endswith("\ufffd") and k < len(token_ids):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :] if text.startswith(emitted) else "")
        emitted = text if text.startswith(emitted) else emitted
    return pieces


def truncate_at_stop(pieces: list[str], stops: list[str]) -> tuple[int, int] | None:
    """(tokens to keep, characters of the last kept piece) at the earliest stop string, or None."""
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return None
    cut, seen = min(hits), 0
    for k, piece in enumerate(pieces):
        if seen + len(piece) >= cut:
            return k + 1, cut - seen
        seen += len(piece)
    return len(pieces), len(pieces[-1]) if pieces else 0


def _thread_sink(loop: asyncio.AbstractEventLoop, queues: list[asyncio.Queue | None]) -> TokenSink | None:
    """A TokenSink the generating thread calls, handing tokens to the streaming requests' queues on the loop."""
    if not any(q is not None for q in queues):
        return None

    def sink(i: int, k: int, token: int) -> None:
        if queues[i] is not None:
            loop.call_soon_threadsafe(queues[i].put_nowait, (k, token))

    return sink


class _StreamDecoder:
    """Turns one sample's tokens into text deltas, holding back what might be the start of a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # inside a multi-byte character
            return ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.stopped = bool(hits)
        safe = min(hits) if hits else len(text) - self.holdback
        if safe <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted : safe], safe
        return delta


class PolicyEngine:
    """Ray actor body: one policy's model plus a batching request queue (an async actor)."""

    def __init__(self, path: str, engine: str = "auto", max_model_len: int = 2048, batch_wait_s: float = 0.005):
        self.backend = _load_backend(_materialise(path), engine, max_model_len)
        self.batch_wait_s = batch_wait_s
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def info(self) -> dict[str, Any]:
        return {"engine": self.backend.name, "max_model_len": self.backend.max_model_len, "pid": os.getpid()}

    async def generate(self, req: SamplingRequest) -> GenerationResult:
        prompt, ids = self._prepare(req)
        raws: list[_Raw] = await self._enqueue(ids, req, None)
        return GenerationResult(prompt, len(ids), [self._finish(r, req) for r in raws], self.backend.name)

    async def stream(self, req: SamplingRequest) -> AsyncIterator[dict[str, Any] | GenerationResult]:
        """Text deltas ``{"index": sample, "text": ...}`` as tokens are generated, then the GenerationResult.

        The deltas of a sample join to exactly its final text: text that could still turn into a stop string is
        held back until it cannot, and whatever the tokens did not deliver comes at the end.
        """
        prompt, ids = self._prepare(req)
        tokens: asyncio.Queue = asyncio.Queue()
        done = self._enqueue(ids, req, tokens)
        decoders = [_StreamDecoder(self.backend.tokenizer, req.stop) for _ in range(req.n)]
        while (item := await tokens.get()) is not None:
            k, token = item
            if text := decoders[k].push(token):
                yield {"index": k, "text": text}
        result = GenerationResult(prompt, len(ids), [self._finish(r, req) for r in await done], self.backend.name)
        for k, sample in enumerate(result.samples):
            if rest := sample.text[decoders[k].emitted :]:
                yield {"index": k, "text": rest}
        yield result

    def _enqueue(self, ids: list[int], req: SamplingRequest, tokens: asyncio.Queue | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        done = loop.create_future()
        self._queue.put_nowait((ids, req, done, tokens))
        return done

    def _prepare(self, req: SamplingRequest) -> tuple[str, list[int]]:
        tok = self.backend.tokenizer
        if req.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise EngineRequestError("this policy's tokenizer has no chat template: use /v1/completions")
            prompt = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            # The template already writes every special token the model expects.
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = req.prompt or ""
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise EngineRequestError("the prompt is empty after tokenization")
        limit = self.backend.max_model_len
        if len(ids) + req.max_tokens > limit:
            raise EngineRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds this policy's context of {limit}"
            )
        return prompt, ids

    def _finish(self, raw: _Raw, req: SamplingRequest) -> Sample:
        pieces = incremental_pieces(self.backend.tokenizer, raw.token_ids)
        ids, lps, reason = raw.token_ids, raw.logprobs, "stop" if raw.eos else "length"
        cut = truncate_at_stop(pieces, req.stop)
        if cut is not None:
            keep, chars = cut
            pieces = pieces[: keep - 1] + [pieces[keep - 1][:chars]] if keep else []
            ids, lps, reason = ids[:keep], (lps[:keep] if lps is not None else None), "stop"
        return Sample("".join(pieces), pieces, ids, lps, reason)

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            # A short wait lets requests sent together land in the same batch.
            await asyncio.sleep(self.batch_wait_s)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            sink = _thread_sink(asyncio.get_running_loop(), [tokens for *_, tokens in batch])
            try:
                outs = await asyncio.to_thread(self.backend.run, [(ids, req) for ids, req, *_ in batch], sink)
            except Exception as exc:  # one bad batch fails its requests, not the actor
                outs = [exc] * len(batch)
            # Tokens posted from the thread are queued before this runs, so the end marker comes after them.
            for (_, _, done, tokens), out in zip(batch, outs, strict=True):
                if not done.done():
                    done.set_exception(out) if isinstance(out, Exception) else done.set_result(out)
                if tokens is not None:
                    tokens.put_nowait(None)

    async def close(self) -> None:
        await asyncio.to_thread(self.backend.close)


# --------------------------------------------------------------------------------------------------------- manager
@dataclass
class _Loaded:
    policy_id: str
    actor: Any
    inflight: int = 0
    retired: bool = False
    killed: bool = False


class EngineManager:
    """Loads policies into actors on first use; at most ``max_loaded`` at once, least recently used evicted first.

    Each policy has at most one load in flight, which every request for it awaits; loads of different policies run
    concurrently. The least recently used policy is evicted only when its replacement has loaded, so a failed or
    slow load costs no one their loaded policy; the exception is a cluster with no room for one more actor, where
    the replacement could never be placed beside it, and the eviction comes first as it must.

    Used from the API process's event loop. If that process is not yet a Ray driver, the first load connects it
    to ``ray_address`` (else $RMDISTILL_SERVING_RAY_ADDRESS; a GCS ``host:port`` or ``ray://``; None starts a
    private local Ray). ``engine`` (else $RMDISTILL_SERVING_ENGINE) is auto, vllm or hf; ``num_cpus`` (else
    $RMDISTILL_SERVING_NUM_CPUS, default 1) is each actor's CPU share when the cluster has no GPU.
    """

    def __init__(
        self,
        max_loaded: int = 2,
        ray_address: str | None = None,
        *,
        engine: str | None = None,
        num_cpus: float | None = None,
        max_model_len: int = 2048,
        load_timeout_s: float = 600.0,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.max_loaded = max_loaded
        self.ray_address = ray_address or os.environ.get("RMDISTILL_SERVING_RAY_ADDRESS") or None
        self.engine = resolve_engine(engine)
        self.num_cpus = float(num_cpus if num_cpus is not None else os.environ.get("RMDISTILL_SERVING_NUM_CPUS", 1))
        self.max_model_len = max_model_len
        self.load_timeout_s = load_timeout_s
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._loading: dict[str, asyncio.Task[_Loaded]] = {}
        self._closing: set[asyncio.Task] = set()
        self.loads = 0  # how many actors were started (a restart or a reload after eviction counts)
        self._own_ray = False  # whether this manager made the process a Ray driver (and so disconnects it)

    def loaded(self) -> list[str]:
        """Loaded policy ids, least recently used first."""
        return list(self._loaded)

    def handle(self, policy_id: str) -> Any | None:
        """The actor serving a loaded policy, or None."""
        entry = self._loaded.get(policy_id)
        return entry.actor if entry else None

    async def generate(self, policy_id: str, path: str, request: SamplingRequest) -> GenerationResult:
        # Run to exhaustion (one item) so the call's cleanup happens now, not when the generator is collected.
        [result] = [item async for item in self._call(policy_id, path, request, stream=False)]
        return result

    def stream(
        self, policy_id: str, path: str, request: SamplingRequest
    ) -> AsyncIterator[dict[str, Any] | GenerationResult]:
        """Text deltas ``{"index", "text"}`` while the policy generates, then the GenerationResult."""
        return self._call(policy_id, path, request, stream=True)

    async def _call(
        self, policy_id: str, path: str, request: SamplingRequest, stream: bool
    ) -> AsyncIterator[dict[str, Any] | GenerationResult]:
        from ray.exceptions import RayActorError, RayTaskError

        for attempt in range(2):
            entry = await self._acquire(policy_id, path)
            started = False
            try:
                if stream:
                    async for ref in entry.actor.stream.remote(request):
                        item = await ref
                        started = True
                        yield item
                else:
                    yield await entry.actor.generate.remote(request)
                return
            except RayTaskError as exc:
                # Re-raised bare so callers see the actor's message, not a remote traceback.
                if isinstance(exc.cause, EngineRequestError):
                    raise EngineRequestError(str(exc.cause)) from None
                raise
            except RayActorError as exc:
                self._forget(entry)
                # A stream that already sent text cannot be replayed without duplicating it.
                if attempt or started:
                    raise EngineUnavailableError(f"the engine for {policy_id!r} died: {exc}") from exc
                log.warning("engine for %s died (%s); restarting it and retrying", policy_id, exc)
            finally:
                self._release(entry)

    async def actor(self, policy_id: str, path: str) -> Any:
        """The loaded actor for a policy (loading it if needed): for callers that skip HTTP, e.g. the benchmark."""
        entry = await self._acquire(policy_id, path)
        self._release(entry)
        return entry.actor

    async def unload(self, policy_id: str) -> None:
        entry = self._loaded.get(policy_id)
        if entry is not None:
            self._forget(entry)

    async def shutdown(self) -> None:
        loading = list(self._loading.values())
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        for entry in list(self._loaded.values()):
            entry.inflight = 0
            self._forget(entry)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._own_ray:
            import ray

            # Disconnect before the app stops an embedded head, or the driver logs connection errors on exit.
            ray.shutdown()
            self._own_ray = False

    async def _acquire(self, policy_id: str, path: str) -> _Loaded:
        while True:
            entry = self._loaded.get(policy_id)
            if entry is None:
                # Shielded: a client that hangs up does not cancel the load the other waiters share.
                entry = await asyncio.shield(self._load_once(policy_id, path))
            # Another policy's load may have finished and evicted this one before this waiter resumed.
            if not entry.retired:
                self._loaded.move_to_end(policy_id)
                entry.inflight += 1
                return entry

    def _load_once(self, policy_id: str, path: str) -> asyncio.Task[_Loaded]:
        task = self._loading.get(policy_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(policy_id, path))
            self._loading[policy_id] = task
            task.add_done_callback(lambda done: self._load_done(policy_id, done))
        return task

    def _load_done(self, policy_id: str, task: asyncio.Task[_Loaded]) -> None:
        if self._loading.get(policy_id) is task:
            del self._loading[policy_id]
        # Retrieved here so a failure nobody awaits any more (every client hung up) is not logged as unhandled.
        if not task.cancelled():
            task.exception()

    async def _load(self, policy_id: str, path: str) -> _Loaded:
        import ray

        if not ray.is_initialized():
            if (self.ray_address or "").startswith(("http://", "https://")):
                # A dashboard URL serves job submission only; a driver connects through the GCS or ray://.
                raise EngineUnavailableError(
                    f"serving needs the cluster's GCS address (host:port), not the dashboard URL {self.ray_address}: "
                    "set RMDISTILL_SERVING_RAY_ADDRESS"
                )
            ray.init(address=self.ray_address or "local", namespace="rmdistill", log_to_driver=False)
            self._own_ray = True
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": self.num_cpus}
        if len(self._loaded) >= self.max_loaded and not _room_for(options):
            self._forget(next(iter(self._loaded.values())))
        actor = ray.remote(PolicyEngine).options(**options).remote(path, self.engine, self.max_model_len)
        try:
            info = await asyncio.wait_for(actor.info.remote(), self.load_timeout_s)
        except asyncio.CancelledError:  # the manager is shutting down
            ray.kill(actor)
            raise
        except Exception as exc:  # a timeout, or the actor's __init__ raised
            ray.kill(actor)
            raise EngineUnavailableError(f"could not load policy {policy_id!r} from {path}: {exc}") from exc
        # No await from here on: the bound is checked and the new entry added in one step, so evictions never race.
        while len(self._loaded) >= self.max_loaded:
            self._forget(next(iter(self._loaded.values())))
        log.info("loaded policy %s on %s (%s)", policy_id, info["engine"], options)
        self.loads += 1
        entry = _Loaded(policy_id, actor)
        self._loaded[policy_id] = entry
        return entry

    def _release(self, entry: _Loaded) -> None:
        entry.inflight -= 1
        if entry.retired and entry.inflight <= 0:
            self._kill(entry)

    def _forget(self, entry: _Loaded) -> None:
        """Stop routing to an actor; it is killed once its in-flight requests finish."""
        if self._loaded.get(entry.policy_id) is entry:
            del self._loaded[entry.policy_id]
        if not entry.retired:
            entry.retired = True
            if entry.inflight <= 0:
                self._kill(entry)

    def _kill(self, entry: _Loaded) -> None:
        if entry.killed:
            return
        entry.killed = True
        task = asyncio.get_running_loop().create_task(self._close_actor(entry.actor))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_actor(actor: Any) -> None:
        import ray

        # vLLM's engine core is a subprocess: ask it to stop before the actor process is killed.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(actor.close.remote(), 30)
        ray.kill(actor)


def _room_for(options: dict[str, float]) -> bool:
    """Whether the cluster has the resources of one more actor free now (as far as Ray's resource view knows)."""
    import ray

    free = ray.available_resources()
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0)}
    return all(free.get(name, 0.0) >= amount for name, amount in wanted.items() if amount)
