"""Retrieve Capabilities (PS3.18 §8.9): OPTIONS on the service base URL describes what the proxy serves."""

import json
import xml.etree.ElementTree as ET

import httpx
import pytest

from proxy.config import load
from proxy.runtime import create_app

NS = {"w": "http://wadl.dev.java.net/2009/02"}


@pytest.fixture()
async def client():
    app = create_app(load(None, {"archives": [{"name": "a", "url": "http://127.0.0.1:9/dicom-web"}],
                                 "health_interval": 0}, environ={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge.test:8080") as c:
        yield c


async def test_wadl_lists_every_service_at_the_proxy(client):
    r = await client.request("OPTIONS", "/dicomweb/", headers={"Accept": "application/vnd.sun.wadl+xml"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/vnd.sun.wadl+xml")
    root = ET.fromstring(r.content)
    resources = root.find("w:resources", NS)
    assert resources.get("base") == "http://edge.test:8080/dicomweb/"
    methods = {res.get("path"): {m.get("name") for m in res.findall("w:method", NS)}
               for res in resources.findall("w:resource", NS)}
    assert methods["studies"] == {"GET", "POST"}  # QIDO and STOW
    assert methods["studies/{study}/series/{series}/instances/{instance}/frames/{frames}"] == {"GET"}
    for path in ("studies/{study}/metadata", "studies/{study}/series/{series}/instances/{instance}/rendered",
                 "studies/{study}/thumbnail", "studies/{study}/bulkdata", "series", "instances"):
        assert "GET" in methods[path], path
    frames = resources.find("w:resource[@path='studies/{study}/series/{series}/instances/{instance}/frames/{frames}']"
                            "/w:method/w:response", NS)
    assert 'multipart/related; type="application/octet-stream"' in {rep.get("mediaType") for rep in frames}


async def test_json_for_older_clients_and_406_otherwise(client):
    r = await client.request("OPTIONS", "/dicomweb/", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = json.loads(r.content)
    assert doc["base"] == "http://edge.test:8080/dicomweb/"
    assert any(res["path"] == "studies" for res in doc["resources"])
    r = await client.request("OPTIONS", "/dicomweb/", headers={"Accept": "text/html"})
    assert r.status_code == 406 and "wadl" in r.json()["reason"]


async def test_a_preflight_is_not_a_capabilities_request(client):
    """Without cors_origins, a CORS preflight (Origin + Access-Control-Request-Method) is refused, not
    answered with the capabilities document."""
    r = await client.request("OPTIONS", "/dicomweb/", headers={"Origin": "https://viewer.example.org",
                                                              "Access-Control-Request-Method": "GET"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert "cors_origins" in r.json()["reason"]
