"""Serving: the service (auth, the OpenAI surface, Ray Serve, vLLM's async engine) against vLLM's own OpenAI server
(`vllm serve`) on the same policy and machine, at 1, 8 and 32 concurrent streams.

    python bench/serving.py --model builtin:smollm2-135m --concurrency 1 8 32 --requests 32 --max-tokens 64

Each client streams `/v1/chat/completions` (temperature 0, the same prompts to both, rendered by the policy's own
chat template) and times its request: time to first
token (the first chunk with text), inter-token latency (the mean gap between its chunks with text) and the whole
request. The two servers run one after the other, never together, each with the same CPU threads (`--cpus`; a GPU
when there is one). Prints a Markdown table; --json writes the rows too. Speed claims live here, not in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PROMPTS = [
    "Write a one-line review of a film about a lighthouse keeper.",
    "Describe the soundtrack of a science-fiction movie in one sentence.",
    "What makes a comedy feel too long?",
    "Summarise a heist movie plot in a sentence.",
    "Give a short opinion on black-and-white cinematography.",
    "Name one strength of a slow-burning thriller.",
    "Describe an ending that surprised you.",
    "How should a documentary open?",
]
TOKEN = "bench-token"
# Nothing here may start a Ray of its own after the service's cluster is shut down (read when Ray is imported).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")


@contextmanager
def _service(model_path: Path, cpus: int, max_model_len: int) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The service on uvicorn, its vLLM deployment on a local Ray; yields (chat URL, model name, headers)."""
    import ray

    from service.background import BackgroundServer
    from service.settings import ServingSettings, Settings

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    home = Path(tempfile.mkdtemp(prefix="rmdistill-bench-serving-"))
    settings = Settings(
        data_dir=home,
        data_roots=(model_path.parent,),
        tokens=[TOKEN],
        ray_address=ray.get_runtime_context().gcs_address,
        serving=ServingSettings(engine="vllm", num_cpus=cpus, max_model_len=max_model_len),
    )
    server = BackgroundServer(settings).start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        r = httpx.post(f"{server.url}/v1/policies", json={"path": str(model_path), "id": "bench"}, headers=headers)
        r.raise_for_status()
        yield f"{server.url}/v1/chat/completions", "bench", headers
    finally:
        server.stop()
        from ray import serve

        serve.shutdown()  # ends this process's handles too, which would otherwise go on calling Ray
        ray.shutdown()


@contextmanager
def _vllm_serve(model_path: Path, cpus: int, max_model_len: int) -> Iterator[tuple[str, str, dict[str, str]]]:
    """`vllm serve` in a subprocess, built like the service's engine: eager, fp32 on a CPU, the same threads."""
    import torch

    from ray_jobs.generate.vllm import DEFAULT_CPU_KVCACHE_GIB
    from service.ray_backend import free_port

    port = free_port()
    dtype = "auto" if torch.cuda.is_available() else "float32"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(cpus),
    }
    # The server `vllm serve` starts, run as its module: the `vllm` command reads the version of a distribution
    # named vllm, and the CPU build installs as vllm-cpu (PackageNotFoundError before anything starts).
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path)]
    command = [*server, "--port", str(port), "--dtype", dtype, "--enforce-eager"]
    command += ["--max-model-len", str(max_model_len), "--served-model-name", "bench", "--disable-log-stats"]
    log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"{url}/v1/chat/completions", "bench", {}
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


async def _stream(http: httpx.AsyncClient, url: str, body: dict) -> dict[str, float]:
    """One streamed completion: its time to first token, mean inter-token gap, total time and tokens."""
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "ttft_s": arrivals[0] - start if arrivals else float("nan"),
        "itl_s": statistics.mean(gaps) if gaps else float("nan"),
        "total_s": time.perf_counter() - start,
        "tokens": tokens,
    }


async def _level(url: str, model: str, headers: dict, concurrency: int, total: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    results: list[dict[str, float]] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=900, limits=limits) as http:

        async def one(i: int) -> None:
            nonlocal errors
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with gate:
                try:
                    results.append(await _stream(http, url, body))
                except httpx.HTTPError:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        wall = time.perf_counter() - start
    # A request whose answer had no text (an immediate end of sequence) has no first token; one with a single
    # chunk has no gap. They count in the rates, not in these times.
    ttfts = [r["ttft_s"] for r in results if not math.isnan(r["ttft_s"])]
    gaps = [r["itl_s"] for r in results if not math.isnan(r["itl_s"])]
    return {
        "concurrency": concurrency,
        "requests": total,
        "errors": errors,
        "without_text": len(results) - len(ttfts),
        "requests_s": len(results) / wall,
        "tokens_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else math.nan,
        "itl_mean_s": statistics.mean(gaps) if gaps else math.nan,
        "wall_s": wall,
    }


def _measure(server: Callable, name: str, args: argparse.Namespace, model_path: Path) -> list[dict]:
    rows = []
    with server(model_path, args.cpus, args.max_model_len) as (url, model, headers):
        # The first request starts the engine (the service loads the policy on first use): not part of the figures.
        warm = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
        httpx.post(url, json=warm, headers=headers, timeout=900).raise_for_status()
        for c in args.concurrency:
            row = asyncio.run(_level(url, model, headers, c, max(args.requests, c), args.max_tokens))
            rows.append({"server": name, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # kept should a later server fail
    return rows


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"model {args.model}, max_tokens {args.max_tokens}, temperature 0, {args.cpus} CPU threads per server",
        "",
        "| streams | server | req/s | tok/s | TTFT p50 s | ITL mean ms | errors | req/s vs vllm | TTFT vs vllm |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = {r["concurrency"]: r for r in rows if r["server"] == "vllm serve"}
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["server"])):
        peer = peers.get(r["concurrency"])
        ratio = f"{r['requests_s'] / peer['requests_s']:.2f}x" if peer and r is not peer else ""
        ttft = f"{r['ttft_p50_s'] / peer['ttft_p50_s']:.2f}x" if peer and r is not peer else ""
        lines.append(
            f"| {r['concurrency']} | {r['server']} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} | "
            f"{r['ttft_p50_s']:.3f} | {1000 * r['itl_mean_s']:.1f} | {r['errors']} | {ratio} | {ttft} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="per concurrency level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPU threads each server computes with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from ray_jobs.models.registry import resolve_model_path

    model_path = Path(resolve_model_path(args.model))
    rows = _measure(_service, "rmdistill", args, model_path) + _measure(_vllm_serve, "vllm serve", args, model_path)
    print(_table(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
