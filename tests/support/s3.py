"""An S3-compatible server for the artifact root's tests: moto's server mode (`moto[server]` from the package index)
in a subprocess on a free port, spoken to over real HTTP, stopped when the tests end (also when they fail).

The credentials are made up per server, as a real deployment's would be secret: tests check the secret never
reaches a log, an event or an API answer. In a network namespace (tests/support/hosts.py) the server listens on
that host's address, and this process's own calls to it go through the host's `call`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.ray_backend import free_port
from support.hosts import Host


def _here(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    log: Path
    # Runs a client call where the server is reachable: a namespaced host's `call`, else right here.
    via: Callable[[Callable[[], Any]], Any] = _here

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server: the standard AWS variables, as a deployment sets them."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # boto3's, the independent reader the tests check the root with
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns its s3:// URI."""
        self.via(lambda: self.client().create_bucket(Bucket=name))
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`: key → bytes; not the empty ``folder/`` objects by which pyarrow's S3
        filesystem keeps a folder that it emptied (S3 has no folders), which hold nothing."""

        def read() -> dict[str, bytes]:
            client = self.client()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

        return self.via(read)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the server answered so far, in order (from its access log)."""
        pattern = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/')
        return [m.groups() for m in pattern.finditer(self.log.read_text())]


@contextlib.contextmanager
def s3_server(host: Host | None = None) -> Iterator[S3Server]:
    """Start moto's S3 server on loopback, or on a namespaced host's address inside its namespace."""
    ip = host.ip if host else "127.0.0.1"
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="rmdistill-moto-", suffix=".log")[1])
    via = host.call if host else _here
    server = S3Server(f"http://{ip}:{port}", "rmdistill-test", secrets.token_hex(16), log, via)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "moto.server", "-H", ip, "-p", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            host.command(argv) if host else argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"moto's server exited:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"moto's server did not come up:\n{log.read_text()[-2000:]}"
            with contextlib.suppress(httpx.TransportError):
                if via(lambda: httpx.get(f"{server.endpoint}/moto-api/", timeout=2).status_code) == 200:
                    break
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)
