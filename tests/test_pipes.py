"""The relay pipes of a worker (proxy/upstream/splice.py, `Pipes`): one pool a worker, made by the composition
root and shared by its archives; a pipe goes back to the pool it came from, kept while empty, and the pool
never lends more than MAX_PIPES at once."""

import os
import sys

import pytest

from proxy.config import ArchiveConfig, load
from proxy.runtime import build_context
from proxy.upstream import splice
from proxy.upstream.archive import Archive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are Linux's (F_SETPIPE_SZ)")


def close(pool: splice.Pipes) -> None:
    """Close the pipes `pool` keeps (a worker keeps them until it exits)."""
    for pipe in pool.idle:
        os.close(pipe.r)
        os.close(pipe.w)
    pool.idle.clear()


def test_a_pipe_goes_back_to_its_own_pool_and_is_kept_while_empty():
    one, two = splice.Pipes(), splice.Pipes()
    pipe = one.take()
    assert pipe is not None and pipe.pool is one and one.taken == 1 and two.taken == 0
    pipe.give()
    pipe.give()  # once only
    assert one.taken == 0 and one.idle == [pipe] and two.idle == []
    assert one.take() is pipe  # reused
    pipe.clean = False  # a relay left bytes in it: closed, not kept
    pipe.give()
    assert one.idle == [] and one.taken == 0
    close(one)


def test_a_pool_lends_max_pipes_at_most(monkeypatch):
    monkeypatch.setattr(splice, "MAX_PIPES", 3)
    pool = splice.Pipes()
    lent = [pool.take() for _ in range(3)]
    assert all(lent) and pool.take() is None
    other = splice.Pipes()
    elsewhere = other.take()  # another worker's pool is not this one's
    assert elsewhere is not None
    elsewhere.give()
    close(other)
    for pipe in lent:
        assert pipe is not None
        pipe.give()
    assert pool.taken == 0 and len(pool.idle) == 3
    close(pool)


async def test_a_workers_archives_share_one_pool_and_an_archive_alone_has_its_own():
    settings = load(None, {"archives": [{"name": "a", "url": "http://127.0.0.1:9/dw"},
                                        {"name": "b", "url": "http://127.0.0.1:9/dw"}], "health_interval": 0},
                    environ={})
    ctx = build_context(settings)
    alone = Archive(ArchiveConfig("c", "http://127.0.0.1:9/dw"))
    try:
        assert ctx.archives[0].pipes is ctx.archives[1].pipes
        assert alone.pipes is not ctx.archives[0].pipes
    finally:
        for archive in (*ctx.archives, alone):
            await archive.close()
