"""The transformers engine: serves what vLLM cannot load, streaming token by token.

Requests reach it in batches: the deployment gathers concurrent requests for one policy with Ray Serve's
`@serve.batch` and hands them to `HFEngine.run_jobs`, where requests with the same sampling settings share one
`generate` call (rows = prompts x n). A seeded request generates alone, under its own seed, so its samples do not
depend on what else was in the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engines import LoraAdapter, SampleEnd, SamplingRequest, Token, eos_ids

# Called from the generating thread for each new token of (request index in the batch, sample index).
TokenSink = Callable[[int, Token], None]


@dataclass
class HFJob:
    """One request waiting for (or in) a batch; its tokens and SampleEnds arrive on ``events``, then None."""

    engine: HFEngine
    ids: list[int]
    req: SamplingRequest
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class HFEngine:
    name = "hf"

    def __init__(
        self, folder: Path, max_model_len: int, submit: Callable[[HFJob], Awaitable[Any]], max_batch_rows: int = 32
    ) -> None:
        self.backend = HFBackend(folder, max_model_len, max_batch_rows)
        self.tokenizer = self.backend.tokenizer
        self.max_model_len = self.backend.max_model_len
        self._submit = submit

    async def tokens(self, ids: list[int], req: SamplingRequest) -> AsyncIterator[Token | SampleEnd]:
        job = HFJob(self, ids, req)
        batch = asyncio.ensure_future(self._submit(job))
        try:
            while (event := await job.events.get()) is not None:
                yield event
            await batch  # the batch's error, if it failed
        finally:
            if not batch.done():  # the client went away; the batch still finishes for the others in it
                batch.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def run_jobs(self, jobs: list[HFJob]) -> None:
        """Generate for a batch of jobs, streaming each one's tokens to its queue from the generating thread."""
        loop = asyncio.get_running_loop()

        def sink(i: int, event: Token | SampleEnd) -> None:
            loop.call_soon_threadsafe(jobs[i].events.put_nowait, event)

        try:
            await asyncio.to_thread(self.backend.run, [(job.ids, job.req) for job in jobs], sink)
        finally:
            # Queued from here, after every event the thread posted: the end marker comes last.
            for job in jobs:
                job.events.put_nowait(None)

    async def prompt_logprobs(
        self, ids: list[int], top: int, lora: LoraAdapter | None = None
    ) -> list[tuple[float, dict[int, float]] | None]:
        # Never given an adapter: transformers serves an adapter policy merged into its base, as a policy of its own.
        return await asyncio.to_thread(self.backend.prompt_logprobs, ids, top)

    def close(self) -> None:
        pass


class HFBackend:
    """A causal LM in this process and the batched, streaming `generate` over it."""

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
        self.eos = sorted(eos_ids(self.tokenizer, self.model.generation_config))

    def run(self, batch: list[tuple[list[int], SamplingRequest]], sink: TokenSink) -> None:
        """Every request's tokens to ``sink``; requests with the same settings (and no seed) share a `generate`."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, req) in enumerate(batch):
            alone = ("seed", req.seed, i) if req.seed is not None else ()
            groups.setdefault((req.temperature, req.top_p, *alone), []).append(i)
        for members in groups.values():
            rows = [(i, k, batch[i][0]) for i in members for k in range(batch[i][1].n)]
            seed = batch[members[0]][1].seed
            for start in range(0, len(rows), self.max_batch_rows):
                self._seeded(seed, rows[start : start + self.max_batch_rows], batch, sink)

    def _seeded(self, seed: int | None, rows, batch, sink: TokenSink) -> None:
        torch = self.torch
        if seed is None:
            self._generate(rows, batch, sink)
            return
        # A forked RNG: the same seed gives the same samples, and the process's random stream is left untouched.
        with torch.random.fork_rng(devices=[self.device] if self.device == "cuda" else []):
            torch.manual_seed(seed)
            self._generate(rows, batch, sink)

    def _generate(self, rows, batch, sink: TokenSink) -> None:
        torch = self.torch
        from transformers import GenerationConfig

        reqs = [batch[i][1] for i, _, _ in rows]
        width = max(len(ids) for *_, ids in rows)
        pad = self.tokenizer.pad_token_id
        # Left padding keeps every prompt's last token at the same position, where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for *_, ids in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for *_, ids in rows], device=self.device)
        top = max((r.logprobs or 0) for r in reqs)
        recorder = _StepLogprobs() if any(r.logprobs is not None for r in reqs) else None
        streamer = _RowStreamer(rows, reqs, self.eos, sink, recorder, top)
        temperature, top_p = reqs[0].temperature, reqs[0].top_p
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in reqs),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=pad,
            eos_token_id=self.eos,
        )
        with torch.no_grad():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                streamer=streamer,
                logits_processor=[recorder] if recorder else None,
            )
        streamer.finish()

    def prompt_logprobs(self, ids: list[int], top: int) -> list[tuple[float, dict[int, float]] | None]:
        """Teacher-forced log-prob of each prompt token after the ones before it (none for the first)."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, torch.tensor(ids[1:], device=self.device)[:, None])[:, 0].tolist()
        best = logp.topk(top, dim=-1) if top else None
        out: list[tuple[float, dict[int, float]] | None] = [None]
        for j, lp in enumerate(chosen):
            alts = dict(zip(best.indices[j].tolist(), best.values[j].tolist(), strict=True)) if best else {}
            out.append((lp, alts))
        return out


class _StepLogprobs:
    """A logits processor that keeps the log-softmax of the current step only.

    generate's own ``output_logits`` keeps [rows, vocab] logits for every step until the end: with a 50k vocabulary,
    32 rows and 2,048 tokens that is 13 GB before the log-softmax copies it twice. Here one step is held at a time,
    and the streamer reads each chosen token's log-prob from it as the token arrives. Custom processors run before
    temperature and top-p are applied, so these are the unwarped log-probs.
    """

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _RowStreamer:
    """transformers streamer for a batch: forwards each row's new tokens until its EOS or its own max_tokens."""

    def __init__(self, rows, reqs: list[SamplingRequest], eos: list[int], sink: TokenSink, recorder, top: int) -> None:
        self.rows, self.reqs, self.eos, self.sink = rows, reqs, set(eos), sink
        self.recorder, self.top = recorder, top
        self.counts = [0] * len(rows)
        self.ended: list[bool | None] = [None] * len(rows)  # None while generating, then whether EOS ended it
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        step = self.recorder.last if self.recorder is not None else None
        best = step.topk(self.top, dim=-1) if step is not None and self.top else None
        for r, token in enumerate(tokens):
            if self.ended[r] is not None:
                continue
            i, k, _ = self.rows[r]
            req = self.reqs[r]
            event = Token(k, token)
            if step is not None and req.logprobs is not None:
                event.logprob = float(step[r, token])
                if req.logprobs:
                    ids, values = best.indices[r, : req.logprobs].tolist(), best.values[r, : req.logprobs].tolist()
                    event.top = dict(zip(ids, values, strict=True))
            if token in self.eos:
                self._end(r, event)
                continue
            self.counts[r] += 1
            self.sink(i, event)
            if self.counts[r] >= req.max_tokens:
                self._end(r, None)

    def _end(self, r: int, eos: Token | None) -> None:
        """Row r is done: by its end token ``eos``, or (None) by its token cap."""
        self.ended[r] = eos is not None
        i, k, _ = self.rows[r]
        self.sink(i, SampleEnd(k, eos is not None, eos))

    def finish(self) -> None:
        """Rows generate stopped without an EOS or reaching their own cap (the batch's cap was theirs) end here."""
        for r, ended in enumerate(self.ended):
            if ended is None:
                self._end(r, None)

    def end(self) -> None:
        pass
