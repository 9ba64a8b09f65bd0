"""Searches for names with non-ASCII characters find what the archives hold, through the proxy.

A browser or dicomweb-client sends `PatientName=M%C3%9CLLER*`. Orthanc 1.x cannot be asked that itself: it
takes the query string without percent-decoding (the escaped bytes match nothing), refuses raw UTF-8 with a
400, and its `?` matches no non-ASCII character. The proxy asks it `M*LLER*` and keeps, at the edge, only
the records that match what the client asked, so nothing extra comes back and paging stays exact.

Archive A is an Orthanc with its default encoding (Latin-1: its search answers keep Ü, Ó and Á); archive B
is one set to UTF-8, which keeps every character (Ł, Ż, 山田). Expected results come from the generated names.
"""

from __future__ import annotations

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from support import ProxyProcess, orthanc_holding

from proxy.demo.synth import Patient, Study, ct_series

LATIN = ["MÜLLER^HANS", "Müller^Lower", "MULLER^ANNA", "MOLLER^PER", "GÓMEZ^ÁNGEL", "GOMEZ^ANA"]
WIDE = ["ŁUKASZ^ŻÓŁW", "LUKASZ^ADAM", "山田^太郎", "MÜNCH^EVA"]


def _studies(names: list[str], first: int) -> list:
    return [ds for i, name in enumerate(names, first)
            for ds in ct_series(Study(Patient(name, f"PCH{i:03d}"), accession=f"ACH{i:03d}"), 1, rows=16, cols=16)]


@pytest.fixture(scope="module")
def latin_archive(tmp_path_factory):
    yield from orthanc_holding(tmp_path_factory, "CHARS_A", _studies(LATIN, 0))


@pytest.fixture(scope="module")
def wide_archive(tmp_path_factory):
    yield from orthanc_holding(tmp_path_factory, "CHARS_B", _studies(WIDE, 100), encoding="Utf8")


@pytest.fixture(scope="module")
def single(latin_archive, tmp_path_factory):
    with ProxyProcess({"a": latin_archive.dicomweb_url}, tmp_path_factory.mktemp("chars_single")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def federated(latin_archive, wide_archive, tmp_path_factory):
    with ProxyProcess({"a": latin_archive.dicomweb_url, "b": wide_archive.dicomweb_url},
                      tmp_path_factory.mktemp("chars_federated")) as proxy:
        yield proxy


def _names(records: list[dict]) -> list[str]:
    return sorted(r["00100010"]["Value"][0]["Alphabetic"] for r in records)


def _expected(names: list[str], prefix: str, whole: bool = False) -> list[str]:
    """Person names match without regard to case (as Orthanc matches them)."""
    return sorted(n for n in names if (n.casefold() == prefix.casefold() if whole
                                       else n.casefold().startswith(prefix.casefold())))


def _client(url: str) -> DICOMwebClient:
    client = DICOMwebClient(url)
    client.set_http_retry_params(retry=False)  # a failure must show, not be retried away
    return client


@pytest.mark.parametrize("prefix", ["MÜLLER", "müller", "GÓMEZ"])
def test_a_name_with_an_accent_is_found_on_orthanc(single, latin_archive, prefix):
    found = _client(single.dicomweb_url).search_for_studies(search_filters={"PatientName": prefix + "*"})
    assert _names(found) == _expected(LATIN, prefix) != []
    # Asked directly, as the client asks, the archive finds none of them.
    direct = httpx.get(f"{latin_archive.dicomweb_url}/studies", params={"PatientName": prefix + "*"})
    assert direct.status_code == 200 and direct.json() == []


def test_an_exact_name_with_an_accent_matches_that_name_only(single):
    found = _client(single.dicomweb_url).search_for_studies(search_filters={"PatientName": "mÜller^hans"})
    assert _names(found) == _expected(LATIN, "mÜller^hans", whole=True) == ["MÜLLER^HANS"]


def test_a_browser_encoded_name_is_found_and_paged_exactly(single):
    url = f"{single.dicomweb_url}/studies?PatientName=M%C3%9CLLER*"
    whole = httpx.get(url)
    assert whole.status_code == 200 and _names(whole.json()) == _expected(LATIN, "MÜLLER")
    pages = [httpx.get(f"{url}&limit=1&offset={offset}") for offset in range(len(whole.json()) + 1)]
    assert [len(p.json()) for p in pages[:-1]] == [1] * len(whole.json())
    assert [r for p in pages[:-1] for r in p.json()] == whole.json()  # the same records, in the same order
    assert "1 additional results" in pages[0].headers["Warning"]
    assert pages[-1].json() == []


@pytest.mark.parametrize("prefix", ["MÜ", "ŁUKASZ", "山田", "GÓMEZ^ÁNGEL"])
def test_federated_name_search_finds_matches_on_every_archive(federated, prefix):
    found = _client(federated.dicomweb_url).search_for_studies(search_filters={"PatientName": prefix + "*"})
    assert _names(found) == _expected(LATIN + WIDE, prefix) != []
