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
