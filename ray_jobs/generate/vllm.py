"""vLLM, shared by the generation stage and the service's policy engines: how an engine is built on these
machines, and the "vLLM when it loads, else transformers" rule with the reason it fell back.

vLLM is an optional extra (`rmdistill[vllm]`) and is imported only inside these functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# KV cache in GiB for CPU engines; vLLM's CPU default (4 GiB per engine) is too much for small shared machines.
DEFAULT_CPU_KVCACHE_GIB = "1"
T = TypeVar("T")


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed here, or its engine could not load the model."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def clamp_max_model_len(model: str | Path, requested: int) -> int:
    """vLLM refuses a max_model_len above the model's position limit; clamp instead of failing on small models."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return requested
    limit = json.loads(config.read_text()).get("max_position_embeddings")
    return min(requested, int(limit)) if limit else requested


def _engine_args(model: str | Path, *, max_model_len: int, seed: int, dtype: str, bind_threads: bool) -> dict[str, Any]:
    """How every vLLM engine is built here: eager (no compile: engines start in seconds, not a minute), one worker
    inside the engine's own process, no periodic stats logging."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    if not bind_threads:
        # vLLM's CPU auto-binding pins every engine on a node to the same cores; with several engines per node,
        # leave placement to the OS and the thread count to Ray (OMP_NUM_THREADS = the actor's CPUs).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {
        "model": str(model),
        "dtype": dtype,
        "seed": seed,
        "max_model_len": clamp_max_model_len(model, max_model_len),
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
        "disable_log_stats": True,
    }


def make_llm(model: str | Path, *, max_model_len: int, seed: int = 0, dtype: str = "auto", bind_threads: bool = True):
    """A `vllm.LLM` in this process, for offline batches."""
    args = _engine_args(model, max_model_len=max_model_len, seed=seed, dtype=dtype, bind_threads=bind_threads)
    # Engines run in dedicated actors: keeping the engine core and its worker in the actor saves two process
    # spawns (each re-imports vLLM) and leaves no grandchildren to outlive a killed actor.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    return vllm.LLM(**args)


def make_async_engine(
    model: str | Path,
    *,
    max_model_len: int,
    dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    **options: Any,
):
    """A vLLM `AsyncLLM`: continuous batching, each request's tokens streamed as they are sampled.

    Its engine core always runs in a child process (the async engine has no in-process mode); it ends with
    `shutdown()`, or on its own when this process dies. ``gpu_memory_utilization`` is the share of the GPU this
    engine may take (several engines may share one GPU); None keeps vLLM's default. ``options``: more engine
    arguments (LoRA's, for one).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = _engine_args(model, max_model_len=max_model_len, seed=0, dtype=dtype, bind_threads=False)
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args, **options))


def shutdown_llm(llm: Any) -> None:
    """Free the engine's KV cache now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): *(.*)$", re.MULTILINE)
_WRAPPERS = ("UserCodeException", "RayTaskError", "RayActorError")


def describe_failure(err: BaseException) -> str:
    """The engine's own error in one line, also when it comes back wrapped by Ray.

    Ray wraps an actor's exception and its cause does not survive the trip back; only the remote traceback text,
    whose last non-wrapper exception line is the engine's own error, does.
    """
    found = [m for m in _EXCEPTION_LINE.finditer(str(err)) if not m.group(1).endswith(_WRAPPERS)]
    if found:
        return f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2).strip()[:300]}"
    return f"{type(err).__name__}: {str(err).strip()[-300:]}"


def vllm_or_fallback(
    engine: str,
    what: str,
    with_vllm: Callable[[], T],
    fallback: Callable[[], T],
    on_fallback: Callable[[str], None] | None = None,
) -> T:
    """`with_vllm()` for engine vllm/auto, `fallback()` for hf or when auto's vLLM is missing or fails.

    engine "vllm" raises VLLMUnavailableError instead of falling back; auto calls `on_fallback(reason)` first.
    """
    if engine in ("vllm", "auto"):
        if not vllm_installed():
            reason = "vLLM is not installed (pip install 'rmdistill[vllm]')"
        else:
            try:
                return with_vllm()
            except Exception as err:  # auto falls back on any engine failure, and says why
                reason = f"vLLM could not run {what}: {describe_failure(err)}"
        if engine == "vllm":
            raise VLLMUnavailableError(reason)
        if on_fallback is not None:
            on_fallback(reason)
    return fallback()
