"""Serving throughput: N concurrent clients against a policy through the service (HTTP, auth, validation, SSE-free
JSON) and against the same engine actor called directly, to measure what the service layer costs.

    python bench/serving.py --model builtin:smollm2-135m --concurrency 1 8 32 --requests 32 --max-tokens 16

Both paths hit the one actor the service loaded, so the difference is the HTTP front end and the manager, not the
model. Prints a Markdown table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
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


def _start_service(model_path: Path, home: Path, gcs_address: str):
    from service.background import BackgroundServer
    from service.settings import Settings

    settings = Settings(
        data_dir=home,
        data_roots=(model_path.parent,),
        tokens=[TOKEN],
        ray_address=gcs_address,
        max_loaded_policies=1,
    )
    server = BackgroundServer(settings).start()
    r = httpx.post(f"{server.url}/v1/policies", json={"path": str(model_path), "id": "bench"}, headers=_auth())
    r.raise_for_status()
    return server


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def _drive(call: Callable[[int], Awaitable[int]], total: int, concurrency: int) -> dict[str, float]:
    """Run ``total`` calls with at most ``concurrency`` in flight; each call returns its completion tokens."""
    latencies: list[float] = []
    tokens = errors = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal tokens, errors
        async with gate:
            start = time.perf_counter()
            try:
                # Awaited before the +=: `tokens += await ...` would read tokens before the wait and lose updates.
                done = await call(i)
            except Exception:
                errors += 1
                return
            tokens += done
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests_s": len(latencies) / wall,
        "tokens_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "errors": errors,
        "wall_s": wall,
    }


async def _bench(url: str, actor, concurrencies: list[int], requests: int, max_tokens: int) -> list[dict]:
    from service.engines import SamplingRequest

    def request(i: int) -> dict:
        return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens}

    async def direct(i: int) -> int:
        result = await actor.generate.remote(SamplingRequest(temperature=0.0, **request(i)))
        return result.completion_tokens

    rows = []
    limits = httpx.Limits(max_connections=max(concurrencies))
    async with httpx.AsyncClient(base_url=url, headers=_auth(), timeout=600, limits=limits) as http:

        async def service(i: int) -> int:
            r = await http.post("/v1/chat/completions", json={"model": "bench", "temperature": 0, **request(i)})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        for c in concurrencies:
            total = max(requests, c)
            d = await _drive(direct, total, c)
            s = await _drive(service, total, c)
            rows.append({"concurrency": c, "requests": total, "direct": d, "service": s})
            print(f"{c} clients: direct {d['wall_s']:.1f} s, service {s['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return rows


def _table(rows: list[dict], engine: str, model: str, max_tokens: int) -> str:
    lines = [
        f"model {model}, engine {engine}, max_tokens {max_tokens}, temperature 0",
        "",
        "| clients | path | req/s | tok/s | p50 s | p95 s | errors | overhead |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        d, s = row["direct"], row["service"]
        for name, m in (("direct", d), ("service", s)):
            overhead = f"{s['wall_s'] / d['wall_s']:.2f}x" if name == "service" else ""
            lines.append(
                f"| {row['concurrency']} | {name} | {m['requests_s']:.2f} | {m['tokens_s']:.1f} | {m['p50_s']:.3f} "
                f"| {m['p95_s']:.3f} | {m['errors']} | {overhead} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--engine", default=os.environ.get("RMDISTILL_SERVING_ENGINE", "auto"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="per concurrency level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from ray_jobs.models.registry import resolve_model_path

    os.environ["RMDISTILL_SERVING_ENGINE"] = args.engine
    model_path = Path(resolve_model_path(args.model))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    home = Path(tempfile.mkdtemp(prefix="rmdistill-bench-serving-"))
    server = _start_service(model_path, home, ray.get_runtime_context().gcs_address)
    url = server.url
    try:
        # The first request loads the actor; its time is engine start-up, not serving.
        warm = {"model": "bench", "prompt": "hello", "max_tokens": 2, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=warm, headers=_auth(), timeout=900).raise_for_status()
        engine = httpx.post(
            f"{url}/v1/policies/bench/generate", json={"prompt": "hi", "max_tokens": 1}, headers=_auth(), timeout=60
        ).json()["engine"]
        actor = server.app.state.engines.handle("bench")
        rows = asyncio.run(_bench(url, actor, args.concurrency, args.requests, args.max_tokens))
    finally:
        server.stop()
        ray.shutdown()
    print(_table(rows, engine, args.model, args.max_tokens))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "engine": engine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
