"""AWS HealthImaging: requests signed with Signature Version 4 (botocore, the optional `aws` extra).

What the service documents (AWS HealthImaging developer guide, "Using DICOMweb with AWS HealthImaging"):
- DICOMweb URL layout `https://dicom-medical-imaging.REGION.amazonaws.com/datastore/DATASTORE_ID/studies/...`;
  requests are signed with SigV4 for the service name `medical-imaging` (or carry an OIDC access token when
  the data store is set up for it: use the `bearer` or `oauth2` auth kinds for that).
- WADO-RS: GetDICOMSeriesMetadata, GetDICOMInstance (a single .dcm, stored transfer syntax or explicit VR
  little endian), GetDICOMInstanceMetadata, GetDICOMInstanceFrames. No study or series retrieve of
  instances, no study metadata (the proxy builds them from the instances and the series:
  dicomweb/assemble.py), no rendered images, no thumbnails, no bulk data resource.
- QIDO-RS: SearchDICOMStudies, SearchDICOMSeries (a Study Instance UID is required), SearchDICOMInstances
  (study and series required); at most 10,000 records reachable by searching.
- STOW-RS exists (POST .../studies).
Assumed (not found in its documentation): idle connections dropped after 60 s (the AWS front ends' usual
figure); a streamed STOW body is accepted with `x-amz-content-sha256: UNSIGNED-PAYLOAD` (documented for S3);
errors in AWS's REST-JSON shape (`{"message": ...}` and an `x-amzn-ErrorType` header; signature failures
403). tests/data/healthimaging.json holds these shapes; tests/healthimaging_standin.py checks them.

Credentials come from botocore's usual chain: environment variables, the shared config and credentials files
(`profile`), web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN), the container and instance role.
Resolving or refreshing them may do I/O, so it runs in a thread; the frozen credentials are reused until
botocore says they need a refresh; a refused signature (401/403) has the chain walked again (a rotated key),
a failed resolution makes requests fail at once for a few seconds (no hammering of STS). Signing is CPU only
and runs on the event loop: 175 µs per request measured on a loaded 2-core machine (tests/test_healthimaging.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import re
import time
from collections.abc import Mapping
from typing import Any

from proxy.upstream.credentials import RETRY_AFTER_FAILURE, CredentialError, Credentials

SERVICE = "medical-imaging"
_REGION_IN_HOST = re.compile(r"^dicom-medical-imaging\.([a-z0-9-]+)\.amazonaws\.com$")
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
REFRESH_AFTER_REFUSAL = 30.0  # seconds between two walks of the credential chain caused by refusals
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def region_of(host: str) -> str | None:
    """The region named in a HealthImaging DICOMweb host name, or None for another host."""
    m = _REGION_IN_HOST.match(host)
    return m.group(1) if m else None


def check(auth: Mapping[str, Any], host: str, where: str) -> None:
    """Raise ValueError when an `aws` auth table cannot work: botocore missing, or no region known."""
    if importlib.util.find_spec("botocore") is None:
        raise ValueError(f"{where}: auth.type 'aws' needs botocore: pip install 'dicomweb-edge[aws]'")
    if "region" not in auth and region_of(host) is None:
        raise ValueError(f"{where}: auth.region is required when the url is not "
                         "https://dicom-medical-imaging.REGION.amazonaws.com/...")


class SigV4(Credentials):
    """Signs each request with SigV4 for one archive; credentials from botocore's chain, cached."""

    refused = (401, 403)  # AWS answers 403 to an expired session or a rotated key

    def __init__(self, auth: Mapping[str, Any], archive: str, host: str) -> None:
        self.archive = archive
        self.region = str(auth.get("region") or region_of(host) or "")
        self.service = str(auth.get("service", SERVICE))
        self._profile = str(auth["profile"]) if "profile" in auth else None
        self._source: Any = None  # botocore's Credentials (refreshable or not), once resolved
        self._frozen: Any = None
        self._failed: tuple[float, CredentialError] | None = None  # (until, error) after a failed resolution
        self._dropped = -REFRESH_AFTER_REFUSAL  # when a refusal last sent the chain to be walked again
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SigV4({self.service!r}, region={self.region!r}, credentials=***)"

    async def _credentials(self) -> Any:
        """The frozen credentials to sign with now (resolved or refreshed in a thread when needed)."""
        if self._frozen is not None and not self._stale():
            return self._frozen
        async with self._lock:
            if self._frozen is None or self._stale():
                if self._failed is not None and time.monotonic() < self._failed[0]:
                    raise self._failed[1]  # no hammering of STS or the metadata service
                try:
                    self._frozen = await asyncio.to_thread(self._resolve)
                except CredentialError as exc:
                    self._failed = (time.monotonic() + RETRY_AFTER_FAILURE, exc)
                    raise
                self._failed = None
        return self._frozen

    def _stale(self) -> bool:
        refresh = getattr(self._source, "refresh_needed", None)
        return bool(refresh()) if refresh is not None else False

    def _resolve(self) -> Any:
        """botocore's chain walked (once, or again after a refusal) and its current credentials (in a thread:
        the web identity, container and instance role steps make HTTP requests)."""
        from botocore.session import Session  # the optional `aws` extra (`check` ensures it at start-up)

        try:
            if self._source is None:
                self._source = Session(profile=self._profile).get_credentials()
            if self._source is None:
                raise CredentialError(f"no AWS credentials found for archive '{self.archive}' (environment, "
                                      "profile, web identity or instance role)")
            return self._source.get_frozen_credentials()
        except CredentialError:
            raise
        except Exception as exc:  # botocore's errors: an STS or metadata call failed, a bad profile
            raise CredentialError(f"AWS credentials for archive '{self.archive}' could not be obtained "
                                  f"({type(exc).__name__})") from None

    async def headers(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> dict[str, str]:
        return sign(await self._credentials(), self.service, self.region, method, url, headers, body)

    def rejected(self) -> None:
        """The archive refused the signature (401/403): walk the chain again for the next request (a rotated
        key in the credentials file, a revoked session), at most once per REFRESH_AFTER_REFUSAL seconds (an
        IAM policy that denies stays denied: no STS trade per request)."""
        if time.monotonic() - self._dropped >= REFRESH_AFTER_REFUSAL:
            self._dropped = time.monotonic()
            self._frozen = self._source = None


def sign(frozen: Any, service: str, region: str, method: str, url: str, headers: Mapping[str, str],
         body: Any = None) -> dict[str, str]:
    """The SigV4 headers for one request: Authorization, X-Amz-Date, X-Amz-Content-SHA256 and, for
    temporary credentials, X-Amz-Security-Token. `body`: bytes are hashed, a stream is sent unsigned."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    if isinstance(body, bytes | bytearray | memoryview):
        digest = hashlib.sha256(body).hexdigest()
    else:
        digest = EMPTY_SHA256 if body is None else UNSIGNED_PAYLOAD
    signed = {k: v for k, v in headers.items() if k.lower() in ("content-type", "host")}
    signed["X-Amz-Content-SHA256"] = digest
    request = AWSRequest(method=method, url=url, headers=signed)
    SigV4Auth(frozen, service, region).add_auth(request)
    out = {k: request.headers[k] for k in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256")}
    if "X-Amz-Security-Token" in request.headers:
        out["X-Amz-Security-Token"] = request.headers["X-Amz-Security-Token"]
    return out
