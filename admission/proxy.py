"""Whose address a request comes from. Forwarding headers are something any client can send, so they are
believed only when the connection itself comes from a configured proxy (`trusted_proxies`); everything keyed on
the client IP (rate limits, failed-auth limits, audit rows) depends on it. uvicorn's ProxyHeadersMiddleware reads
X-Forwarded-For/-Proto (right-most untrusted hop); a platform header such as Fly's `Fly-Client-IP`, which its
proxy overwrites, is read first when configured, from a trusted peer only."""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> list[Network]:
    """'127.0.0.1, 172.16.0.0/12' -> networks; a malformed entry is a settings error that says which."""
    nets = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "*":
            raise ValueError(
                "RMA_TRUSTED_PROXIES: '*' lets every client choose its own IP (and lock out anyone "
                "else's); list the proxy's addresses or CIDR networks instead"
            )
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"RMA_TRUSTED_PROXIES: {item!r} is not an IP address or CIDR network") from None
    return nets


class ClientAddress:
    def __init__(self, app: ASGIApp, trusted_proxies: str, client_ip_header: str | None = None) -> None:
        self.app = app
        self.networks = parse_networks(trusted_proxies)
        self.header = client_ip_header.lower().encode("latin1") if client_ip_header else None
        hosts = [str(n) for n in self.networks]
        # uvicorn parses the chain; with no trusted proxy it is skipped altogether
        self.forwarded = ProxyHeadersMiddleware(app, hosts) if hosts else None  # type: ignore[arg-type]

    def _trusted(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in n for n in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if (
            scope["type"] not in ("http", "websocket")
            or self.forwarded is None
            or not peer
            or not self._trusted(peer[0])
        ):
            return await self.app(scope, receive, send)
        if self.header is not None:
            value = next((v for k, v in scope["headers"] if k == self.header), None)
            try:
                client = str(ipaddress.ip_address(value.decode("latin1").strip())) if value else None
            except ValueError:
                client = None
            if client is not None:
                scope = dict(scope)
                proto = next((v for k, v in scope["headers"] if k == b"x-forwarded-proto"), b"").decode(
                    "latin1"
                )
                if proto.strip() in ("http", "https"):
                    scope["scheme"] = (
                        proto.strip() if scope["type"] == "http" else proto.strip().replace("http", "ws")
                    )
                scope["client"] = (client, 0)
                return await self.app(scope, receive, send)
        await self.forwarded(scope, receive, send)  # type: ignore[arg-type]
