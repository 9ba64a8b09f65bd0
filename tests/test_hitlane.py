"""The cache phase (proxy/http/hitlane.py) runs only where no per-request policy has to come first."""

import dataclasses

from proxy.config import Settings
from proxy.http.hitlane import applies


def test_the_cache_phase_is_on_only_without_per_request_policies():
    s = Settings(cache_dir="/tmp/c")
    assert applies(s, "none", forwarding=False)
    assert not applies(Settings(), "none", forwarding=False)  # no cache, nothing to answer from
    assert not applies(s, "api_key", forwarding=False)  # inbound authentication comes first
    assert not applies(s, "jwt", forwarding=False)
    assert not applies(s, "none", forwarding=True)  # token pass-through: the archive decides per caller
    assert not applies(dataclasses.replace(s, client_request_rate=10.0), "none", forwarding=False)
    assert not applies(dataclasses.replace(s, client_byte_rate=1e6), "none", forwarding=False)
