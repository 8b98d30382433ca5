"""`systemd-analyze verify` of the shipped unit (systemd/podvisor-agent.service).

The unit names /usr/local/bin/podvisor-agent and orders itself after
libvirtd.service, which a test machine need not have installed: the file is
verified as it is, inside a scratch root (``--root``) that holds the host's
own system units, a stand-in for each unit or binary it needs that the host
lacks, and the real file under etc/systemd/system.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "podvisor-agent.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _scratch_root(tmp_path: Path, unit_text: str) -> Path:
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    (etc / UNIT.name).write_text(unit_text)
    exec_start = re.search(r"^ExecStart=(\S+)", unit_text, re.M)
    assert exec_start, "the unit has no ExecStart="
    # The agent's binary is a stand-in; any other command an Exec*= line runs
    # (ExecReload's kill) is the host's own, so a missing one is a finding.
    for command in re.findall(r"^Exec\w*=[-@:+!]*(\S+)", unit_text, re.M):
        binary = root / command.lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        if command == exec_start.group(1):
            binary.write_text("#!/bin/sh\nexit 0\n")
            binary.chmod(0o755)
        elif Path(command).exists():
            shutil.copy2(command, binary)
    for line in re.findall(r"^(?:Requires|After|Before|Wants)=(.*)$", unit_text, re.M):
        for name in line.split():
            if not (root / "usr/lib/systemd/system" / name).exists() and not (etc / name).exists():
                (etc / name).write_text(f"[Unit]\nDescription=stand-in for {name}\n"
                                        + ("[Service]\nExecStart=/bin/true\n" if name.endswith(".service") else ""))
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run scripts/install-deps.sh --test (Debian package systemd)"
    return subprocess.run([tool, "verify", f"--root={root}", UNIT.name], capture_output=True, text=True,
                          timeout=120)


def test_the_shipped_unit_verifies_clean(tmp_path: Path) -> None:
    done = _verify(_scratch_root(tmp_path, UNIT.read_text()))
    # verify exits 0 on warnings such as an unparsable value it ignores: any output is a finding.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        f"rc={done.returncode}\n{done.stdout}\n{done.stderr}")


def test_the_unit_asks_for_a_watchdog_and_notify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    watchdog = re.fullmatch(r"(\d+)s", settings["WatchdogSec"])
    assert watchdog and int(watchdog.group(1)) >= 10, settings["WatchdogSec"]
    assert settings["Restart"] in ("on-failure", "always")  # a watchdog timeout restarts it
    assert settings["KillMode"] == "process"


@pytest.mark.parametrize("broken", ["WatchdogSec=soon", "KillMode=everything"])
def test_verify_reports_a_broken_setting(tmp_path: Path, broken: str) -> None:
    """The check can fail: a setting systemd cannot parse is reported."""
    key, value = broken.split("=", 1)
    text = re.sub(rf"^{key}=.*$", broken, UNIT.read_text(), flags=re.M)
    done = _verify(_scratch_root(tmp_path, text))
    assert value in done.stdout + done.stderr, f"rc={done.returncode}\n{done.stdout}\n{done.stderr}"
