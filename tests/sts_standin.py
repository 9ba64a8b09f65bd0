"""A local stand-in for AWS STS's AssumeRoleWithWebIdentity (the web identity step of botocore's credential
chain): it checks the role and the identity provider's token as STS does and answers with temporary
credentials in STS's XML, or with STS's error shape. botocore reaches it through its documented
`AWS_ENDPOINT_URL_STS` setting, unmodified.
"""

from __future__ import annotations

import datetime
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from botocore.credentials import Credentials

_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


class StsStandIn:
    """Issues temporary credentials for `role_arn` to a caller holding `identity_token`; each issued set is
    valid for the next of `lifetimes` (seconds; the last one repeats)."""

    def __init__(self, role_arn: str, identity_token: str, lifetimes: tuple[float, ...] = (3600.0,),
                 delay: float = 0.0) -> None:
        self.role_arn = role_arn
        self.delay = delay  # seconds each answer takes (a slow identity round trip)
        self.identity_token = identity_token
        self.lifetimes = lifetimes
        self.issued: list[Credentials] = []
        self.refused: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                status, body = standin.answer({k: v[0] for k, v in form.items()})
                time.sleep(standin.delay)
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StsStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, form: dict[str, str]) -> tuple[int, bytes]:
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return self._error("InvalidAction", "Could not find operation " + form.get("Action", ""))
        if form.get("WebIdentityToken") != self.identity_token:
            return self._error("InvalidIdentityToken", "Couldn't retrieve verification key from your identity "
                                                       "provider")
        if form.get("RoleArn") != self.role_arn:
            return self._error("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        lifetime = self.lifetimes[min(len(self.issued), len(self.lifetimes) - 1)]
        creds = Credentials("ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30),
                            secrets.token_urlsafe(40))
        self.issued.append(creds)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
        return 200, (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{_NS}"><AssumeRoleWithWebIdentityResult><Credentials>'
            f"<AccessKeyId>{creds.access_key}</AccessKeyId><SecretAccessKey>{creds.secret_key}</SecretAccessKey>"
            f"<SessionToken>{creds.token}</SessionToken>"
            f"<Expiration>{expires.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration></Credentials>"
            f"<AssumedRoleUser><Arn>{self.role_arn}/edge</Arn><AssumedRoleId>AROAEDGE:edge</AssumedRoleId>"
            "</AssumedRoleUser></AssumeRoleWithWebIdentityResult>"
            "<ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>").encode()

    def _error(self, code: str, message: str) -> tuple[int, bytes]:
        self.refused.append(code)
        return 400, (f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
                     f"<Message>{message}</Message></Error><RequestId>0</RequestId></ErrorResponse>").encode()
