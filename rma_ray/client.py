"""The admission API client (httpx), used by the CLI, the donor agent and the Serve side.

Every failure becomes an `AdmissionError` carrying one line for a person: the coordinator's own message for a
4xx, or what to check when it cannot be reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from rma_ray.capabilities import Capabilities


@dataclass
class AdmissionError(Exception):
    message: str
    status: int | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


class AdmissionClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

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
            raise AdmissionError(f"cannot reach the coordinator at {self.base_url}: connection refused or no route; "
                                 f"check the URL and that it is running") from None
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
                raise AdmissionError(f"{self.base_url} answered {resp.status_code} but not with JSON; "
                                     f"is this an RMA coordinator?") from None
        try:
            err = resp.json()["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = None, f"{resp.status_code} {resp.reason_phrase} from {self.base_url}{path}"
        if resp.status_code == 404 and (code is None or message == "Not Found"):  # no such route: a wrong URL
            message = f"{resp.status_code} {resp.reason_phrase} from {self.base_url}{path} (is this an RMA " \
                      f"coordinator URL?)"
        raise AdmissionError(message, resp.status_code, code)

    # donor side
    def register(self, join_token: str, name: str, capabilities: Capabilities,
                 overlay_public_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "capabilities": capabilities.model_dump()}
        if overlay_public_key:
            body["overlay"] = {"public_key": overlay_public_key}
        return self.request("POST", "/api/worker/register", token=join_token,  # type: ignore[no-any-return]
                            json=body)

    def rejoin(self, node_token: str, name: str, capabilities: Capabilities,
               overlay_public_key: str | None = None) -> dict[str, Any]:
        """Come back as the same donor after a restart; no join token is spent."""
        body: dict[str, Any] = {"name": name, "capabilities": capabilities.model_dump()}
        if overlay_public_key:
            body["overlay"] = {"public_key": overlay_public_key}
        return self.request("POST", "/api/worker/rejoin", token=node_token,  # type: ignore[no-any-return]
                            json=body)

    def abort(self, node_token: str) -> bool:
        """End a registration whose node never started; True when its invite use was given back."""
        return bool(self.request("POST", "/api/worker/abort", token=node_token)["refunded"])

    def heartbeat(self, node_token: str, **beat: Any) -> dict[str, Any]:
        return self.request("POST", "/api/worker/heartbeat", token=node_token, json=beat)  # type: ignore[no-any-return]

    def unregister(self, node_token: str) -> None:
        self.request("DELETE", "/api/worker/unregister", token=node_token)

    # admin side (the client was built with the admin key)
    def create_invite(self, **fields: Any) -> dict[str, Any]:
        return self.request("POST", "/api/invites", json=fields)  # type: ignore[no-any-return]

    def workers(self, **params: Any) -> list[dict[str, Any]]:
        return self.request("GET", "/api/admin/workers", params={k: v for k, v in params.items() if v})  # type: ignore[no-any-return]

    def revoke_worker(self, worker_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/admin/workers/{worker_id}/revoke")  # type: ignore[no-any-return]

    def create_client(self, name: str) -> dict[str, Any]:
        return self.request("POST", "/api/admin/clients", json={"name": name})  # type: ignore[no-any-return]

    def clients(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/admin/clients")  # type: ignore[no-any-return]

    def revoke_client(self, key_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/admin/clients/{key_id}/revoke")  # type: ignore[no-any-return]

    def keyring(self) -> dict[str, Any]:
        return self.request("GET", "/api/clients/keyring")  # type: ignore[no-any-return]
