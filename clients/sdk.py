"""Python SDK for the rmdistill service (httpx, plus the standard-library-only ray_jobs.names: works from the light
client install).

from clients.sdk import Client
with Client("http://127.0.0.1:8000", token="...") as rm:
    job = rm.submit({"name": "demo", "reference": "tiny:llama"})
    for event in rm.follow(job["id"]):
        print(event["kind"], event.get("stage"))
    rm.wait(job["id"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ray_jobs.names import FINAL_STATES

# How long `wait` keeps polling a service it cannot reach (a restart takes seconds; an upgrade a few minutes).
MAX_UNREACHABLE_S = 300.0


class RmdistillError(RuntimeError):
    """An error answer from the service: HTTP status, its message and the fields it names."""

    def __init__(self, status: int, message: str, fields: list[dict[str, str]] | None = None):
        self.status, self.message, self.fields = status, message, fields or []
        super().__init__(f"HTTP {status}: {message}")


def _load_spec(spec: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """(id, event, data) for each server-sent event; comments (keep-alives) are skipped."""
    event_id, kind, data = None, "message", []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, "\n".join(data)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)


class Client:
    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 30.0):
        base_url = base_url or os.environ.get("RMDISTILL_URL", "http://127.0.0.1:8000")
        token = token if token is not None else os.environ.get("RMDISTILL_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        response.read()
        try:
            error = response.json()["error"]
            message, fields = error["message"], error.get("fields")
        except (ValueError, KeyError, TypeError):
            message, fields = response.text, None
        raise RmdistillError(response.status_code, message, fields)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._check(self._http.request(method, path, **kwargs))

    # -- jobs --
    def submit(self, spec: dict[str, Any] | str | Path) -> dict[str, Any]:
        """Submit a spec (a mapping, or a .yaml/.json file); the service validates it and answers with the job."""
        return self._request("POST", "/v1/jobs", json=_load_spec(spec)).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, state: str | None = None, name: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {k: v for k, v in {"state": state, "name": name, "limit": limit, "offset": offset}.items() if v}
        return self._request("GET", "/v1/jobs", params=params).json()

    def events(self, job_id: str, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/events", params={"offset": offset, "limit": limit}).json()

    def follow(self, job_id: str, offset: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events as they happen (SSE); ends after job_finished or the service's final `end` event.

        A dropped connection is resumed from the last event id, so no event is seen twice or lost.
        """
        last_id = str(offset)
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": last_id}
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=None)
                ) as response:
                    self._check(response)
                    for event_id, _, data in parse_sse(response.iter_lines()):
                        last_id = event_id or last_id
                        event = json.loads(data)
                        yield event
                        if event.get("kind") in ("job_finished", "end"):
                            return
                return
            except httpx.TransportError:
                time.sleep(1.0)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def logs(self, job_id: str, tail: int | None = None) -> str:
        """The driver's log, or only its last `tail` lines."""
        params = {"tail": tail} if tail else None
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the job is final; TimeoutError (with the last state) after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        unreachable_since: float | None = None
        while True:
            try:
                job = self.get(job_id)
            except httpx.TransportError:
                # A dropped connection or a restarting service must not end a wait of hours (an experiment's);
                # the job runs on regardless. Only a service gone for good is an error.
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > MAX_UNREACHABLE_S:
                    raise
                time.sleep(poll_s)
                continue
            unreachable_since = None
            if job["state"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} (stage {job.get('stage')}) after {timeout} s")
            time.sleep(poll_s)

    def report(self, job_id: str) -> dict[str, Any]:
        """A finished job's evaluation report (evaluate/report.json)."""
        return self.results(job_id)["evaluate"]

    def results(self, job_id: str) -> dict[str, Any]:
        """A finished job's {"data": data summary, "evaluate": evaluation report with per-sample scores}."""
        return self._request("GET", f"/v1/jobs/{job_id}/results").json()

    def succeeded(self, job_id: str) -> bool:
        """Whether this caller's job `job_id` exists and succeeded (an experiment reuses such a group leader)."""
        try:
            return self.get(job_id)["state"] == "succeeded"
        except RmdistillError as err:
            if err.status == 404:
                return False
            raise

    def run(self, spec: dict[str, Any]) -> tuple[str, str]:
        """Submit a spec and wait for it to end: (job id, final state). With `results`, a runner for experiments."""
        job = self.submit(spec)
        return job["id"], self.wait(job["id"], poll_s=2.0)["state"]

    # -- artifacts and datasets --
    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """What the job published: {path, kind, bytes, media_type, url} per file, then one archive per stage."""
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["items"]

    def download(self, job_id: str, path: str, dest: str | Path) -> Path:
        """Stream one artifact (a listed path, e.g. distill.tar.gz for the policy) into the file `dest`; the file
        appears only once complete."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        try:
            timeout = httpx.Timeout(30.0, read=300.0)
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{path}", timeout=timeout) as response:
                self._check(response)
                with partial.open("wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return dest

    def upload(self, path: str | Path, name: str | None = None, format: str = "auto") -> dict[str, Any]:
        """Upload a preference file into the caller's data area; the service validates every row first. Returns
        {name, source (the value for data.source), bytes, format, rows, uploaded_at}."""
        path = Path(path)
        with path.open("rb") as fh:
            return self._request(
                "PUT",
                f"/v1/datasets/{name or path.name}",
                content=fh,
                params={"format": format},
                headers={"Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(30.0, write=300.0, read=300.0),
            ).json()

    def datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets").json()["items"]

    def delete_dataset(self, name: str) -> None:
        self._request("DELETE", f"/v1/datasets/{name}")

    # -- experiments run by the service --
    def submit_experiment(self, spec: dict[str, Any] | str | Path, quick: bool = False) -> dict[str, Any]:
        return self._request("POST", "/v1/experiments", json={"spec": _load_spec(spec), "quick": quick}).json()

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/experiments/{experiment_id}").json()

    # -- policies --
    def policies(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/policies").json()["items"]

    def policy(self, policy_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/policies/{policy_id}").json()

    def register_policy(self, path: str, policy_id: str | None = None, **fields: Any) -> dict[str, Any]:
        return self._request("POST", "/v1/policies", json={"path": path, "id": policy_id, **fields}).json()

    def chat(self, policy: str, messages: list[dict[str, str]] | str, **params: Any) -> dict[str, Any]:
        """OpenAI-style chat completion from a policy (a plain string becomes one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": policy, "messages": messages, **params}
        return self._request("POST", "/v1/chat/completions", json=body, timeout=300.0).json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()
