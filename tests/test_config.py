"""Configuration: file < environment < flags, with clear errors."""

import subprocess
import sys

import pytest

from proxy.config import ConfigError, load
from proxy.runtime import check_settings

TOML = """
[server]
port = 9000
public_url = "https://imaging.example.org/"

[cache]
dir = "/tmp/c"

[[archives]]
name = "pacs"
url = "http://127.0.0.1:8042/dicom-web/"
profile = "orthanc"
timeouts = { connect = 2, first_byte = 10, idle_read = 5 }
"""


def test_file_env_and_flags_merge(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(TOML)
    s = load(f, environ={})
    assert (s.port, s.cache_dir, s.public_url) == (9000, "/tmp/c", "https://imaging.example.org")
    assert s.archives[0].url == "http://127.0.0.1:8042/dicom-web" and s.archives[0].timeouts.first_byte == 10
    s = load(f, environ={"DICOMWEB_EDGE_PORT": "9100", "DICOMWEB_EDGE_WORKERS": "3"})
    assert (s.port, s.workers) == (9100, 3)
    s = load(f, {"port": 9200}, environ={"DICOMWEB_EDGE_PORT": "9100"})
    assert s.port == 9200


@pytest.mark.parametrize("text,needle", [
    ("[[archives]]\nname='a'\nurl='ftp://x'\n", r"absolute http\(s\)"),
    ("[[archives]]\nname='a'\nurl='http://x'\nprofile='nope'\n", "profile"),
    ("[[archives]]\nname='a'\nurl='http://x'\n[[archives]]\nname='a'\nurl='http://y'\n", "used twice"),
    ("[server]\nport=70000\n[[archives]]\nname='a'\nurl='http://x'\n", "expected an integer from 1 to 65535"),
    ("[server]\nbogus=1\n[[archives]]\nname='a'\nurl='http://x'\n", r"not a key of \[server\]"),
    ("[server]\nport=1\n", "no archives"),
    ("not toml [", "not valid TOML"),
    ("[cache]\nwarm_bytes=-1\n[[archives]]\nname='a'\nurl='http://x'\n",
     r"\[cache\] warm_bytes: expected a whole number of bytes from 0 to 1073741824, given -1"),
])
def test_errors_are_clear(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        check_settings(load(f, environ={}))


def test_check_config_command(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(TOML)
    ok = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(f)], capture_output=True, text=True)
    assert ok.returncode == 0 and 'url = "http://127.0.0.1:8042/dicom-web"' in ok.stdout
    f.write_text("[[archives]]\nname='a'\n")
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(f)], capture_output=True, text=True)
    assert bad.returncode == 2 and '[[archives]] #1 ("a") url: missing; expected a string' in bad.stderr


def test_the_documented_example_config_is_valid():
    """deploy/config.example.toml documents every setting; it must load as written."""
    import dataclasses

    from proxy.config import ArchiveConfig, Settings

    path = __import__("pathlib").Path(__file__).parent.parent / "deploy" / "config.example.toml"
    s = load(path, environ={})
    assert s.archives[0].name == "pacs"
    text = path.read_text()
    renamed = {"cache_size_bytes": "size_bytes", "memory_cache_bytes": "memory_bytes",
               "memory_warm_bytes": "warm_bytes",
               **{f"egress_{key}": key for key in ("proxy", "proxy_username", "proxy_password", "proxy_password_file",
                                                   "proxy_password_env", "ca_file")}}
    documented = {renamed.get(f.name, f.name) for f in dataclasses.fields(Settings)}
    documented -= {"archives", "cache_dir", "public_url", "viewer_dir"}  # commented out: off by default
    documented -= {"proxy_password", "proxy_password_env"}  # [egress]: one of three ways, in one comment line
    documented = {name.removeprefix("egress_") for name in documented}
    from proxy.auth.inbound import KEYS as AUTH_KEYS

    documented = (documented - {"auth"}) | AUTH_KEYS  # the [auth] table: each of its keys is documented
    assert "\n[auth]\n" in text
    assert "[viewer]\n# dir = " in text
    documented |= {f.name for f in dataclasses.fields(ArchiveConfig)}
    missing = [name for name in documented if f"{name} =" not in text]
    assert not missing, f"settings missing from the example config: {missing}"


def test_optimisations_are_switched_off_by_name(tmp_path):
    """`[server] disable` and DICOMWEB_EDGE_DISABLE name optimisations to switch off; a misspelt name is
    refused at start-up rather than silently leaving the optimisation on."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ndisable = ["splice"]\n[[archives]]\nname = "a"\nurl = "http://127.0.0.1:1/x"\n')
    assert load(cfg, environ={}).disable == ["splice"]
    assert load(cfg, environ={"DICOMWEB_EDGE_DISABLE": "hit_lane, claims"}).disable == ["hit_lane", "claims"]
    with pytest.raises(ConfigError, match="splise"):
        load(cfg, environ={"DICOMWEB_EDGE_DISABLE": "splise"})
