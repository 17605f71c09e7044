"""An S3-compatible server for the artifact root's tests: moto's server mode (`moto[server]` from the package index)
in a subprocess on a free port, spoken to over real HTTP, stopped when the tests end (also when they fail).

The credentials are made up per server, as a real deployment's would be secret: tests check the secret never
reaches a log, an event or an API answer.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.ray_backend import free_port


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    log: Path

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
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`: key → bytes."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the server answered so far, in order (from its access log)."""
        pattern = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/')
        return [m.groups() for m in pattern.finditer(self.log.read_text())]


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> Iterator[S3Server]:
    """Start moto's S3 server on `host` (under `prefix`, e.g. ``ip netns exec NS``, to serve inside a namespace)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="rmdistill-moto-", suffix=".log")[1])
    server = S3Server(f"http://{host}:{port}", "rmdistill-test", secrets.token_hex(16), log)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
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
                if httpx.get(f"{server.endpoint}/moto-api/", timeout=2).status_code == 200:
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
