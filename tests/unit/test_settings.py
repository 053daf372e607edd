from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from rma_ray.settings import Settings


@pytest.mark.parametrize("weak", ["", "changeme", "secret", "  Password "])
def test_refuses_weak_secret(weak: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_SECRET_KEY", weak)
    with pytest.raises(ValidationError, match="well-known default"):
        Settings()


def test_dev_flag_allows_weak_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_SECRET_KEY", "dev")
    monkeypatch.setenv("RMA_DEV", "1")
    assert Settings().resolved_secret_key() == "dev"


def test_generated_secret_is_kept_private_and_stable(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    first = s.resolved_secret_key()
    assert len(first) == 64 and first == Settings(data_dir=tmp_path).resolved_secret_key()
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


def test_default_database_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).resolved_database_url == f"sqlite:///{tmp_path}/coordinator.db"


def test_secret_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_SECRET_KEY", "a-real-secret-value-123")
    assert "a-real-secret-value-123" not in repr(Settings())


@pytest.mark.parametrize("value", ["*", "10.0.0.0/8, *", " * "])
def test_a_wildcard_trusted_proxy_is_refused(value: str, tmp_path: Path) -> None:
    """`*` would let every client name its own IP in the forwarded header (and spend anyone's rate limit)."""
    with pytest.raises(ValidationError, match="lets every client choose its own IP"):
        Settings(data_dir=tmp_path, trusted_proxies=value)
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, trusted_proxies="proxy.example")
    ok = Settings(data_dir=tmp_path, trusted_proxies="10.0.0.0/8, 172.16.0.1")
    assert ok.trusted_proxies == "10.0.0.0/8, 172.16.0.1"
