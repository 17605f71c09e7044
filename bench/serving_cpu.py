"""Serving's CPU cost per streamed token, process by process: the service against vLLM's own server.

    python bench/serving_cpu.py --model builtin:smollm2-135m --requests 4 --max-tokens 64

Wall-clock latency on a shared machine measures the machine as much as the server; CPU seconds do not. One client
streams `--requests` chat completions one after another from each server (built as `bench/serving.py` builds them,
one after the other) and reads every process's CPU time before and after: the engine's two processes (vLLM's engine
core and its worker), and what each server adds around them (the service's API, Serve's replica and controller,
Ray's GCS and raylet; `vllm serve`'s API server). Prints a Markdown table of milliseconds of CPU per token.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from serving import PROMPTS, _service, _vllm_serve

# This process: the client, and for rmdistill the service's API server too (it runs in this process).
HERE = "this process: client (+ rmdistill API)"
# A process's role by what its command line holds; the first match wins.
ROLES = (
    ("VLLM::EngineCore", "engine core"),
    ("VLLM::Worker", "engine worker"),
    ("ServeReplica", "Serve replica"),
    ("ServeController", "Serve controller"),
    ("ProxyActor", "Serve proxy"),
    ("vllm.entrypoints.openai.api_server", "vLLM API server"),
    ("gcs_server", "Ray GCS"),
    ("raylet", "Ray raylet"),
)


def _cpu_by_role() -> dict[tuple[str, int], float]:
    """CPU seconds so far of this process and of every descendant with a role: the Ray cluster this process
    started, or the `vllm serve` it runs, never another Ray on the machine."""
    seconds = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            text = " ".join(process.cmdline()) + " " + process.name()
            role = HERE if process.pid == me.pid else next((r for key, r in ROLES if key in text), None)
            if role is not None:
                times = process.cpu_times()
                seconds[(role, process.pid)] = times.user + times.system
        except psutil.Error:  # gone meanwhile
            continue
    return seconds


def measure(server: Callable, name: str, args: argparse.Namespace, model_path: Path) -> dict[str, float]:
    """Milliseconds of CPU per completion token, by role, over `args.requests` sequential streams."""
    with server(model_path, args.cpus, args.max_model_len) as (url, model, headers):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        httpx.post(url, json={**body, "stream": False, "max_tokens": 2}, headers=headers, timeout=900)
        before, tokens = _cpu_by_role(), 0
        for _ in range(args.requests):
            with httpx.stream("POST", url, json=body, headers=headers, timeout=900) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                        tokens += usage["completion_tokens"]
        after = _cpu_by_role()
    per_role: dict[str, float] = {}
    for key, spent in after.items():
        # Only processes there before the streams: none of them starts one.
        if key in before:
            per_role[key[0]] = per_role.get(key[0], 0.0) + 1000 * (spent - before[key]) / max(tokens, 1)
    print(f"{name}: {tokens} tokens", flush=True)
    return per_role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cpus", type=int, default=1, help="CPU threads each server's engine computes with")
    args = parser.parse_args()

    from ray_jobs.models.registry import resolve_model_path

    model_path = Path(resolve_model_path(args.model))
    rows = {"rmdistill": measure(_service, "rmdistill", args, model_path)}
    rows["vllm serve"] = measure(_vllm_serve, "vllm serve", args, model_path)
    roles = [role for _, role in ROLES if any(role in r for r in rows.values())] + [HERE]
    print(f"\nms of CPU per streamed token, {args.requests} streams of {args.max_tokens} tokens, {args.cpus} thread(s)")
    print("| process | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for role in roles:
        print(f"| {role} | " + " | ".join(f"{r[role]:.1f}" if role in r else "" for r in rows.values()) + " |")
    print("| **all** | " + " | ".join(f"{sum(r.values()):.1f}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
