"""Replicas sharing what they learn through a real Redis (issue 6, point 7).

Two proxy processes in front of the same two real Orthanc archives share one `redis-server` (started
here on a free 127.0.0.1 port, no persistence). What one replica learns (where a study lives, a search
answer) the other uses without asking the archives; a store through either stales the other's search
answers; Redis going away turns both back into independent replicas that still answer everything.
Each replica's own upstream request counters (`/metrics`, by archive and service) show whom it asked.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, free_port, missing, orthanc_holding, require_binary

from proxy.cli import describe
from proxy.config import ConfigError, load
from proxy.demo.synth import Patient, Study, ct_series, to_part10

STUDY, SOP = "0020000D", "00080018"
PUBLIC_URL = "https://imaging.example.test"


class RedisServer:
    """`redis-server` on 127.0.0.1:PORT, no persistence, files under `workdir`; ready once it answers PING."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir, self.port = Path(workdir), port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        binary = require_binary("redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                "--logfile", str(self.workdir / "redis.log")]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self.log_tail()}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server not ready on port {self.port}: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel) but nothing is answered, a hung Redis."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self) -> str:
        log = self.workdir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def redis_binary() -> str:
    try:
        import redis  # noqa: F401
    except ImportError:
        missing("the redis Python package is not installed (pip install -e '.[test]')")
    return require_binary("redis-server")


def new_study(patient_id: str, n: int = 2, seed: int = 0) -> list:
    study = Study(Patient(f"SHARED^{patient_id}", patient_id), accession=patient_id, description="SHARED TIER")
    return list(ct_series(study, n, rows=8, cols=8, seed=seed))


@pytest.fixture(scope="module")
def holdings() -> dict[str, list]:
    """Each test's own studies, each on one archive only."""
    return {name: new_study(f"PIDR{i}", seed=i) for i, name in enumerate(("routed", "b_only"))}


@pytest.fixture(scope="module")
def archives(holdings, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Archive a (where stores go) holds the routed study, b the other one: two real Orthancs."""
    for a in orthanc_holding(tmp_path_factory, "SHARED_A", holdings["routed"]):
        for b in orthanc_holding(tmp_path_factory, "SHARED_B", holdings["b_only"]):
            yield {"a": a, "b": b}


def proxy(archives, workdir: Path, redis_url: str | None) -> ProxyProcess:
    # Replicas behind one load balancer: one external base URL, so the same answers (URLs included).
    env = {"DICOMWEB_EDGE_HEALTH_INTERVAL": "0", "DICOMWEB_EDGE_SEARCH_CACHE_TTL": "300",
           "DICOMWEB_EDGE_PUBLIC_URL": PUBLIC_URL}
    if redis_url:
        env["DICOMWEB_EDGE_REDIS_URL"] = redis_url
    return ProxyProcess({name: server.dicomweb_url for name, server in archives.items()}, workdir, env=env)


def metric(p: ProxyProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{p.url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def probes(p: ProxyProcess) -> float:
    """How many locate probes (QIDO by StudyInstanceUID to some archive) this proxy has sent."""
    return metric(p, "dicomweb_edge_upstream_requests_total", service="locate")


def asked(p: ProxyProcess) -> dict[tuple[str, str], float]:
    """What this replica has asked the archives so far: (archive, service) -> requests."""
    text = httpx.get(f"{p.url}/metrics", trust_env=False).text
    found: dict[tuple[str, str], float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "dicomweb_edge_upstream_requests_total" and s.value:
                key = (s.labels["archive"], s.labels["service"])
                found[key] = found.get(key, 0) + s.value
    return found


def sops(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return {r[SOP]["Value"][0] for r in response.json()}


def study_uids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return {r[STUDY]["Value"][0] for r in response.json()}


def stow(client: httpx.Client, p: ProxyProcess, datasets: list) -> httpx.Response:
    boundary = "sharedTierBoundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_part10(ds) + b"\r\n"
                    for ds in datasets) + f"--{boundary}--\r\n".encode()
    return client.post(f"{p.dicomweb_url}/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


@pytest.fixture(scope="module")
def redis_server(redis_binary, tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(archives, redis_server, tmp_path_factory) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    with proxy(archives, tmp_path_factory.mktemp("replica1"), redis_server.url) as one, \
            proxy(archives, tmp_path_factory.mktemp("replica2"), redis_server.url) as two:
        yield one, two


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20.0, trust_env=False) as c:
        yield c


def test_a_study_located_by_one_replica_is_routed_by_the_other_without_probing(
        pair, archives, holdings, client, tmp_path):
    one, two = pair
    uid = holdings["routed"][0].StudyInstanceUID
    expected = {ds.SOPInstanceUID for ds in holdings["routed"]}

    assert sops(client.get(f"{one.dicomweb_url}/studies/{uid}/metadata")) == expected
    assert probes(one) == 2  # replica 1 did not know: it asked both archives

    before = asked(two)
    assert sops(client.get(f"{two.dicomweb_url}/studies/{uid}/metadata")) == expected
    new = {key: n - before.get(key, 0) for key, n in asked(two).items() if n != before.get(key, 0)}
    assert new == {("a", "metadata"): 1}, "replica 2 asked more than the archive that holds the study"
    assert metric(two, "dicomweb_edge_shared_lookups_total", table="locator", result="hit") == 1

    # The same request through a replica without the shared tier has to probe: what is shared is the point.
    with proxy(archives, tmp_path / "solo", None) as solo:
        assert sops(client.get(f"{solo.dicomweb_url}/studies/{uid}/metadata")) == expected
        assert probes(solo) == 2
        assert asked(solo) == {("a", "locate"): 1, ("b", "locate"): 1, ("a", "metadata"): 1}


def test_search_answers_are_shared_and_a_store_through_either_replica_stales_them(pair, archives, holdings,
                                                                                 client):
    one, two = pair
    search = "/studies?AccessionNumber=PIDR*"
    held = {holdings[k][0].StudyInstanceUID for k in holdings}

    first = client.get(one.dicomweb_url + search)
    assert study_uids(first) == held and "x-cache" not in first.headers
    before = asked(two)

    shared = client.get(two.dicomweb_url + search)
    assert study_uids(shared) == held and shared.headers.get("x-cache") == "HIT"
    assert asked(two) == before, "replica 2 asked an archive for an answer replica 1 had shared"
    assert metric(two, "dicomweb_edge_cache_lookups_total", tier="shared", kind="search", result="hit") == 1

    # A store through replica 2: replica 1's own answer (in its memory, kept 300 s) must go too.
    added = new_study("PIDR9", seed=9)
    new_uid = added[0].StudyInstanceUID
    assert stow(client, two, added).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        seen = study_uids(client.get(one.dicomweb_url + search))
        if new_uid in seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seen == held | {new_uid}, "replica 1 still answers from before the store through replica 2"
    # Replica 1's fresh answer is shared again, and the stored study's location came with the store.
    again = client.get(two.dicomweb_url + search)
    assert study_uids(again) == held | {new_uid} and again.headers.get("x-cache") == "HIT"
    probes_before = probes(one)
    assert sops(client.get(f"{one.dicomweb_url}/studies/{new_uid}/metadata")) == {ds.SOPInstanceUID for ds in added}
    assert probes(one) == probes_before


def test_without_redis_both_replicas_keep_answering_on_their_own(archives, holdings, redis_binary, client,
                                                                 tmp_path):
    routed, b_only = holdings["routed"], holdings["b_only"]
    with RedisServer(tmp_path / "redis") as server, \
            proxy(archives, tmp_path / "one", server.url) as one, proxy(archives, tmp_path / "two", server.url) as two:
        uid = routed[0].StudyInstanceUID
        assert sops(client.get(f"{one.dicomweb_url}/studies/{uid}/metadata")) == {ds.SOPInstanceUID for ds in routed}
        listing = study_uids(client.get(one.dicomweb_url + "/studies?AccessionNumber=PID*"))
        server.pause()

        # Replica 2's Redis calls time out: it probes, and answers as it would alone.
        assert sops(client.get(f"{two.dicomweb_url}/studies/{uid}/metadata")) == {ds.SOPInstanceUID for ds in routed}
        assert probes(two) == 2
        assert study_uids(client.get(two.dicomweb_url + "/studies?AccessionNumber=PID*")) == listing
        b_uid = b_only[0].StudyInstanceUID
        assert sops(client.get(f"{two.dicomweb_url}/studies/{b_uid}/metadata")) == {ds.SOPInstanceUID for ds in b_only}

        server.stop()  # and now Redis is gone altogether

        # A store still works and still clears the storing replica's own search answers.
        added = new_study("PIDS8", seed=8)
        assert stow(client, one, added).status_code == 200
        after = study_uids(client.get(one.dicomweb_url + "/studies?AccessionNumber=PID*"))
        assert after == listing | {added[0].StudyInstanceUID}
        assert metric(one, "dicomweb_edge_shared_fallbacks_total") > 0
        assert metric(two, "dicomweb_edge_shared_fallbacks_total") > 0
        warned = "shared tier (Redis) unavailable"
        assert warned in one.log_path.read_text() and warned in two.log_path.read_text()

        # Redis back (empty, same address): once both replicas listen again, they share again.
        with RedisServer(tmp_path / "redis-again", port=server.port) as again:
            wait_for_listeners(again, 2)
            late = new_study("PIDT7", seed=7)
            archives["b"].store(late)
            late_uid, expected = late[0].StudyInstanceUID, {ds.SOPInstanceUID for ds in late}
            probed = probes(one), probes(two)
            assert sops(client.get(f"{one.dicomweb_url}/studies/{late_uid}/metadata")) == expected
            assert sops(client.get(f"{two.dicomweb_url}/studies/{late_uid}/metadata")) == expected
            assert (probes(one), probes(two)) == (probed[0] + 2, probed[1])


def wait_for_listeners(server: RedisServer, n: int, timeout: float = 15.0) -> None:
    """Until `n` processes subscribe to the event channel (a replica re-subscribes a few seconds after
    Redis comes back, and by then it uses Redis again)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while dict(client.pubsub_numsub("dicomweb-edge:events")).get(b"dicomweb-edge:events", 0) < n:
            assert time.monotonic() < deadline, "the replicas did not subscribe again after Redis came back"
            time.sleep(0.05)
    finally:
        client.close()


def test_shared_settings_load_validate_and_hide_the_password(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[shared]\nredis_url = "redis://edge:s3cret@127.0.0.1:6390/2"\nredis_key_prefix = "site1:"\n'
                    'redis_timeout = 0.5\n\n[[archives]]\nname = "a"\nurl = "http://127.0.0.1:8042/dicom-web"\n')
    s = load(path, environ={})
    assert (s.redis_url, s.redis_key_prefix, s.redis_timeout) == ("redis://edge:s3cret@127.0.0.1:6390/2", "site1:",
                                                                  0.5)
    text = describe(s)
    assert "s3cret" not in text and 'redis_url = "redis://edge:***@127.0.0.1:6390/2"' in text
    s = load(path, environ={"DICOMWEB_EDGE_REDIS_URL": "redis://127.0.0.1:6391/0", "DICOMWEB_EDGE_REDIS_TIMEOUT": "1"})
    assert (s.redis_url, s.redis_timeout) == ("redis://127.0.0.1:6391/0", 1.0)
    assert load(path, environ={"DICOMWEB_EDGE_REDIS_URL": ""}).redis_url is None  # empty: no shared tier
    for env, needle in (({"DICOMWEB_EDGE_REDIS_URL": "http://127.0.0.1:6379"}, "redis://"),
                        ({"DICOMWEB_EDGE_REDIS_TIMEOUT": "0"}, "redis_timeout"),
                        ({"DICOMWEB_EDGE_REDIS_KEY_PREFIX": "has space"}, "redis_key_prefix")):
        with pytest.raises(ConfigError, match=needle):
            load(path, environ=env)
