"""Typed configuration (issue 24, point 1), as a user meets it on the command line: a wrong value is one
clear line naming the file, the section, the key, what was expected and what was given, exit status 2 and
no traceback, from `check-config` and `serve` alike; `check-config` prints the effective configuration as
TOML that `serve --config` takes back, with every secret printed as `***`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from support import ProxyProcess

from proxy.config import load

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = '[[archives]]\nname = "pacs"\nurl = "http://127.0.0.1:9/dicom-web"\n'


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_EDGE_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**environ, **(env or {})}, timeout=60)


# One case per failure class: the config text, then what the one-line message must say besides the file.
FAILURES = {
    "wrong type": ('[server]\nport = "8080"\n' + ARCHIVE,
                   ["[server] port", "expected an integer from 1 to 65535", 'given "8080" (a string']),
    "unknown key": ("[server]\nprot = 8080\n" + ARCHIVE,
                    ["[server] prot", "not a key of [server] (did you mean port?)", "given prot = 8080",
                     "expected one of: host, port, workers"]),
    "key in the wrong section": ("[server]\nprefetch = false\n" + ARCHIVE,
                                 ["[server] prefetch", "`prefetch` is a key of [cache], not of [server]",
                                  "given prefetch = false", "expected under [cache]"]),
    "bad choice": ('[server]\nlog_level = "verbose"\n' + ARCHIVE,
                   ["[server] log_level", 'expected one of "debug", "error", "info" or "warning"',
                    'given "verbose"']),
    "out of range": ("[limits]\nmax_header_bytes = 100\n" + ARCHIVE,
                     ["[limits] max_header_bytes", "expected a whole number of bytes from 1024 to 1048576",
                      "given 100"]),
    "string for a bool": ('[cache]\nprefetch = "false"\n' + ARCHIVE,
                          ["[cache] prefetch", "expected true or false", 'given "false" (a string; write false '
                                                                          "without quotes)"]),
    "an archive's table": (ARCHIVE + 'timeouts = { connect = 0, first_byte = "30s" }\n',
                           ['[[archives]] #1 ("pacs") timeouts.connect', "expected a number of seconds greater "
                            "than 0", "given 0"]),
    "a missing key": ('[[archives]]\nname = "pacs"\n',
                      ['[[archives]] #1 ("pacs") url', "missing", "expected a string"]),
    "unknown section": ("[sever]\nport = 8080\n" + ARCHIVE,
                        ["[sever]", "not a section (did you mean [server]?)", "expected one of: [server], [cache]"]),
}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", FAILURES)
def test_each_failure_class_is_one_clear_line_and_exit_2(case, command, tmp_path):
    text, needles = FAILURES[case]
    path = tmp_path / "edge.toml"
    path.write_text(text)
    result = cli(*(["check-config", str(path)] if command == "check-config" else ["serve", "--config", str(path)]))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"dicomweb-edge: configuration error: {path}, "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


@pytest.mark.parametrize("env,needles", [
    ({"DICOMWEB_EDGE_PREFETCH": "flase"}, ["environment variable DICOMWEB_EDGE_PREFETCH ([cache] prefetch)",
                                           "expected true or false", 'given "flase"']),
    ({"DICOMWEB_EDGE_PORT": "70000"}, ["environment variable DICOMWEB_EDGE_PORT ([server] port)",
                                       "expected an integer from 1 to 65535", "given 70000"]),
    ({"DICOMWEB_EDGE_LOG_FORMAT": "xml"}, ["DICOMWEB_EDGE_LOG_FORMAT", 'expected one of "json" or "text"']),
])
def test_environment_variables_are_typed_and_named(env, needles, tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(ARCHIVE)
    result = cli("check-config", str(path), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_a_flag_out_of_range_names_the_flag(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(ARCHIVE)
    result = cli("serve", "--config", str(path), "--port", "70000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--port ([server] port): expected an integer from 1 to 65535, given 70000" in result.stderr


SECRETS = {"bulk-token-key-0123456789": "[server] bulk_token_key", "archive-password": "password",
           "archive-token": "token", "archive-client-secret": "client_secret", "b" * 64: "sha256"}
FULL = f"""
[server]
host = "127.0.0.1"
port = 8080
public_url = "https://imaging.example.org"
trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]
cors_origins = ["https://viewer.example.org"]
bulk_token_key = "bulk-token-key-0123456789"
log_format = "text"
disable = ["splice"]

[cache]
dir = "cache"
prefetch = false
warm_bytes = 0

[limits]
client_request_rate = 100.5

[federation]
empty_search_status = 204

[shared]
redis_key_prefix = "edge-test:"

[auth]
mode = "api_key"
api_keys = [{{ name = "viewer", sha256 = "{"b" * 64}", scopes = ["read"] }}]
access_ttl = 30

[[archives]]
name = "basic"
url = "http://127.0.0.1:9/dicom-web"
auth = {{ type = "basic", username = "edge", password = "archive-password" }}
timeouts = {{ connect = 2, first_byte = 10.5, idle_read = 5 }}

[[archives]]
name = "bearer"
url = "http://127.0.0.1:9/other"
priority = 5
stores = false
url_aliases = ["http://localhost/other"]
auth = {{ type = "bearer", token = "archive-token" }}

[[archives]]
name = "oauth2"
url = "http://127.0.0.1:9/third"
profile = "generic"
auth = {{ type = "oauth2", token_url = "http://127.0.0.1:9/token", client_id = "edge", client_secret = \
"archive-client-secret", scope = "dicomweb.read" }}
"""


def test_check_config_output_is_toml_without_secrets_and_serve_takes_it_back(tmp_path):
    original = tmp_path / "edge.toml"
    original.write_text(FULL)
    printed = cli("check-config", str(original))
    assert printed.returncode == 0, printed.stderr
    document = tomllib.loads(printed.stdout)  # valid TOML (no `null`)
    assert document["server"]["port"] == 8080 and document["cache"]["prefetch"] is False
    assert document["limits"]["max_header_bytes"] == 32768  # defaults are printed: the effective configuration
    assert [a["name"] for a in document["archives"]] == ["basic", "bearer", "oauth2"]
    for secret in SECRETS:
        assert secret not in printed.stdout
    assert printed.stdout.count('"***"') == len(SECRETS)

    # Fed back as it is, the masked secrets are refused (a `***` is never taken for a password)...
    masked = tmp_path / "masked.toml"
    masked.write_text(printed.stdout)
    refused = cli("check-config", str(masked))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{masked}, [server] bulk_token_key: expected the secret itself, given \"***\"" in refused.stderr

    # ... and with the secrets put back, it is the same configuration, printed the same way.
    text = printed.stdout
    for secret, key in SECRETS.items():
        text = text.replace(f'{key.rpartition(" ")[2]} = "***"', f'{key.rpartition(" ")[2]} = "{secret}"', 1)
    restored = tmp_path / "restored.toml"
    restored.write_text(text)
    again = cli("check-config", str(restored))
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed.stdout
    assert load(restored, environ={}) == load(original, environ={})

    with ProxyProcess({}, tmp_path, ["--config", str(restored)]) as proxy:  # serve --config takes it
        assert httpx.get(proxy.url + "/healthz", trust_env=False).status_code == 200


SHIPPED = {
    "deploy/config.example.toml": lambda: (ROOT / "deploy" / "config.example.toml").read_text(),
    "deploy/docker/config.toml": lambda: (ROOT / "deploy" / "docker" / "config.toml").read_text(),
    "the Kubernetes ConfigMap": lambda: __import__("yaml").safe_load_all(
        (ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text()).__next__()["data"]["config.toml"],
}


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_configs_validate_and_round_trip(name, tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(SHIPPED[name]())
    first = cli("check-config", str(path))
    assert first.returncode == 0, first.stderr
    path.write_text(first.stdout)
    second = cli("check-config", str(path))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_a_redis_password_is_masked_and_the_mask_is_refused(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[shared]\nredis_url = "redis://edge:hunter2@127.0.0.1:6379/0"\n' + ARCHIVE)
    printed = cli("check-config", str(path))
    assert printed.returncode == 0, printed.stderr
    assert "hunter2" not in printed.stdout
    assert tomllib.loads(printed.stdout)["shared"]["redis_url"] == "redis://edge:***@127.0.0.1:6379/0"
    path.write_text(printed.stdout)
    refused = cli("check-config", str(path))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{path}, [shared] redis_url: expected the secret itself, given" in refused.stderr
