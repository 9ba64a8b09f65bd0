"""Where a cached object belongs: the study and series the archive placed it in, and who it was answered for.

Every cache key of an object (frame, instance, bulk data element, rendering, thumbnail, metadata
document) starts with its placement, so that a cached answer is the archive's answer for exactly the URL
it came from: `/studies/A/series/B/instances/I/frames/1` and the same instance named under another study
are two keys, and the second misses (the archives answer it 404). The placement is learned from the
archive's answer, never from the request a hit answers:

- a Part 10 instance passing through (a retrieve, a prefetch) is placed by its own Study and Series
  Instance UIDs, whatever URL brought it;
- an object whose bytes name no UIDs (a frame, a rendering, a bulk data element, a metadata document) is
  placed by the URL the archive answered with a 200: archives check the hierarchy (Orthanc and the sample
  archive answer 404 when the series or instance is not in the study; tests/test_cache_belonging_e2e.py).

The audience says whose answer it was: '' for what an archive read with the proxy's own credentials
answered (the same for every reader, so every reader is served it), else the name of the token
pass-through archive that answered one caller (served only to callers that archive confirmed for the
study: `access.admit`).
"""

from __future__ import annotations

from dataclasses import dataclass

SHARED = ""  # the audience of what the proxy learned with its own credentials


@dataclass(frozen=True, slots=True)
class Placement:
    """The study and series (`''` for a study-level object) an object belongs to, and its audience."""

    study: str
    series: str = ""
    audience: str = SHARED

    def key(self, uid: str) -> str:
        """The cache's name of the object `uid` placed here (the start of each of its keys)."""
        return f"{self.audience}@{self.study}/{self.series or '-'}/{uid}"

    def to(self, audience: str) -> Placement:
        """The same place, answered for `audience`."""
        return self if audience == self.audience else Placement(self.study, self.series, audience)
