"""Quirks profiles: what each kind of archive accepts and how it answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """How to talk to one kind of archive."""

    name: str
    decodes_query: bool = True  # False: values must be sent raw (Orthanc 1.x does not percent-decode)
    uid_list_separator: str = ","
    max_limit: int | None = None  # largest `limit` the archive accepts
    zero_limit_means_all: bool = False
    fuzzy_matching: bool = True  # False: drop fuzzymatching=true and add the Warning 299 of PS3.18 §8.3.4.2
    thumbnail: bool = True  # False: thumbnails are made from /rendered
    rendered: bool = True  # False: no /rendered either: rendered images and thumbnails are answered 501
    single_part_instance: bool = True  # accepts Accept: application/dicom on an instance
    single_part_frame: bool = False  # accepts Accept: application/octet-stream on one frame
    pixeldata: bool = False  # serves the /pixeldata resources itself
    bulkdata_resource: bool = False  # serves .../bulkdata (the resource, not the opaque URIs)
    quote_type: bool = True  # send type="..." quoted in multipart Accept
    # The health probe's query on /studies: the cheapest search the archive answers. A Study Instance UID no
    # archive holds is an index lookup that matches nothing: no attributes computed, `[]` or 204 sent back.
    # On Orthanc 1.10 holding 40 studies: 2.0-2.3 ms median and 2 bytes, against 4.0-4.5 ms and 1.2 KB
    # for `limit=1` (300 requests each, twice, with httpx on loopback; docs/archive-behaviour.md).
    probe: str = "StudyInstanceUID=2.25.0"
    # Seconds an idle connection to the archive is kept for the next request (an archive's `keepalive`
    # overrides it; a shorter `Keep-Alive: timeout=` from the archive wins). A request on a connection the
    # archive has just closed is sent again on a fresh one (GET and HEAD), so too long costs one retry,
    # too short a new TCP and TLS handshake after every pause. Measured (benchmarks/idle_gaps.py, https
    # archive, 1.5 s pauses): 30 s against 0.75 s, the median request 0.60x and 0.69x in two runs.
    keepalive: float = 4.0
    # False: no study or series retrieve (instances) nor study metadata: the proxy retrieves the instances one
    # at a time and joins the series' metadata (dicomweb/assemble.py)
    whole_retrieve: bool = True
    max_results: int | None = None  # deepest `offset + limit` a search reaches; records past it are unreachable
    flat_search: bool = True  # False: /series needs a study and /instances a study and a series (hierarchical only)


PROFILES: dict[str, Profile] = {
    # Orthanc 1.10 + DICOMweb 1.7 (measured, docs/archive-behaviour.md): no percent-decoding, 200 [] for
    # no match, no thumbnail, 400 for single-part application/dicom, fuzzymatching=true silently ignored,
    # limit=0 = all.
    "orthanc": Profile("orthanc", decodes_query=False, zero_limit_means_all=True, fuzzy_matching=False,
                       thumbnail=False, single_part_instance=False, keepalive=0.75),  # it closes idle ones at 1 s
    # dcm4chee-arc-light: limit 1..99999, 204 for no match, Warning on server caps (from its source).
    "dcm4chee": Profile("dcm4chee", max_limit=99999, thumbnail=True, pixeldata=False,
                        keepalive=50.0),  # WildFly's HTTP listener closes idle connections at 60 s
    # Google Cloud Healthcare: no thumbnail, single-part instance accepted (its docs).
    "google": Profile("google", thumbnail=False, max_limit=5000,
                      keepalive=300.0),  # Google's front ends keep idle connections for about 10 minutes
    # Azure / Microsoft DICOM service: limit 1..200, single-part frame accepted (its docs).
    "azure": Profile("azure", max_limit=200, thumbnail=False, single_part_frame=True,
                     keepalive=200.0),  # Azure's load balancers drop idle connections after 4 minutes
    # AWS HealthImaging (upstream/healthimaging.py: what is documented, what assumed): instances retrieved one
    # by one, metadata per series or instance; searches reach 10,000 records and need the study (and series).
    # Its documented query keys hold no fuzzymatching: dropped, with the standard Warning.
    "aws": Profile("aws", thumbnail=False, rendered=False, whole_retrieve=False, max_results=10000, flat_search=False,
                   fuzzy_matching=False, keepalive=50.0),  # (assumed: AWS front ends drop idle ones at 60 s)
    # Anything else that follows PS3.18: assume the standard and nothing more.
    "generic": Profile("generic", thumbnail=False),
}
