"""Submit a job to a running service, follow it to the end, then query the trained policy (scripts/demo.sh)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
from openai import OpenAI

from clients.sdk import Client


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"the service at {url} did not answer /healthz within {timeout_s:.0f} s")


def describe(event: dict) -> str | None:
    kind, stage = event["kind"], event.get("stage") or ""
    if kind == "stage_finished":
        return f"  {stage:<9} done in {event.get('seconds', 0):.0f} s"
    if kind == "stage_skipped":
        return f"  {stage:<9} already complete"
    if kind == "stage_started":
        return f"  {stage:<9} started"
    if kind in ("error", "log"):
        return f"  {stage:<9} {event.get('message')}"
    if kind == "metrics" and event.get("step", 0) % 10 == 0:
        values = {k: round(v, 4) if isinstance(v, float) else v for k, v in list(event["values"].items())[:4]}
        return f"  {stage:<9} step {event.get('step')}: {values}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spec", default="examples/quickstart.yaml")
    args = parser.parse_args()
    wait_healthy(args.url)
    started = time.time()
    with Client(args.url) as client:
        job = client.submit(args.spec)
        print(f"submitted job {job['id']}")
        for event in client.follow(job["id"]):
            line = describe(event)
            if line:
                print(line, flush=True)
        job = client.wait(job["id"])
        print(f"job {job['id']}: {job['state']} after {time.time() - started:.0f} s")
        if job["state"] != "succeeded":
            print(client.logs(job["id"])[-4000:])
            return 1
        report = client.policy(job["id"]).get("summary", {}).get("eval") or {}
        report.pop("examples", None)
        print("evaluation (evaluate/report.json):", json.dumps(report, indent=2))
    openai = OpenAI(base_url=f"{args.url}/v1", api_key="unused")
    reply = openai.chat.completions.create(
        model=job["id"],
        messages=[{"role": "user", "content": "In one sentence, review a small seaside café."}],
        max_tokens=96,
        temperature=0.7,
    )
    print(f"\npolicy {job['id']} says:\n{reply.choices[0].message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
