"""TLS on both sides (issue 7 points 3 and 5): the proxy terminates https from its config, and talks https
to an archive that demands a client certificate (mutual TLS) signed by a private CA.

A CA, a server certificate for 127.0.0.1 and a client certificate are made here with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import ProxyProcess, split_multipart

from proxy.demo.archive import ArchiveServer, SampleArchive
from proxy.demo.synth import Patient, Study, ct_series


def _trust(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(ca_key, ca_name, cn: str, usage, path_prefix, san: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = path_prefix.with_suffix(".pem"), path_prefix.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = _name("dicomweb-edge test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = _issue(ca_key, ca_name, "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, d / "server", san=True)
    client = _issue(ca_key, ca_name, "dicomweb-edge", ExtendedKeyUsageOID.CLIENT_AUTH, d / "client", san=False)
    return {"ca": d / "ca.pem", "server": server, "client": client}


TLS_STUDY = Study(Patient("DOE^TLS", "PID-TLS"), accession="ACC-TLS")


@pytest.fixture(scope="module")
def large():
    """512x512 slices: parts large enough that a plain-TCP proxy would relay them (splice.py)."""
    return list(ct_series(TLS_STUDY, 3, series_number=2, seed=5))


@pytest.fixture(scope="module")
def archive(pki, large):
    sample = SampleArchive("MTLS")
    sample.extend(ct_series(TLS_STUDY, 1, rows=32, cols=32))
    sample.extend(large)
    tls = {"ssl_certfile": str(pki["server"][0]), "ssl_keyfile": str(pki["server"][1]),
           "ssl_ca_certs": str(pki["ca"]), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    with ArchiveServer(sample, tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(pki, archive, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy_tls")
    cert, key = pki["client"]
    config = workdir / "edge.toml"
    config.write_text(
        f'[server]\ntls_cert_file = "{pki["server"][0]}"\ntls_key_file = "{pki["server"][1]}"\n\n'
        f'[[archives]]\nname = "mtls"\nurl = "{archive.dicomweb_url}"\n'
        f'tls = {{ ca_file = "{pki["ca"]}", cert_file = "{cert}", key_file = "{key}" }}\n\n'
        f'[[archives]]\nname = "nocert"\nurl = "{archive.dicomweb_url}"\nstores = false\n'
        f'tls = {{ ca_file = "{pki["ca"]}" }}\n\n'
        f'[[archives]]\nname = "noca"\nurl = "{archive.dicomweb_url}"\nstores = false\n'
        f'tls = {{ cert_file = "{cert}", key_file = "{key}" }}\n')
    p = ProxyProcess({}, workdir, extra_args=["--config", str(config)])
    p.scheme, p.verify = "https", _trust(pki)
    with p:
        yield p


def test_the_proxy_serves_https_and_writes_https_urls(proxy, pki):
    r = httpx.get(f"{proxy.url}/upstreams/mtls/dicomweb/studies", verify=_trust(pki), trust_env=False, timeout=10)
    assert r.status_code == 200, r.text
    (study,) = r.json()
    assert study["00081190"]["Value"][0].startswith(f"https://127.0.0.1:{proxy.port}/upstreams/mtls/dicomweb/studies/")
    with pytest.raises(httpx.TransportError):  # no cleartext on the TLS port
        httpx.get(f"http://127.0.0.1:{proxy.port}/healthz", trust_env=False, timeout=5)


def test_payloads_over_tls_are_never_relayed(proxy, pki, large):
    """splice(2) would move ciphertext past the encryption: with TLS on the client's side and the
    archive's, a series comes whole through the ordinary path and nothing is counted as relayed."""
    first = large[0]
    r = httpx.get(f"{proxy.url}/upstreams/mtls/dicomweb/studies/{first.StudyInstanceUID}/series/"
                  f"{first.SeriesInstanceUID}", headers={"Accept": 'multipart/related; type="application/dicom"'},
                  verify=_trust(pki), trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    _, parts = split_multipart(r.content, r.headers["content-type"])
    assert len(parts) == len(large)
    assert all(any(ds.PixelData in body for _, body in parts) for ds in large)
    text = httpx.get(f"{proxy.url}/metrics", verify=_trust(pki), trust_env=False, timeout=10).text
    relayed = [line for line in text.splitlines() if line.startswith("dicomweb_edge_relayed_bytes_total{")]
    assert relayed and all(float(line.rsplit(" ", 1)[1]) == 0 for line in relayed), relayed


def test_the_archive_sees_the_client_certificate(proxy, pki, archive):
    before = archive.archive.requests["qido"]
    r = httpx.get(f"{proxy.url}/upstreams/mtls/dicomweb/studies?PatientID=PID-TLS", verify=_trust(pki),
                  trust_env=False, timeout=10)
    assert r.status_code == 200 and len(r.json()) == 1
    assert archive.archive.requests["qido"] > before


@pytest.mark.parametrize("name", ["nocert", "noca"])
def test_without_client_certificate_or_trusted_ca_there_is_no_connection(proxy, pki, archive, name):
    """Without the client certificate the archive refuses the handshake; without the private CA the proxy
    refuses the archive's certificate. Either way the client gets a 502, and no request got through."""
    r = httpx.get(f"{proxy.url}/upstreams/{name}/dicomweb/studies", verify=_trust(pki), trust_env=False,
                  timeout=20)
    assert r.status_code == 502, r.text
