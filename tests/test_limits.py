"""LimitsMiddleware in process: buckets, client keys behind trusted hops, and errors that keep CORS."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import ConfigError, Settings, Trusted, load
from proxy.http.limits import Buckets, LimitsMiddleware, client_key

TRUSTED = Trusted(["127.0.0.1"])


def _scope(client: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "client": (client, 1234), "headers": headers}


def test_client_key_believes_only_trusted_hops():
    assert client_key(_scope("203.0.113.9", [(b"x-forwarded-for", b"198.51.100.1")]), TRUSTED) == "203.0.113.9"
    assert client_key(_scope("127.0.0.1", [(b"x-forwarded-for", b"10.9.9.9, 198.51.100.1")]), TRUSTED) \
        == "198.51.100.1"  # the nearest untrusted hop: what the trusted proxy saw, not what the client wrote
    assert client_key(_scope("127.0.0.1", [(b"forwarded", b'for="198.51.100.7";proto=https')]), TRUSTED) \
        == "198.51.100.7"
    assert client_key(_scope("127.0.0.1", []), TRUSTED) == "127.0.0.1"


def test_trusted_hops_are_networks_not_strings():
    """`trusted_proxies` takes addresses and CIDRs, IPv4 and IPv6: a front anywhere in 10.0.0.0/8 (what a
    Kubernetes pod network gives an ingress) is believed; an address that merely starts with the same
    characters is not, nor is anything that is not an address."""
    trusted = Trusted(["10.0.0.0/8", "fd00::/8", "192.168.1.10"])
    assert "10.42.7.3" in trusted and "fd00::1234" in trusted and "192.168.1.10" in trusted
    assert "::ffff:10.1.2.3" in trusted  # an IPv4 client seen on a dual-stack socket
    assert "11.0.0.1" not in trusted and "192.168.1.1" not in trusted and "192.168.1.100" not in trusted
    assert "fe80::1" not in trusted and "unknown" not in trusted and "10.0.0.0/8" not in trusted
    behind = _scope("10.42.7.3", [(b"x-forwarded-for", b"203.0.113.5, 10.1.1.1")])
    assert client_key(behind, trusted) == "203.0.113.5"  # every hop inside the pod network is skipped


@pytest.mark.parametrize("value, says", [
    # a string would be read letter by letter: "10.0.0.1" "in" it
    ("10.0.0.10", r'trusted_proxies: expected a list, each a string, given "10.0.0.10"'),
    (["10.0.0.0/33"], "not an IP address or CIDR"),
    (["proxy.internal"], "not an IP address or CIDR"),
])
def test_trusted_proxies_that_are_not_networks_are_refused(tmp_path, value, says):
    import json

    config = tmp_path / "edge.toml"
    config.write_text(f"[server]\ntrusted_proxies = {json.dumps(value)}\n"
                      "[[archives]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/dw\"\n")
    with pytest.raises(ConfigError, match=says):
        load(config, environ={})


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
