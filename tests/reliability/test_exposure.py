"""The service refuses to listen beyond loopback without tokens, unless told --insecure (and then it says so)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from clients.cli import app
from service.settings import Settings, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)]
    + [("10.0.0.5", False), ("example.org", False)],
)
def test_loopback_means_this_machine_only(host, loopback):
    assert is_loopback(host) is loopback


def test_an_open_bind_needs_tokens_or_insecure(tmp_path):
    with pytest.raises(ValidationError, match="no tokens are set.*--insecure"):
        Settings(data_dir=tmp_path, host="0.0.0.0")
    assert Settings(data_dir=tmp_path, host="0.0.0.0", tokens=["t"]).auth_enabled
    assert Settings(data_dir=tmp_path, host="0.0.0.0", insecure=True).insecure
    assert not Settings(data_dir=tmp_path).auth_enabled  # loopback without tokens stays the laptop default


def test_rmdistill_serve_refuses_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.delenv("RMDISTILL_TOKENS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no tokens are set" in result.output and "--insecure" in result.output
    assert not (tmp_path / "rmdistill.db").exists()  # refused before the store or a Ray head was touched


def test_serve_gives_its_process_a_fresh_embedded_token_before_ray_is_imported(tmp_path):
    """Ray reads RAY_AUTH_MODE and the token when it is imported: `rmdistill serve` must set them first, or its
    own serving driver cannot join the token-protected embedded head."""
    import subprocess
    import sys

    code = (
        "import os, sys; from pathlib import Path; from service.ray_backend import prepare_embedded_auth; "
        f"prepare_embedded_auth(Path({str(tmp_path)!r})); "
        "print(os.environ['RAY_AUTH_MODE'], os.environ['RAY_AUTH_TOKEN_PATH'], 'ray' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    token_file = tmp_path / "ray-auth-token"
    assert first == ["token", str(token_file), "False"]
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0 and token_file.stat().st_mode & 0o077 == 0
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert token_file.read_text() != token  # fresh per start


def test_the_service_imports_no_ray_until_it_starts():
    """What `rmdistill serve` imports before it sets the embedded head's auth variables must not import Ray: a Ray
    imported earlier reads no token, and the serving driver is refused by the head (the first request was a 500)."""
    import subprocess
    import sys

    code = "import sys, clients.cli, service.app; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
