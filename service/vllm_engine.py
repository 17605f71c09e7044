"""The vLLM engine: vLLM's async engine, which batches continuously (a request joins the running batch at its next
step instead of waiting for it to end) and hands each request its tokens as they are sampled."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from service.engines import LoraAdapter, SampleEnd, SamplingRequest, Token, eos_ids

# Adapters vLLM applies within one batch; more wait for a slot (vLLM keeps others loaded on the CPU side).
MAX_LORAS_PER_BATCH = 4


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        folder: Path,
        max_model_len: int,
        gpu_memory_utilization: float | None = None,
        lora_rank: int | None = None,
    ) -> None:
        """``lora_rank``: serve LoRA adapters of at most this rank on this base model, several in one batch."""
        import torch
        from transformers import AutoTokenizer

        from ray_jobs.generate.vllm import clamp_max_model_len, make_async_engine

        self.max_model_len = clamp_max_model_len(folder, max_model_len)
        # vLLM's CPU build casts to bf16 by default, whose attention kernel dies of an illegal instruction in a Ray
        # worker here; fp32 is what transformers serves too.
        dtype = "auto" if torch.cuda.is_available() else "float32"
        lora = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": MAX_LORAS_PER_BATCH} if lora_rank else {}
        self.engine = make_async_engine(
            folder,
            max_model_len=self.max_model_len,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            **lora,
        )
        self._lora_ids: dict[LoraAdapter, int] = {}
        # The policy's own tokenizer, as the transformers engine uses: prompts render and decode the same on both.
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos = eos_ids(self.tokenizer, getattr(self.engine.model_config, "hf_config", None))

    async def tokens(self, ids: list[int], req: SamplingRequest) -> AsyncIterator[Token | SampleEnd]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_tokens,
            stop=req.stop or None,
            logprobs=req.logprobs,
            seed=req.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        request = {"request_id": uuid.uuid4().hex, "lora_request": self._lora(req.lora)}
        async for out in self.engine.generate({"prompt_token_ids": ids}, params, **request):
            for c in out.outputs:
                end = None
                for j, token in enumerate(c.token_ids):
                    event = Token(c.index, token)
                    if c.logprobs:
                        at = c.logprobs[j]
                        event.logprob = at[token].logprob
                        if req.logprobs:
                            event.top = {t: lp.logprob for t, lp in at.items() if (lp.rank or 0) <= req.logprobs}
                    if token in self.eos:  # reported by the SampleEnd, as the transformers engine does
                        end = event
                        continue
                    yield event
                if c.finish_reason is not None:
                    # "stop" without a stop string or stop id is the model's own end of sequence.
                    eos = c.finish_reason == "stop" and c.stop_reason is None
                    yield SampleEnd(c.index, eos, end if eos else None)

    async def prompt_logprobs(
        self, ids: list[int], top: int, lora: LoraAdapter | None = None
    ) -> list[tuple[float, dict[int, float]] | None]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=top)
        final = None
        request = {"request_id": uuid.uuid4().hex, "lora_request": self._lora(lora)}
        async for out in self.engine.generate({"prompt_token_ids": ids}, params, **request):
            final = out
        assert final is not None and final.prompt_logprobs is not None
        scored: list[tuple[float, dict[int, float]] | None] = []
        for token, at in zip(ids, final.prompt_logprobs, strict=True):
            if at is None:
                scored.append(None)
                continue
            alts = {t: lp.logprob for t, lp in at.items() if top and (lp.rank or 0) <= top}
            scored.append((at[token].logprob, alts))
        return scored

    def _lora(self, adapter: LoraAdapter | None) -> Any:
        """vLLM's request for an adapter: one id per adapter for the engine's life (vLLM caches adapters by id)."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        number = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(adapter.name, number, adapter.path)

    def close(self) -> None:
        self.engine.shutdown()
