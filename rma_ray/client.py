"""The admission API client (httpx), used by the CLI, the donor agent and the Serve side.

Every failure becomes an `AdmissionError` carrying one line for a person: the coordinator's own message for a
4xx, or what to check when it cannot be reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from rma_ray import wire
from rma_ray.capabilities import Capabilities

M = TypeVar("M", bound=BaseModel)


@dataclass
class AdmissionError(Exception):
    message: str
    status: int | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


class AdmissionClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdmissionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        if token:
            kwargs.setdefault("headers", {})["Authorization"] = f"Bearer {token}"
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise AdmissionError(
                f"cannot reach the coordinator at {self.base_url}: connection refused or no route; "
                f"check the URL and that it is running"
            ) from None
        except httpx.TimeoutException:
            raise AdmissionError(f"the coordinator at {self.base_url} did not answer in time") from None
        except httpx.InvalidURL as exc:
            raise AdmissionError(f"invalid coordinator URL {self.base_url!r}: {exc}") from None
        except httpx.HTTPError as exc:
            raise AdmissionError(f"request to {self.base_url} failed: {exc}") from None
        if resp.status_code == 204:
            return None
        if resp.is_success:
            try:
                return resp.json()
            except ValueError:
                raise AdmissionError(
                    f"{self.base_url} answered {resp.status_code} but not with JSON; "
                    f"is this an RMA coordinator?"
                ) from None
        try:
            err = resp.json()["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = None, f"{resp.status_code} {resp.reason_phrase} from {self.base_url}{path}"
        if resp.status_code == 404 and (code is None or message == "Not Found"):  # no such route: a wrong URL
            message = (
                f"{resp.status_code} {resp.reason_phrase} from {self.base_url}{path} (is this an RMA "
                f"coordinator URL?)"
            )
        raise AdmissionError(message, resp.status_code, code)

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """An admin reply that is one JSON object (the admin routes' shapes live in admission/schemas.py)."""
        data = self.request(method, path, **kwargs)
        if not isinstance(data, dict):
            raise AdmissionError(f"{self.base_url}{path} answered {type(data).__name__}, not a JSON object")
        return data

    def _rows(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        data = self.request(method, path, **kwargs)
        if not isinstance(data, list):
            raise AdmissionError(f"{self.base_url}{path} answered {type(data).__name__}, not a JSON list")
        return data

    def _reply(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        """A wire reply parsed into its model; a reply of another shape is one line, not a KeyError later."""
        data = self.request(method, path, **kwargs)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            raise AdmissionError(
                f"{self.base_url}{path} answered an unexpected {model.__name__} "
                f"({where}: {first['msg']}); is the coordinator a matching version?"
            ) from None

    # donor side: the models of rma_ray/wire.py, which the coordinator validates and answers with
    @staticmethod
    def _join_body(name: str, capabilities: Capabilities, overlay_public_key: str | None) -> dict[str, Any]:
        overlay = wire.OverlayRequest(public_key=overlay_public_key) if overlay_public_key else None
        body = wire.RegisterRequest(name=name, capabilities=capabilities, overlay=overlay).model_dump(
            mode="json"
        )
        if overlay is None:  # a pool without an overlay: the field stays out, as it always did
            del body["overlay"]
        return body

    def register(
        self, join_token: str, name: str, capabilities: Capabilities, overlay_public_key: str | None = None
    ) -> wire.RegisterResponse:
        return self._reply(
            wire.RegisterResponse,
            "POST",
            "/api/worker/register",
            token=join_token,
            json=self._join_body(name, capabilities, overlay_public_key),
        )

    def rejoin(
        self, node_token: str, name: str, capabilities: Capabilities, overlay_public_key: str | None = None
    ) -> wire.RejoinResponse:
        """Come back as the same donor after a restart; no join token is spent."""
        return self._reply(
            wire.RejoinResponse,
            "POST",
            "/api/worker/rejoin",
            token=node_token,
            json=self._join_body(name, capabilities, overlay_public_key),
        )

    def abort(self, node_token: str) -> bool:
        """End a registration whose node never started; True when its invite use was given back."""
        return self._reply(wire.AbortResponse, "POST", "/api/worker/abort", token=node_token).refunded

    def heartbeat(self, node_token: str, beat: wire.HeartbeatRequest | None = None) -> wire.HeartbeatResponse:
        body = (beat or wire.HeartbeatRequest()).model_dump(mode="json")
        return self._reply(
            wire.HeartbeatResponse, "POST", "/api/worker/heartbeat", token=node_token, json=body
        )

    def donor_versions(self) -> wire.DonorVersions:
        """The head's Python, Ray and pool versions (public: a donor has no credential before it joins)."""
        return self._reply(wire.DonorVersions, "GET", "/donor/versions.json")

    def ray_info(self, node_token: str) -> wire.RayInfo:
        """The head's address and the current cluster token (after a rotation)."""
        return self._reply(wire.RayInfo, "GET", "/api/worker/ray", token=node_token)

    def me(self, node_token: str | None = None) -> wire.WorkerOut:
        """The registry's record of this donor (a client built with the node token may leave it out)."""
        return self._reply(wire.WorkerOut, "GET", "/api/worker/me", token=node_token)

    def unregister(self, node_token: str) -> None:
        self.request("DELETE", "/api/worker/unregister", token=node_token)

    # the Serve side (a service credential): the keyring of live client keys
    def fetch_keyring(self) -> wire.KeyringOut:
        return self._reply(wire.KeyringOut, "GET", "/api/clients/keyring")

    def keyring(self) -> dict[str, Any]:
        """The keyring as JSON data (what `ClientKeyVerifier` reads), checked against the wire model first."""
        return self.fetch_keyring().model_dump(mode="json")

    # admin side (the client was built with the admin key)
    def create_invite(self, **fields: Any) -> dict[str, Any]:
        return self._object("POST", "/api/invites", json=fields)

    def workers(self, **params: Any) -> list[dict[str, Any]]:
        return self._rows("GET", "/api/admin/workers", params={k: v for k, v in params.items() if v})

    def revoke_worker(self, worker_id: str) -> dict[str, Any]:
        return self._object("POST", f"/api/admin/workers/{worker_id}/revoke")

    def create_client(
        self,
        name: str,
        sensitive: bool = False,
        donor_id: str | None = None,
        quota: wire.Quota | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, **({"sensitive": True} if sensitive else {})}
        if donor_id is not None:
            body["donor_id"] = donor_id
        if quota is not None:
            body["quota"] = quota.model_dump(exclude_none=True)
        return self._object("POST", "/api/admin/clients", json=body)

    def link_client_donor(self, key_id: str, donor_id: str | None) -> dict[str, Any]:
        return self._object("PUT", f"/api/admin/clients/{key_id}/donor", json={"donor_id": donor_id})

    # edge clusters: the admin rotates an edge's credential; the core's gateway reads the routes
    def rotate_edge_credential(self, edge: str) -> dict[str, Any]:
        return self._object("POST", f"/api/admin/edges/{edge}/rotate-credential")

    def edge_routes(self) -> wire.EdgeRoutes:
        """Every edge with a fresh credential and its Serve status (a service or trusted core credential)."""
        return self._reply(wire.EdgeRoutes, "POST", "/api/service/edge-routes")

    def clients(self) -> list[dict[str, Any]]:
        return self._rows("GET", "/api/admin/clients")

    def revoke_client(self, key_id: str) -> dict[str, Any]:
        return self._object("POST", f"/api/admin/clients/{key_id}/revoke")

    def set_client_quota(self, key_id: str, patch: wire.QuotaPatch) -> dict[str, Any]:
        return self._object(
            "PUT", f"/api/admin/clients/{key_id}/quota", json=patch.model_dump(exclude_none=True)
        )

    def usage(self, days: int = 1) -> dict[str, Any]:
        return self._object("GET", "/api/admin/usage", params={"days": days})

    # the Serve side (a service credential): a gateway replica's usage report
    def report_usage(self, report: wire.UsageReport) -> None:
        self.request("POST", "/api/clients/usage", json=report.model_dump(mode="json"))

    # the Serve side (a service credential): a batches replica's queue figures
    def report_batch_queue(self, report: wire.BatchQueueReport) -> None:
        self.request("POST", "/api/service/batch-queue", json=report.model_dump(mode="json"))

    # the Serve side (a service credential): a core gateway's verdict on a sampled edge answer
    def report_spot_check(self, report: wire.SpotCheckReport) -> None:
        self.request("POST", "/api/service/spot-checks", json=report.model_dump(mode="json"))
