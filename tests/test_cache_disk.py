"""The disk tier's values round-trip whatever their size (cache.py writes large ones without copies)."""

import os

from proxy.cache import FrameCache
from proxy.part10 import EXPLICIT_LE


def test_frames_metadata_and_objects_of_every_size_come_back_from_disk_as_written(tmp_path):
    cache = FrameCache(str(tmp_path))
    sizes = [0, 10, 32 * 1024 - 17, 32 * 1024, 512 * 1024, 3 * 1024 * 1024 + 5]
    frames = {n: os.urandom(size) for n, size in enumerate(sizes, start=1)}
    for n, payload in frames.items():
        cache.write("1.2.3", n, "application/octet-stream", EXPLICIT_LE, payload, "1.2")
    body = b"[" + b",".join(b'{"00080018":{"vr":"UI","Value":["1.2.%d"]}}' % i for i in range(20000)) + b"]"
    cache.put_json("meta", body, "1.2", ttl=60)
    cache.write_entries([("obj/a", frames[5]), ("obj/b", b"tiny")], "instance", "1.2")
    fresh = FrameCache(str(tmp_path))  # another worker: nothing in memory, everything from disk
    for n, payload in frames.items():
        hit = fresh.get("1.2.3", n, "application/octet-stream", "*")
        assert hit is not None and hit.payload == payload and hit.transfer_syntax == EXPLICIT_LE, n
    assert fresh.get_json("meta") == body
    assert fresh.get_entry("obj/a", "instance")[0] == frames[5]
    assert fresh.get_entry("obj/b", "instance")[0] == b"tiny"
