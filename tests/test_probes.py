"""Health probes (proxy/upstream/probes.py): one worker of a process group probes, every worker learns.

Two `Probes` on one run directory stand for two workers (the probe lock is an `flock`, held per open
file, so two in one process exclude each other as two processes do). The archives are a real Orthanc and
a port nothing listens on.
"""

from __future__ import annotations

import pytest
from support import free_port, orthanc_holding

from proxy.config import ArchiveConfig
from proxy.upstream.archive import Archive
from proxy.upstream.probes import Probes


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from orthanc_holding(tmp_path_factory, "PROBED", [])


def _worker(orthanc, nowhere: bool = False, **intervals) -> list[Archive]:
    url = f"http://127.0.0.1:{free_port()}/dicom-web" if nowhere else orthanc.dicomweb_url
    return [Archive(ArchiveConfig("up", url, health_interval=intervals.get("up"))),
            Archive(ArchiveConfig("down", f"http://127.0.0.1:{free_port()}/dicom-web", breaker_threshold=1,
                                  health_interval=intervals.get("down")))]


async def test_one_worker_probes_and_the_other_learns_the_answers(orthanc, tmp_path):
    # The follower's "up" points nowhere: it can only be up by the leader's answer, never by asking itself.
    first, second = _worker(orthanc), _worker(orthanc, nowhere=True)
    leader, follower = Probes(first, 5.0, str(tmp_path)), Probes(second, 5.0, str(tmp_path))
    try:
        assert leader.leads() and not follower.leads()
        assert [a.name for a in await leader.probe_due()] == ["up", "down"]
        assert await leader.probe_due() == []  # nothing due again before the interval has passed
        follower.learn()
        assert [(a.up, a.breaker.state) for a in second] == [(True, "closed"), (False, "open")]
        assert [(a.up, a.breaker.state) for a in first] == [(True, "closed"), (False, "open")]
    finally:
        leader.close()
        follower.close()
        for a in first + second:
            await a.close()


async def test_when_the_leader_goes_another_worker_takes_over(orthanc, tmp_path):
    first, second = _worker(orthanc), _worker(orthanc)
    leader, follower = Probes(first, 5.0, str(tmp_path)), Probes(second, 5.0, str(tmp_path))
    try:
        assert leader.leads() and not follower.leads()
        leader.close()  # as the kernel does for a worker that dies
        assert follower.leads()
        assert [a.name for a in await follower.probe_due()] == ["up", "down"]
        assert [a.up for a in second] == [True, False]
    finally:
        follower.close()
        for a in first + second:
            await a.close()


async def test_each_archive_has_its_own_interval(orthanc, tmp_path):
    archives = _worker(orthanc, down=0)  # "down" never probed; "up" at the server-wide interval
    alone = Probes(archives, 5.0)
    try:
        assert alone.leads()  # no run directory: a single worker always probes
        assert [a.name for a in await alone.probe_due()] == ["up"]
        assert [a.up for a in archives] == [True, None]
        assert not Probes(_worker(orthanc, up=0, down=0), 5.0).enabled
        assert Probes(_worker(orthanc, up=1.0), 0).enabled
    finally:
        for a in archives:
            await a.close()
