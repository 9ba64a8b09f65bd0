"""A local stand-in for AWS HealthImaging's DICOMweb endpoint: it checks every request's Signature Version 4
as the service does (recomputed with botocore's own signer from the request and the known test credentials)
and refuses a wrong signature, date, region, service or security token with 403 and the service's error
shape; behind it a real Orthanc serves the DICOMweb data of the endpoints the service documents
(tests/data/healthimaging.json), and the others are answered as the service answers them.

URL layout as the service's: /datastore/DATASTORE_ID/studies/... (the host is 127.0.0.1:PORT here).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from support import split_multipart

SHAPES = json.loads((Path(__file__).parent / "data" / "healthimaging.json").read_text())
SKEW = datetime.timedelta(minutes=5)  # the clock skew SigV4 services allow
_AUTH = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")


def signature(creds: Credentials, region: str, service: str, method: str, url: str, headers: Mapping[str, str],
              amz_date: str) -> str:
    """The SigV4 signature botocore computes for this request at `amz_date` (what the service compares)."""
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    request.context["timestamp"] = amz_date
    auth = SigV4Auth(creds, service, region)
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))


def signed_headers(creds: Credentials, region: str, method: str, url: str, when: datetime.datetime,
                   service: str = "medical-imaging") -> dict[str, str]:
    """A client's SigV4 headers for a body-less request made at `when` (to send a stale or forged one)."""
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    headers = {"X-Amz-Date": amz_date, "X-Amz-Content-SHA256": SHAPES["empty_sha256"]}
    if creds.token:
        headers["X-Amz-Security-Token"] = creds.token
    sig = signature(creds, region, service, method, url, headers, amz_date)
    signed = ";".join(sorted(["host", *(k.lower() for k in headers)]))
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{amz_date[:8]}/{region}/{service}/"
                                f"aws4_request, SignedHeaders={signed}, Signature={sig}")
    return headers


class HealthImagingStandIn:
    """The stand-in on 127.0.0.1 for one data store in one region, in front of `orthanc_dicomweb`."""

    def __init__(self, orthanc_dicomweb: str, credentials: Credentials | list[Credentials], region: str = "us-east-1",
                 datastore: str = "0123456789abcdef0123456789abcdef") -> None:
        self.orthanc = orthanc_dicomweb
        self.keys = {c.access_key: c for c in (credentials if isinstance(credentials, list) else [credentials])}
        self.region = region
        self.datastore = datastore
        self.asked: list[str] = []  # "METHOD path" of each request that passed the signature check
        self.accepted: list[str] = []  # ... and was for a resource the service has
        self.refused: list[str] = []  # the error type of each refused request
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                standin.handle(self)

            def do_POST(self) -> None:  # noqa: N802
                standin.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The DICOMweb base URL of the data store, as the service's."""
        return f"http://127.0.0.1:{self.port}/datastore/{self.datastore}"

    def __enter__(self) -> HealthImagingStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def refusal(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[str, str] | None:
        """(error type, message) when the request's signature does not hold, as the service checks it."""
        h = handler.headers
        m = _AUTH.match(h.get("Authorization", ""))
        if m is None:
            return "MissingAuthenticationTokenException", SHAPES["errors"]["missing_authentication"]
        key, day, region, service, signed, sig = m.groups()
        creds = self.keys.get(key)
        if creds is None:
            return "UnrecognizedClientException", SHAPES["errors"]["unknown_key"]
        if region != self.region:
            return "InvalidSignatureException", SHAPES["errors"]["wrong_region"].format(region=self.region)
        if service != SHAPES["signing_name"]:
            return "InvalidSignatureException", SHAPES["errors"]["wrong_service"].format(service=service)
        amz_date = h.get("X-Amz-Date", "")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        except ValueError:
            return "IncompleteSignatureException", SHAPES["errors"]["no_date"]
        if abs(datetime.datetime.now(datetime.UTC) - when) > SKEW or day != amz_date[:8]:
            return "InvalidSignatureException", SHAPES["errors"]["expired"].format(date=amz_date)
        if creds.token and h.get("X-Amz-Security-Token") != creds.token:
            return "UnrecognizedClientException", SHAPES["errors"]["bad_token"]
        names = signed.split(";")
        if "host" not in names:
            return "InvalidSignatureException", SHAPES["errors"]["mismatch"]
        headers = {n: h.get(n, "") for n in names if n != "host"}
        digest = h.get("X-Amz-Content-SHA256")
        if digest not in (None, "UNSIGNED-PAYLOAD") and digest != _sha256(body):
            return "InvalidSignatureException", SHAPES["errors"]["mismatch"]
        url = f"http://{h.get('Host', '')}{handler.path}"
        if signature(creds, region, service, handler.command, url, headers, amz_date) != sig:
            return "InvalidSignatureException", SHAPES["errors"]["mismatch"]
        return None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        refused = self.refusal(handler, body)
        if refused is not None:
            self.refused.append(refused[0])
            self._answer(handler, 403, {"message": refused[1]}, refused[0])
            return
        path = urlsplit(handler.path).path
        prefix = f"/datastore/{self.datastore}"
        rest = path[len(prefix):] if path.startswith(prefix + "/") else None
        self.asked.append(f"{handler.command} {rest or path}")
        action = _documented(handler.command, rest) if rest is not None else None
        if action is None:
            self._answer(handler, 404 if rest is None else 400,
                         {"message": SHAPES["errors"]["not_supported"]}, "ValidationException")
            return
        self.accepted.append(f"{handler.command} {rest}")
        query = urlsplit(handler.path).query
        accept = handler.headers.get("Accept", "")
        if action == "GetDICOMInstance":  # Orthanc answers multipart only: ask so, answer the one part
            ts = re.search(r"transfer-syntax=([0-9.*]+)", accept)
            accept = 'multipart/related; type="application/dicom"' + (f"; transfer-syntax={ts[1]}" if ts else "")
        upstream = httpx.request(handler.command, self.orthanc + rest + ("?" + query if query else ""),
                                 headers={"Accept": accept, **({"Content-Type": c} if (c := handler.headers.get(
                                     "Content-Type")) else {})},
                                 content=body or None, timeout=30.0, trust_env=False)
        content, ctype = upstream.content, upstream.headers.get("Content-Type", "")
        if action == "GetDICOMInstance" and upstream.status_code == 200:
            part_headers, content = split_multipart(content, ctype)[1][0]
            ctype = dict((k.lower(), v) for k, v in part_headers)["content-type"]
        handler.send_response(upstream.status_code)
        if ctype:
            handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, doc: dict[str, str], kind: str) -> None:
        data = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("x-amzn-ErrorType", kind)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _documented(method: str, rest: str) -> str | None:
    """The service's action for this DICOMweb resource (tests/data/healthimaging.json's `endpoints`), or None."""
    for e in SHAPES["endpoints"]:
        if e["method"] == method and re.fullmatch(e["pattern"], rest):
            return str(e["action"])
    return None
