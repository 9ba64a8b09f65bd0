"""Local stand-ins for the cloud identity services, each checking what the real one checks and refusing the
rest: Google's OAuth2 token endpoint (a service-account JWT assertion: RS256 signature by the key's public half,
issuer, audience, scope, dates), the GCE/GKE metadata server (`Metadata-Flavor: Google`), Microsoft Entra ID's
token endpoint over https (client id and secret, or a workload identity's client assertion JWT, and the DICOM
service's scope), App Service's managed identity endpoint (`X-IDENTITY-HEADER`, the resource) and a VM's
(IMDS: `Metadata: true`).

Every issued token is remembered with its expiry (`Issuer`); the DICOM service stand-ins (the demo's sample
archive, or `Recorded`) accept only those.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"  # a VM's or node pool's usual access scope
AZURE_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
AZURE_RESOURCE = "https://dicom.healthcareapis.azure.com"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # what Google wants as the assertion's `aud`
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DATA = Path(__file__).resolve().parent / "data" / "cloud"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class Issuer:
    """The tokens a stand-in issued, each valid for `lifetime` seconds; what every request asked."""

    def __init__(self, prefix: str, lifetime: float = 3600.0) -> None:
        self.prefix, self.lifetime = prefix, lifetime
        self.valid: dict[str, float] = {}  # token → monotonic expiry
        self.refused: list[str] = []  # why each refused request was refused
        self.requests = 0
        self.life_left: list[float] = []  # at each issue after the first: seconds the last token still had

    def issue(self) -> str:
        if self.valid:
            self.life_left.append(max(self.valid.values()) - time.monotonic())
        token = f"{self.prefix}{secrets.token_urlsafe(24)}"
        self.valid[token] = time.monotonic() + self.lifetime
        return token

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme == "Bearer" and self.valid.get(token, 0.0) > time.monotonic()


class Handler(BaseHTTPRequestHandler):
    """Hands every request to the server's `answer(method, path, query, headers, body)`."""

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        u = urlsplit(self.path)
        status, ctype, data, extra = self.server.answer(  # type: ignore[attr-defined]
            self.command, u.path, parse_qs(u.query), self.headers, body)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _any  # noqa: N815 (http.server's naming)

    def log_message(self, *args: object) -> None:
        pass


Answer = tuple[int, str, bytes, dict[str, str]]


def json_answer(status: int, doc: Any, **headers: str) -> Answer:
    return status, "application/json", json.dumps(doc).encode(), headers


class StandIn:
    """A threaded HTTP(S) server on 127.0.0.1 whose `answer` subclasses write."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.answer = self.answer  # type: ignore[attr-defined]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GoogleTokenEndpoint(StandIn):
    """https://oauth2.googleapis.com/token for the JWT-bearer grant (RFC 7523) of a service-account key."""

    def __init__(self, issuer: Issuer) -> None:
        super().__init__()
        self.issuer = issuer
        self.url = self.base + "/token"
        self.keys: dict[str, tuple[str, rsa.RSAPublicKey]] = {}  # private_key_id → (client_email, public key)

    def service_account(self, path: Path, email: str = "edge@proj.iam.gserviceaccount.com",
                        registered: bool = True) -> Path:
        """Write a service-account key file whose token_uri is this endpoint; `registered`: its public key is
        the one this endpoint knows (False: a key Google never issued, its assertions are refused)."""
        key, key_id = rsa_key(), secrets.token_hex(20)
        if registered:
            self.keys[key_id] = (email, key.public_key())
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "proj", "private_key_id": key_id, "private_key": pem(key),
            "client_email": email, "client_id": "1234567890", "token_uri": self.url,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth"}))
        return path

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        self.issuer.requests += 1
        form = parse_qs(body.decode())
        why = self._refusal(method, path, form)
        if why:
            self.issuer.refused.append(why)
            return json_answer(400, {"error": "invalid_grant", "error_description": why})
        return json_answer(200, {"access_token": self.issuer.issue(), "expires_in": int(self.issuer.lifetime),
                                 "token_type": "Bearer"})

    def _refusal(self, method: str, path: str, form: dict[str, list[str]]) -> str:
        if method != "POST" or path != "/token" or form.get("grant_type") != [JWT_BEARER]:
            return "unsupported grant"
        assertion = (form.get("assertion") or [""])[0]
        try:
            key_id = jwt.get_unverified_header(assertion).get("kid", "")
            email, public = self.keys[key_id]
            claims = jwt.decode(assertion, public, algorithms=["RS256"], audience=GOOGLE_TOKEN_AUDIENCE, issuer=email,
                                options={"require": ["iat", "exp", "iss", "aud"]})
        except (KeyError, jwt.PyJWTError):
            return "Invalid JWT Signature."
        if claims["exp"] - claims["iat"] > 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes)"
        if GOOGLE_SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid OAuth scope or ID token audience provided."
        return ""


class GceMetadata(StandIn):
    """The GCE/GKE metadata server's service-account endpoints; refuses a request without
    `Metadata-Flavor: Google` (403) as the real one does, and answers with that header."""

    def __init__(self, issuer: Issuer, email: str = "edge@proj.iam.gserviceaccount.com") -> None:
        super().__init__()
        self.issuer, self.email = issuer, email
        self.host = self.base.removeprefix("http://")
        self.scopes_asked: list[str] = []

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        flavor = {"Metadata-Flavor": "Google"}
        if headers.get("Metadata-Flavor") != "Google" or headers.get("X-Forwarded-For"):
            self.issuer.refused.append("no Metadata-Flavor: Google")
            return 403, "text/html", b"Missing required header: Metadata-Flavor", flavor
        if path == "/":
            return 200, "application/text", b"computeMetadata/\n", flavor
        account = "/computeMetadata/v1/instance/service-accounts/"
        if path in (account + "default/", account + self.email + "/"):
            return json_answer(200, {"aliases": ["default"], "email": self.email, "scopes": [CLOUD_PLATFORM]}, **flavor)
        if path in (account + "default/token", account + self.email + "/token"):
            self.issuer.requests += 1
            self.scopes_asked += query.get("scopes", [])
            return json_answer(200, {"access_token": self.issuer.issue(), "expires_in": int(self.issuer.lifetime),
                                     "token_type": "Bearer"}, **flavor)
        return 404, "text/html", b"not found", flavor


class LocalCA:
    """A CA made in the test, and a server certificate for 127.0.0.1 signed by it."""

    def __init__(self, directory: Path) -> None:
        self.key = rsa_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomweb-edge test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server_key = rsa_key()
        server = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                  .issuer_name(name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                  .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                  .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 critical=False)
                  .sign(self.key, hashes.SHA256()))
        self.cert_file, self.key_file = directory / "server.pem", directory / "server-key.pem"
        self.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_text(pem(server_key))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class Entra(StandIn):
    """Microsoft Entra ID (login.microsoftonline.com) for one tenant over https: OpenID metadata and the v2.0
    token endpoint's client-credentials grant, the client authenticated by its secret or by a client assertion
    (a workload identity's federated token: signed by the cluster's issuer key, audience
    api://AzureADTokenExchange, subject the Kubernetes service account)."""

    def __init__(self, issuer: Issuer, ca: LocalCA, tenant: str, client_id: str) -> None:
        super().__init__(ca.server_context())
        self.issuer, self.tenant, self.client_id = issuer, tenant, client_id
        self.secret = "s3cr3t~" + secrets.token_urlsafe(18)
        self.cluster_key = rsa_key()  # the federated identity's issuer (the cluster's OIDC issuer)
        self.cluster_issuer = "https://oidc.cluster.example/"
        self.subject = "system:serviceaccount:imaging:dicomweb-edge"

    def federated_token(self, audience: str = "api://AzureADTokenExchange", key: Any = None) -> str:
        now = int(time.time())
        return jwt.encode({"iss": self.cluster_issuer, "sub": self.subject, "aud": [audience], "iat": now,
                           "nbf": now, "exp": now + 3600}, key or self.cluster_key, algorithm="RS256")

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        root = f"/{self.tenant}"
        if method == "GET" and path == f"{root}/v2.0/.well-known/openid-configuration":
            return json_answer(200, {
                "token_endpoint": f"{self.base}{root}/oauth2/v2.0/token",
                "authorization_endpoint": f"{self.base}{root}/oauth2/v2.0/authorize",
                "issuer": f"{self.base}/{self.tenant}/v2.0", "device_authorization_endpoint":
                f"{self.base}{root}/oauth2/v2.0/devicecode", "jwks_uri": f"{self.base}{root}/discovery/v2.0/keys"})
        if method != "POST" or path != f"{root}/oauth2/v2.0/token":
            return json_answer(404, {"error": "invalid_request", "error_description": "AADSTS90002: not found"})
        self.issuer.requests += 1
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        why = self._refusal(form)
        if why:
            self.issuer.refused.append(why)
            return json_answer(401 if "AADSTS7000215" in why else 400,
                               {"error": "invalid_client" if "AADSTS7000215" in why else "invalid_request",
                                "error_description": why, "error_codes": [int(why[6:13])]})
        life = int(self.issuer.lifetime)
        return json_answer(200, {"token_type": "Bearer", "expires_in": life, "ext_expires_in": life,
                                 "access_token": self.issuer.issue()})

    def _refusal(self, form: dict[str, str]) -> str:
        if form.get("grant_type") != "client_credentials" or form.get("client_id") != self.client_id:
            return "AADSTS7000215: Invalid client: unknown client_id or grant"
        if form.get("scope", "").split() != [AZURE_SCOPE] and \
                set(form.get("scope", "").split()) != {AZURE_SCOPE, "offline_access", "openid", "profile"}:
            return "AADSTS1002012: The provided value for scope is not valid."
        if "client_secret" in form:
            return "" if form["client_secret"] == self.secret else \
                "AADSTS7000215: Invalid client secret provided."
        if form.get("client_assertion_type") != CLIENT_ASSERTION:
            return "AADSTS7000215: Invalid client: no client secret or assertion"
        try:
            jwt.decode(form.get("client_assertion", ""), self.cluster_key.public_key(), algorithms=["RS256"],
                       audience="api://AzureADTokenExchange", issuer=self.cluster_issuer,
                       options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            return f"AADSTS7000215: Invalid client assertion ({type(exc).__name__})"
        return ""


class AppServiceIdentity(StandIn):
    """App Service / Functions managed identity (IDENTITY_ENDPOINT, IDENTITY_HEADER, api-version 2019-08-01)."""

    def __init__(self, issuer: Issuer) -> None:
        super().__init__()
        self.issuer = issuer
        self.header = secrets.token_hex(16)
        self.endpoint = self.base + "/msi/token"

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        self.issuer.requests += 1
        if headers.get("X-IDENTITY-HEADER") != self.header:
            self.issuer.refused.append("X-IDENTITY-HEADER")
            return json_answer(401, {"statusCode": 401, "message": "Unauthorized request"})
        if query.get("api-version") != ["2019-08-01"] or query.get("resource") != [AZURE_RESOURCE]:
            self.issuer.refused.append(f"resource {query.get('resource')}")
            return json_answer(400, {"statusCode": 400, "message": "Unsupported resource or api-version"})
        expires = int(time.time() + self.issuer.lifetime)
        return json_answer(200, {"access_token": self.issuer.issue(), "expires_on": str(expires),
                                 "resource": AZURE_RESOURCE, "token_type": "Bearer", "client_id": "mi-client"})


class Imds(StandIn):
    """Azure's Instance Metadata Service token endpoint (a VM's managed identity): `Metadata: true` required,
    api-version 2018-02-01, the resource; its answer's numbers are strings, as IMDS sends them."""

    def __init__(self, issuer: Issuer) -> None:
        super().__init__()
        self.issuer = issuer

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        self.issuer.requests += 1
        if path != "/metadata/identity/oauth2/token" or headers.get("Metadata") != "true":
            self.issuer.refused.append("no Metadata: true")
            return json_answer(400, {"error": "invalid_request", "error_description": "Required metadata header "
                                                                                        "not specified"})
        if query.get("api-version") != ["2018-02-01"] or query.get("resource") != [AZURE_RESOURCE]:
            self.issuer.refused.append(f"resource {query.get('resource')}")
            return json_answer(400, {"error": "invalid_resource", "error_description": "AADSTS500011: resource"})
        now, life = int(time.time()), int(self.issuer.lifetime)
        return json_answer(200, {"access_token": self.issuer.issue(), "client_id": "vm-identity",
                                 "expires_in": str(life), "expires_on": str(now + life), "ext_expires_in": str(life),
                                 "not_before": str(now), "resource": AZURE_RESOURCE, "token_type": "Bearer"})


class Recorded(StandIn):
    """A DICOM service answering documented response shapes (tests/data/cloud) to requests carrying a token
    `accepts` takes (401 otherwise, with `unauthorized`: media type, file or None for an empty body);
    `route(method, path, query) → (status, media type, file or None)`."""

    def __init__(self, accepts: Callable[[str | None], bool], route: Callable[..., tuple[int, str, str | None]],
                 tls: ssl.SSLContext | None = None, prefix: str = "/v2",
                 unauthorized: tuple[str, str | None] = ("text/plain", None)) -> None:
        super().__init__(tls)
        self.accepts, self.route, self.prefix, self.unauthorized = accepts, route, prefix, unauthorized
        self.url = self.base + prefix
        self.seen: list[tuple[str, str, dict[str, list[str]]]] = []
        self.refused = 0  # requests answered 401

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Answer:
        self.seen.append((method, path.removeprefix(self.prefix), query))
        if not self.accepts(headers.get("Authorization")):
            self.refused += 1
            status, (media, name) = 401, self.unauthorized
        else:
            status, media, name = self.route(method, path.removeprefix(self.prefix), query)
        data = (DATA / name).read_bytes().replace(b"{BASE}", self.url.encode()) if name else b""
        return status, media, data, {"WWW-Authenticate": "Bearer"} if status == 401 else {}
