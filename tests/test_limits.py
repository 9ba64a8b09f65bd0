"""LimitsMiddleware in process: buckets, client keys behind trusted hops, and errors that keep CORS."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import Settings
from proxy.http.limits import Buckets, LimitsMiddleware, client_key

TRUSTED = frozenset({"127.0.0.1"})


def _scope(client: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "client": (client, 1234), "headers": headers}


def test_client_key_believes_only_trusted_hops():
    assert client_key(_scope("203.0.113.9", [(b"x-forwarded-for", b"198.51.100.1")]), TRUSTED) == "203.0.113.9"
    assert client_key(_scope("127.0.0.1", [(b"x-forwarded-for", b"10.9.9.9, 198.51.100.1")]), TRUSTED) \
        == "198.51.100.1"  # the nearest untrusted hop: what the trusted proxy saw, not what the client wrote
    assert client_key(_scope("127.0.0.1", [(b"forwarded", b'for="198.51.100.7";proto=https')]), TRUSTED) \
        == "198.51.100.7"
    assert client_key(_scope("127.0.0.1", []), TRUSTED) == "127.0.0.1"


def test_bucket_refills_at_the_rate_up_to_the_burst():
    buckets = Buckets(rate=2.0, burst=3)
    b = buckets.get("c", now=100.0)
    b.tokens -= 3
    assert buckets.wait(b, 1) == 1  # 0.5 s at 2 tokens/s, rounded up to whole seconds
    assert buckets.get("c", now=100.5).tokens == 1.0
    assert buckets.get("c", now=200.0).tokens == 3  # never above the burst


async def test_an_unexpected_error_is_a_500_that_cors_still_wraps():
    async def boom(request: Request) -> Response:
        raise RuntimeError("bug")

    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(LimitsMiddleware, settings=Settings())
    app.add_middleware(CORSMiddleware, allow_origins=["http://viewer.example"])
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.get("/boom", headers={"Origin": "http://viewer.example"})
    assert r.status_code == 500 and r.json() == {"status": 500, "reason": "internal error"}
    assert r.headers["access-control-allow-origin"] == "http://viewer.example"
