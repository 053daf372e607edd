"""Uploads: bytes content-addressed (by SHA-256) on a data-tier volume, metadata in Postgres. An upload belongs
to the client that sent it; another client's upload is as absent as one that never existed (404)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from deployments.gateway.refusal import Refusal, not_found
from deployments.services.db import Database, Upload, store_endpoint
from deployments.services.documents import detect
from deployments.services.settings import ServicesSettings

UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class BlobStore:
    """Files named by their SHA-256 under `root/ab/abcdef...`: the same bytes are kept once, and a reader can
    check what it got against the name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        if not dest.exists():
            dest.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)  # readers never see half a file
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha

    def read(self, sha: str) -> bytes:
        data = self.path(sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refusal(500, "corrupt_upload", f"stored bytes of {sha} do not match their hash")
        return data


def blob_lock(sha: str) -> int:
    """The Postgres advisory lock of a blob: its hash's first 60 bits (a bigint). Held by every write of a row
    that names the blob (until that row commits) and by the delete that removes the bytes once no row does."""
    return int(sha[:15], 16)


def put_locked(db: Any, blobs: BlobStore, data: bytes) -> str:
    """Writes the bytes under their blob's lock, held until `db` commits the row that names them: a delete of
    another row with the same bytes cannot find no row and unlink them in between."""
    sha = hashlib.sha256(data).hexdigest()
    db.execute(select(func.pg_advisory_xact_lock(blob_lock(sha))))
    return blobs.put(data)


def default_uploads_dir() -> Path:
    from rma_ray.settings import Settings

    return Settings().resolved_stores_dir / "uploads"


class Uploads:
    """The Serve deployment's class (placed on trusted data-tier nodes, next to the volume)."""

    def __init__(self, settings: dict[str, Any] | None = None, endpoint: Any = store_endpoint) -> None:
        self.settings = ServicesSettings(**(settings or {}))
        self.blobs = BlobStore(
            Path(self.settings.uploads_dir) if self.settings.uploads_dir else default_uploads_dir()
        )
        self.db = Database(self.settings.database, endpoint)

    def put(self, data: bytes, filename: str | None, content_type: str | None, owner: str) -> dict[str, Any]:
        if len(data) > self.settings.upload_max_bytes:
            raise Refusal(
                413,
                "file_too_large",
                f"the file is {len(data):,} bytes; the limit is {self.settings.upload_max_bytes:,}",
            )
        kind = detect(data, filename, content_type)  # refuses types we cannot use, and lies about the type
        with self.db.sessions().begin() as s:
            row = Upload(
                sha256=put_locked(s, self.blobs, data),
                owner=owner,
                filename=(filename or None) and filename[:500],
                content_type=kind,
                size=len(data),
            )
            s.add(row)
            s.flush()
            return row.as_dict()

    def _row(self, upload_id: str, owner: str) -> Upload:
        if not UPLOAD_ID.match(upload_id or ""):
            raise Refusal(404, "not_found", f"no upload with id {upload_id!r} (ids are 32 hex characters)")
        with self.db.sessions()() as s:
            row = s.get(Upload, upload_id)
        if row is None or row.owner != owner:
            raise not_found("upload", upload_id)
        return row

    def get(self, upload_id: str, owner: str) -> dict[str, Any]:
        return self._row(upload_id, owner).as_dict()

    def read(self, upload_id: str, owner: str) -> tuple[dict[str, Any], bytes]:
        row = self._row(upload_id, owner)
        try:
            return row.as_dict(), self.blobs.read(row.sha256)
        except FileNotFoundError:
            raise Refusal(
                410, "upload_gone", f"the bytes of upload {upload_id} are no longer on this volume"
            ) from None

    def check_health(self) -> None:
        if not os.access(self.blobs.root, os.W_OK):
            raise RuntimeError(f"uploads volume {self.blobs.root} is not writable")
