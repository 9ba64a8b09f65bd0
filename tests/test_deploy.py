"""Deployment material (deploy/): it parses, its references resolve, and what can run here runs.

The image is built and run by tests/test_image_e2e.py (podman). No Docker engine, Compose or Kubernetes
runs on the test machines, so the compose stack and the Kubernetes manifests are not started. What is
checked instead: every YAML parses; the Kubernetes objects match the API's schemas (kubernetes-validate,
strict); selectors, names, ports, paths and grace periods agree across files; the configs pass
`dicomweb-edge check-config`; the ConfigMap's config boots a real proxy whose probe paths answer; the
image's HEALTHCHECK command is run against a real proxy; the image's install steps are the README's, and
so is the `docker run` line; the systemd unit passes `systemd-analyze verify` and `security`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import REPO_ROOT, ProxyProcess, free_port, missing, require_binary

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
UNIT = DEPLOY / "systemd" / "dicomweb-edge.service"
README = REPO_ROOT / "README.md"
K8S_VERSION = "1.29"  # the oldest Kubernetes the manifests are meant for


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    return [d for name in kustomization["resources"] for d in yaml_docs(K8S / name)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def statefulset() -> dict[str, Any]:
    return one("StatefulSet")


def proxy_container() -> dict[str, Any]:
    containers = statefulset()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "proxy")


def configmap_toml() -> str:
    return one("ConfigMap", "dicomweb-edge-config")["data"]["config.toml"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()[:-1] + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1].strip()) for x in lines]


def readme_install_commands() -> list[str]:
    """The shell lines of the README's "Installing without the scripts" block."""
    text = README.read_text()
    match = re.search(r"Installing without the scripts.*?```sh\n(.*?)```", text, re.S)
    assert match, "README: no 'Installing without the scripts' block"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def check_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(path)], capture_output=True,
                          text=True, cwd=REPO_ROOT)


# --- every file parses ----------------------------------------------------------------------------------


def test_every_yaml_file_in_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {COMPOSE, K8S / "statefulset.yaml"} <= set(files)
    for path in files:
        assert yaml_docs(path), f"{path} is empty"


def test_kubernetes_objects_match_the_api_schemas():
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (pip install -e '.[test]')")
    listed = {name for name in yaml_docs(K8S / "kustomization.yaml")[0]["resources"]}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, "kustomization resources"
    kinds = set()
    for obj in k8s_objects():
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by hand below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor", "Deployment"} <= kinds


# --- Kubernetes: the objects refer to each other correctly -----------------------------------------------


def test_selectors_and_names_match_the_statefulset():
    sts = statefulset()
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(sts["spec"]["selector"]["matchLabels"], labels)
    services = [o for o in k8s_objects() if o["kind"] == "Service"]
    proxy_services = [s for s in services if selects(s["spec"]["selector"], labels)]
    assert {s["metadata"]["name"] for s in proxy_services} == {"dicomweb-edge", "dicomweb-edge-headless"}
    headless = one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    port_names = {p["name"] for p in proxy_container()["ports"]}
    for s in proxy_services:
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= port_names
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == ("StatefulSet", sts["metadata"]["name"],
                                                                      sts["apiVersion"])
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in scraped] == ["dicomweb-edge"], "one Service scraped: no duplicates"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    front = one("Deployment", "dicomweb-edge-front")["spec"]["template"]["metadata"]["labels"]
    assert not selects(sts["spec"]["selector"]["matchLabels"], front), "the front's pods must not count as replicas"


def test_config_volume_and_cache_volume_are_wired():
    sts, container = statefulset(), proxy_container()
    config = tomllib.loads(configmap_toml())
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    (config_volume,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "dicomweb-edge-config"]
    item = volumes[config_volume]["configMap"]["items"][0]
    assert item["key"] == "config.toml"
    assert f"{mounts[config_volume]['mountPath']}/{item['path']}" == config_path
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]]["mountPath"] == config["cache"]["dir"]
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and config["cache"]["size_bytes"] < int(size[:-2]) * 1024**3
    assert [p["containerPort"] for p in container["ports"]] == [config["server"]["port"]]
    assert config["server"]["host"] == "0.0.0.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp", "PROMETHEUS_MULTIPROC_DIR and temp files need a writable /tmp"


def test_termination_outlasts_the_drain():
    spec = statefulset()["spec"]["template"]["spec"]
    grace = tomllib.loads(configmap_toml())["server"]["shutdown_grace"]
    command = proxy_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + grace


def test_pods_run_as_the_images_non_root_user():
    pod = statefulset()["spec"]["template"]["spec"]["securityContext"]
    user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(user) != 0
    assert proxy_container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_kubernetes_front_hashes_like_deploy_nginx_front_conf():
    front_conf = (DEPLOY / "nginx" / "front.conf").read_text()
    k8s_conf = one("ConfigMap", "dicomweb-edge-front")["data"]["default.conf"]
    maps = re.compile(r"^\s*map [^{]*\{[^}]*\}", re.M)
    norm = [re.sub(r"\s+", " ", m) for m in maps.findall(front_conf)]
    assert len(norm) == 3 and norm == [re.sub(r"\s+", " ", m) for m in maps.findall(k8s_conf)]
    assert "hash $dicomweb_hash_key consistent;" in front_conf and "hash $dicomweb_hash_key consistent;" in k8s_conf
    namespace = yaml_docs(K8S / "kustomization.yaml")[0]["namespace"]
    headless = statefulset()["spec"]["serviceName"]
    port = proxy_container()["ports"][0]["containerPort"]
    assert f"server {headless}.{namespace}.svc.cluster.local:{port} resolve" in k8s_conf


# --- the configs are valid, and the ConfigMap's one boots ---------------------------------------------------


@pytest.mark.parametrize("source", ["kubernetes ConfigMap", "deploy/docker/config.toml"])
def test_shipped_configs_pass_check_config(source, tmp_path):
    text = configmap_toml() if source.startswith("kubernetes") else (DOCKER / "config.toml").read_text()
    result = check_config(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'host = "0.0.0.0"' in result.stdout


def test_configmap_config_boots_and_the_probe_paths_answer(tmp_path):
    """The ConfigMap's config, with only port, cache dir and archive URL moved onto this machine."""
    text = configmap_toml()
    text = re.sub(r'(?m)^host = .*$', 'host = "127.0.0.1"', text)
    text = re.sub(r'(?m)^dir = .*$', f'dir = "{tmp_path / "cache"}"', text)
    text = re.sub(r'(?m)^url = .*$', f'url = "http://127.0.0.1:{free_port()}/dicom-web"', text)
    (tmp_path / "edge.toml").write_text(text)
    probes = {k: proxy_container()[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    with ProxyProcess({}, tmp_path, ["--config", str(tmp_path / "edge.toml")]) as proxy:
        assert httpx.get(proxy.url + probes["livenessProbe"], trust_env=False).status_code == 200
        assert httpx.get(proxy.url + probes["startupProbe"], trust_env=False).status_code == 200
        deadline = time.monotonic() + 30  # (until the health loop has probed the archive: there is none here)
        while (ready := httpx.get(proxy.url + probes["readinessProbe"], trust_env=False)).json()["archives"][
                "pacs"]["up"] is not False and time.monotonic() < deadline:
            time.sleep(0.1)
        # The archive is down, the cache is readable: ready (an archive outage keeps the replica serving).
        assert ready.status_code == 200 and ready.json()["archives"]["pacs"]["up"] is False
        assert ready.json()["cache"] == "on"


# --- compose ----------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml_docs(COMPOSE)[0]


def test_compose_references_resolve():
    doc = compose()
    services = doc["services"]
    assert {"proxy", "orthanc-a", "orthanc-b", "prometheus", "grafana"} <= set(services)
    build = services["proxy"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO_ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in doc["volumes"], f"{name}: named volume {source} is not declared"
        for network in service.get("networks", []):
            assert network in doc["networks"]
        for dependency in service.get("depends_on", []):
            assert dependency in services
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"


def test_compose_proxy_config_matches_the_stack():
    doc = compose()
    services = doc["services"]
    mounts = dict(v.split(":")[:2] for v in services["proxy"]["volumes"])
    config_path = mounts["./config.toml"]
    assert services["proxy"].get("command") is None  # the image's CMD
    cmd = shlex.split(dict(dockerfile_instructions())["CMD"].replace('", "', " ").strip('[]"'))
    assert cmd[cmd.index("--config") + 1] == config_path
    config = tomllib.loads((DOCKER / "config.toml").read_text())
    assert mounts[next(k for k in mounts if not k.startswith("."))] == config["cache"]["dir"]
    proxy_networks = set(services["proxy"]["networks"])
    for archive in config["archives"]:
        host = httpx.URL(archive["url"]).host
        assert host in services and proxy_networks & set(services[host]["networks"]), f"{host} unreachable"
        assert "8042" not in str(services[host].get("ports", [])), "the archives are not published"
    assert doc["networks"]["archives"]["internal"] is True
    stop = int(services["proxy"]["stop_grace_period"].rstrip("s"))
    assert stop > config["server"]["shutdown_grace"]
    published = services["proxy"]["ports"][0].rsplit(":", 1)[1]
    assert int(published) == config["server"]["port"]
    assert services["proxy"]["ulimits"]["nofile"]["soft"] >= 65536  # open files (the proxy raises soft to hard)


def test_compose_monitoring_is_wired():
    services = compose()["services"]
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["../prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom_mounts["../prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    prometheus = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    for rule_file in prometheus["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prom_mounts.values()
    port = tomllib.loads((DOCKER / "config.toml").read_text())["server"]["port"]
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"proxy:{port}" in targets
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert graf_mounts["../grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert graf_mounts["../grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    (datasource,) = yaml_docs(provisioning / "datasources" / "prometheus.yaml")[0]["datasources"]
    assert datasource["type"] == "prometheus" and httpx.URL(datasource["url"]).host in services
    (provider,) = yaml_docs(provisioning / "dashboards" / "dicomweb-edge.yaml")[0]["providers"]
    assert graf_mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana" / "dashboards" / "dicomweb-edge.json").is_file()


# --- the image ----------------------------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    given = dict(instructions)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim"  # scripts/build-image.sh passes a Debian base of its own
    assert [a.split()[0] for i, a in instructions if i == "FROM"] == ["${BASE_IMAGE}"] * 2  # build stage, image
    user = given["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) > 0
    assert [i for i, _ in instructions].index("USER") > max(n for n, (i, _) in enumerate(instructions) if i == "RUN")
    config = tomllib.loads((DOCKER / "config.toml").read_text())
    assert given["EXPOSE"] == str(config["server"]["port"])
    assert given["VOLUME"].strip('[]"') == config["cache"]["dir"]
    assert f"or {config['server']['port']}" in given["HEALTHCHECK"] and "DICOMWEB_EDGE_PORT" in given["HEALTHCHECK"]
    ignored = [x.rstrip("/") for x in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()]
    sources = [s for i, a in instructions if i == "COPY" and not a.startswith("--from=") for s in a.split()[:-1]]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", " ".join(a for i, a in instructions if i == "RUN"))
    assert "deploy/docker/wheels" in sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"{source}: not in the repository"
        assert f"!{source.rstrip('/')}" in ignored, f"{source} is not in the context"


def test_dockerfile_installs_the_way_the_readme_says():
    run = " && ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    steps = [re.sub(r"^(--mount=\S+\s+)+", "", s.strip()) for s in run.split("&&")]
    commands = readme_install_commands()
    assert commands[0] == "python3 -m venv /opt/dicomweb-edge"
    assert commands[1] == "/opt/dicomweb-edge/bin/pip install --require-hashes -r requirements/runtime.txt"
    assert commands[2] == "/opt/dicomweb-edge/bin/pip install --no-deps --no-build-isolation ."
    assert steps[:3] == [commands[0], commands[1].replace("install ", "install --find-links /tmp/wheels ", 1),
                         commands[2]], "the image does not install the README's way"
    assert "/opt/dicomweb-edge/bin/dicomweb-edge" in UNIT.read_text(), "the systemd unit uses the same install"
    assert all(command in UNIT.read_text() for command in commands[:3]), "the unit's install steps are the README's"


def test_the_readmes_docker_run_line_agrees_with_the_image():
    block = re.search(r"```sh\n(\s*docker build .*?)```", README.read_text(), re.S)
    assert block, "README: no docker build / docker run block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    build = shlex.split(next(x for x in lines if x.strip().startswith("docker build")))
    run = shlex.split(next(x for x in lines if x.strip().startswith("docker run")))
    config = tomllib.loads((DOCKER / "config.toml").read_text())
    tag = build[build.index("-t") + 1]
    assert run[-1] == tag == compose()["services"]["proxy"]["image"]
    assert build[build.index("-f") + 1] == str(DOCKERFILE.relative_to(REPO_ROOT))
    published = run[run.index("-p") + 1]
    assert published.startswith("127.0.0.1:") and published.endswith(f":{config['server']['port']}")
    volume = run[run.index("-v") + 1].split(":")
    assert volume[1] == config["cache"]["dir"] == dict(dockerfile_instructions())["VOLUME"].strip('[]"')
    assert int(run[run.index("--stop-timeout") + 1]) > config["server"]["shutdown_grace"]
    assert run[run.index("-e") + 1].startswith("DICOMWEB_EDGE_UPSTREAMS=")


def test_the_images_healthcheck_command_tells_up_from_down(tmp_path):
    """The HEALTHCHECK's exec form run here, against a real proxy on a free port, then against nothing."""
    args = dict(dockerfile_instructions())["HEALTHCHECK"].split("CMD", 1)[1].strip()
    command = yaml.safe_load(args)  # a JSON array
    assert command[0] == "python3"
    port = free_port()
    probe = [sys.executable, *command[1:]]
    env = {**os.environ, "DICOMWEB_EDGE_PORT": str(port)}  # as the proxy in the container is told its port
    with ProxyProcess({"a": f"http://127.0.0.1:{free_port()}/dicom-web"}, tmp_path, port=port):
        assert subprocess.run(probe, capture_output=True, timeout=30, env=env).returncode == 0
    assert subprocess.run(probe, capture_output=True, timeout=30, env=env).returncode != 0


# --- systemd --------------------------------------------------------------------------------------------------


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    analyze = require_binary("systemd-analyze")
    # The unit as installed, except that ExecStart names this checkout's Python (verify checks the binary).
    unit = tmp_path / "dicomweb-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/dicomweb-edge/bin/dicomweb-edge", f"{sys.executable} -m proxy.cli"))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(unit)],
                              capture_output=True, text=True, cwd=tmp_path)
    assert security.returncode == 0, security.stdout[-2000:]  # overall exposure 2.0 or better ("OK")
    text = UNIT.read_text()
    stop = int(re.search(r"(?m)^TimeoutStopSec=(\d+)$", text).group(1))
    assert stop > 30, "TimeoutStopSec must outlast the default shutdown_grace (30 s)"
    assert re.search(r"(?m)^KillMode=mixed$", text), "SIGTERM to the main process only; it stops its workers"
    assert re.search(r"(?m)^DynamicUser=yes$", text) and re.search(r"(?m)^CacheDirectory=dicomweb-edge$", text)


def test_the_kubernetes_front_config_passes_nginx_t(tmp_path):
    """nginx -t on front.yaml's config; `resolve`, `zone` and `resolver` (nginx >= 1.27.3) are taken out
    for Debian's older nginx, and the Service name becomes an address (nginx -t resolves names)."""
    nginx = require_binary("nginx")
    conf = one("ConfigMap", "dicomweb-edge-front")["data"]["default.conf"]
    conf, n = re.subn(r"server \S+\.svc\.cluster\.local:(\d+) resolve ", r"server 127.0.0.1:\1 ", conf)
    assert n == 1
    conf = re.sub(r"(?m)^\s*(resolver|zone) [^\n]*;\n", "", conf)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "default.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  client_body_temp_path {tmp_path}/tmp; proxy_temp_path {tmp_path}/tmp;\n"
        f"  fastcgi_temp_path {tmp_path}/tmp; uwsgi_temp_path {tmp_path}/tmp; scgi_temp_path {tmp_path}/tmp;\n"
        f"  include {tmp_path}/default.conf;\n}}\n")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c",
                             str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
