"""deploy/: the systemd unit passes `systemd-analyze verify`, runs `wicore serve` with a config
file, restarts on failure, and gives the SIGTERM drain time to finish; the example config
loads; the README shows install, start and logs."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from wicore_cpp.config import Config, load_config

UNIT = ROOT / "deploy" / "wicore-engine.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "config.json"
WORKER_STOP_S = 5  # Scheduler.stop's grace for the workers after the drain


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); "
                    "`make test` installs it where it may")
    # verify also checks that ExecStart's program exists: point it at this checkout's
    # `wicore` instead of /opt/wicore's, and change nothing else.
    wicore = Path(sys.executable).parent / "wicore"
    text = UNIT.read_text().replace("/opt/wicore/.venv/bin/wicore", str(wicore))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60)
    # verify exits 0 even for a directive it ignores; any line about the unit is a problem.
    assert out.returncode == 0, out.stderr
    problems = [line for line in (out.stdout + out.stderr).splitlines() if UNIT.name in line]
    assert not problems, problems


def test_unit_serves_with_a_config_file_restarts_and_drains():
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/wicore") and command[1] == "serve"
    assert command[command.index("--config") + 1].endswith(".json")
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # bad configuration: do not loop
    # SIGTERM reaches the server alone, which drains and then stops its workers itself;
    # systemd kills nothing before the drain and the workers' stop had their time.
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert service["KillMode"] == "mixed"
    grace = Config().shutdown_grace_s
    assert float(service["TimeoutStopSec"]) > grace + WORKER_STOP_S
    assert service["Environment"].startswith("WICORE_DATA_DIR=/var/lib/")
    assert service["StateDirectory"] == "wicore"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_example_config_loads_and_uses_the_documents_logging_section():
    config = load_config(EXAMPLE_CONFIG, environ={})
    assert config.log_requests and config.log_performance
    assert '"logging"' in EXAMPLE_CONFIG.read_text()


def test_readme_shows_install_start_and_logs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running it as a service", 1)[1].split("\n## ", 1)[0]
    for needed in ("deploy/wicore-engine.service", "/etc/systemd/system/",
                   "systemctl daemon-reload", "systemctl enable --now wicore-engine",
                   "journalctl -u wicore-engine -f", "/etc/wicore/config.json"):
        assert needed in section, needed
