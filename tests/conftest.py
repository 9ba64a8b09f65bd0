"""Session fixtures: the synthetic demo data, two real Orthanc archives, and the proxy in front of A.

Orthanc tests skip when Orthanc is not installed, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from support import ProxyProcess, missing

from proxy.demo.orthanc import OrthancServer, find_orthanc
from proxy.demo.synth import DemoSet, demo_set

ORTHANC_FIXTURES = {"orthanc_a", "orthanc_b", "proxy_a"}


STARTS_ORTHANC = ("orthanc_holding(", "OrthancServer(")  # what a module's own fixture or test calls to start one


def _starts_orthanc(module: object, name: str) -> bool:
    """Whether the function `name` of `module` (a fixture or the test itself) starts an Orthanc."""
    fn = getattr(module, name, None)
    fn = getattr(fn, "_get_wrapped_function", lambda: fn)()  # (pytest 8.4+: a fixture definition object)
    try:
        source = inspect.getsource(fn)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return False
    return any(call in source for call in STARTS_ORTHANC)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tag every test that needs a real Orthanc, so `-m "not orthanc"` deselects them: through the session
    fixtures, or through a fixture (or a test body) of its own module that starts one."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        module = getattr(item, "module", None)
        if ORTHANC_FIXTURES & names or any(_starts_orthanc(module, n) for n in names | {item.name.split("[")[0]}):
            item.add_marker(pytest.mark.orthanc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the proxy's log to the report of a failed test that used a proxy."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, ProxyProcess):
                report.sections.append((f"proxy log ({value.url})", value.log_tail()))


@pytest.fixture(scope="session")
def demo_data() -> DemoSet:
    return demo_set()


def _archive(tmp_path_factory: pytest.TempPathFactory, name: str,
             datasets: list[Dataset]) -> Iterator[OrthancServer]:
    if find_orthanc() is None:
        missing("Orthanc with the DICOMweb plugin is not installed (run ./scripts/test.sh to install it)")
    with OrthancServer(tmp_path_factory.mktemp(name.lower()), name) as server:
        server.store(datasets)
        yield server


@pytest.fixture(scope="session")
def orthanc_a(tmp_path_factory, demo_data) -> Iterator[OrthancServer]:
    yield from _archive(tmp_path_factory, "ORTHANC_A", demo_data.archive_a)


@pytest.fixture(scope="session")
def orthanc_b(tmp_path_factory, demo_data) -> Iterator[OrthancServer]:
    yield from _archive(tmp_path_factory, "ORTHANC_B", demo_data.archive_b)


@pytest.fixture(scope="session")
def proxy_a(tmp_path_factory, orthanc_a) -> Iterator[ProxyProcess]:
    with ProxyProcess({"a": orthanc_a.dicomweb_url}, tmp_path_factory.mktemp("proxy_a")) as proxy:
        yield proxy
