"""Exec end to end on the stock Debian 12 guest under TCG: the real agent's
CRI Exec gives a URL, and real clients use it: the Go client (SPDY, as
client-go; every remotecommand version the server offers), the
``kubernetes`` Python client's WebSocket stream client and podvisorctl
(subprocesses on the agent's socket). Behind the URL: the guest's sshd over
the pod network (agent/services/exec.py).

One Debian VM pod for the module (tests/e2e/conftest.py ``debian_vm``).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import DebianVM
from tests.e2e.streamclients import (
    Proc,
    build_kubeclient,
    ctl,
    outcome,
    ws_client,
    ws_finish,
    ws_read_until,
)

# The first test also waits for the image push and the VM boot (minutes under a loaded TCG host).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
POD_NAME, NAMESPACE = "debian-vm", "e2e"  # DebianVMSpec's hostname is the pod's name
V1, V2, V3, V4 = "channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io", "v4.channel.k8s.io"


@pytest.fixture(scope="module")
def kubeclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_kubeclient(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="module")
def vm(debian_vm: DebianVM) -> DebianVM:
    """The module's VM once a command runs in it over the streaming path
    (sshd comes up around cloud-init's end)."""
    r = debian_vm.vma.agent.runtime.ExecSync(
        pb.ExecSyncRequest(container_id=debian_vm.vm.container_id, cmd=["true"], timeout=600), timeout=660)
    assert r.exit_code == 0, r
    return debian_vm


def exec_url(v: DebianVM, cmd: list[str], *, stdin: bool = False, tty: bool = False) -> str:
    return str(v.vma.agent.runtime.Exec(pb.ExecRequest(
        container_id=v.vm.container_id, cmd=cmd, stdin=stdin, tty=tty, stdout=True, stderr=not tty),
        timeout=30).url)


def go_exec(kubeclient: Path, url: str, result: Path, *args: str,
            stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([str(kubeclient), "exec", "-url", url, "-result", str(result), *args], input=stdin,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


# -- the Go client (SPDY) ------------------------------------------------------------


def test_exec_stdout_stderr_and_exit_codes(vm: DebianVM, kubeclient: Path, tmp_path: Path) -> None:
    result = tmp_path / "result"
    done = go_exec(kubeclient, exec_url(vm, ["sh", "-c", "echo to-out; echo to-err >&2"]), result)
    assert (done.stdout, done.stderr) == (b"to-out\n", b"to-err\n")
    assert outcome(result) == {"protocol": V4, "exit": "0"}
    done = go_exec(kubeclient, exec_url(vm, ["sh", "-c", "printf 'a b'; echo bad >&2; exit 7"]), result)
    assert (done.stdout, done.stderr) == (b"a b", b"bad\n")
    assert outcome(result) == {"protocol": V4, "exit": "7"}


def test_exec_of_a_missing_program(vm: DebianVM, kubeclient: Path, tmp_path: Path) -> None:
    result = tmp_path / "result"
    done = go_exec(kubeclient, exec_url(vm, ["/no/such/program"]), result)
    assert outcome(result)["exit"] == "127"
    assert b"/no/such/program" in done.stderr


@pytest.mark.parametrize("protocol", [V4, V3, V2, V1])
def test_exec_with_each_protocol_version(vm: DebianVM, kubeclient: Path, tmp_path: Path, protocol: str) -> None:
    result = tmp_path / "result"
    done = go_exec(kubeclient, exec_url(vm, ["echo", f"hello {protocol}"]), result, "-protocols", protocol)
    assert done.stdout == f"hello {protocol}\n".encode()
    assert outcome(result) == {"protocol": protocol, "exit": "0"}
    done = go_exec(kubeclient, exec_url(vm, ["sh", "-c", "exit 3"]), result, "-protocols", protocol)
    if protocol == V4:
        assert outcome(result) == {"protocol": protocol, "exit": "3"}
    else:  # before v4 the error stream carries text, which client-go gives as an error
        assert outcome(result) == {"protocol": protocol, "exit": "-1",
                                   "error": "command terminated with non-zero exit code: exit status 3"}


def test_exec_with_stdin(vm: DebianVM, kubeclient: Path, tmp_path: Path) -> None:
    result = tmp_path / "result"
    done = go_exec(kubeclient, exec_url(vm, ["sh", "-c", "cat; echo cat-ended >&2"], stdin=True), result,
                   "-stdin", stdin=b"line one\nline two\n")
    assert (done.stdout, done.stderr) == (b"line one\nline two\n", b"cat-ended\n")
    assert outcome(result) == {"protocol": V4, "exit": "0"}


def test_exec_tty_interactive_shell_with_resizes(vm: DebianVM, kubeclient: Path, tmp_path: Path) -> None:
    result = tmp_path / "result"
    url = exec_url(vm, ["/bin/bash", "-i"], stdin=True, tty=True)
    client = Proc([str(kubeclient), "exec", "-url", url, "-stdin", "-tty", "-stderr=false",
                   "-size", "111x33", "-size2", "132x44", "-result", str(result)])
    try:
        # the first size goes with the session's start; the shell asks after a moment
        client.type("sleep 2; stty size; echo answer-$((6*7)); tty\n")
        out = client.wait_for("answer-42", timeout=120)
        client.wait_for("/dev/pts/", timeout=60)
        assert "33 111" in out, out
        client.proc.send_signal(signal.SIGUSR1)  # the client sends its second size
        for _ in range(30):
            client.type("stty size\n")
            try:
                client.wait_for("44 132", timeout=2)
                break
            except AssertionError:
                continue
        client.wait_for("44 132", timeout=5)
        client.type("exit 5\n")
        rc, out, err = client.finish()
        assert rc == 0, err
        assert outcome(result) == {"protocol": V4, "exit": "5"}
    finally:
        client.stop()


def test_five_execs_at_once(vm: DebianVM, kubeclient: Path, tmp_path: Path) -> None:
    urls = [exec_url(vm, ["sh", "-c", f"sleep 3; echo exec-{i}; exit {i}"]) for i in range(5)]
    done: list[tuple[bytes, dict[str, str]] | BaseException] = [ValueError("not run")] * 5

    def run(i: int) -> None:
        try:
            r = go_exec(kubeclient, urls[i], tmp_path / f"result-{i}")
            done[i] = (r.stdout, outcome(tmp_path / f"result-{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            done[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert done == [(f"exec-{i}\n".encode(), {"protocol": V4, "exit": str(i)}) for i in range(5)]


# -- the kubernetes Python client (WebSocket) ------------------------------------------


def test_exec_over_websocket(vm: DebianVM) -> None:
    ws = ws_client(exec_url(vm, ["sh", "-c", "echo to-out; echo to-err >&2; exit 6"]))
    ws_finish(ws)
    assert (ws.read_stdout(timeout=0), ws.read_stderr(timeout=0)) == ("to-out\n", "to-err\n")
    assert ws.returncode == 6
    ws = ws_client(exec_url(vm, ["echo", "fine"]))
    ws_finish(ws)
    assert (ws.read_stdout(timeout=0), ws.returncode) == ("fine\n", 0)


def test_exec_stdin_over_websocket(vm: DebianVM) -> None:
    ws = ws_client(exec_url(vm, ["sh", "-c", "cat; echo cat-ended >&2"], stdin=True))
    assert ws.subprotocol == "v5.channel.k8s.io"
    ws.write_stdin("line one\nline two\n")
    ws.close_channel(0)
    ws_finish(ws)
    assert (ws.read_stdout(timeout=0), ws.read_stderr(timeout=0)) == ("line one\nline two\n", "cat-ended\n")
    assert ws.returncode == 0


def test_exec_tty_over_websocket(vm: DebianVM) -> None:
    import json

    ws = ws_client(exec_url(vm, ["/bin/bash", "-i"], stdin=True, tty=True))
    try:
        ws.write_channel(4, json.dumps({"Width": 100, "Height": 30}))
        ws.write_stdin("sleep 2; stty size; echo ws-$((6*7))\n")
        out = ws_read_until(ws, "ws-42\r\n")
        assert "30 100" in out, out
        ws.write_stdin("exit 4\n")
        ws_finish(ws)
        assert ws.returncode == 4
    finally:
        ws.close()


# -- podvisorctl -------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["name", "id-prefix"])
def test_podvisorctl_exec(vm: DebianVM, by: str) -> None:
    ref = POD_NAME if by == "name" else vm.vm.sandbox_id[:12]
    sock = vm.vma.agent.socket
    r = ctl(sock, "exec", "-n", NAMESPACE, ref, "--", "sh", "-c", "echo out-$((1+1)); echo err >&2; exit 9")
    # as kubectl, it says why it exits non-zero, after the command's own stderr
    assert (r.returncode, r.stdout, r.stderr) == (
        9, b"out-2\n", b"err\npodvisorctl: command terminated with non-zero exit code: exit status 9\n")
    r = ctl(sock, "exec", "-n", NAMESPACE, ref, "--", "hostname")
    assert (r.returncode, r.stdout) == (0, b"debian-vm\n"), r.stderr
    r = ctl(sock, "exec", "-i", "-n", NAMESPACE, ref, "--", "cat", stdin=b"piped in\nand more\n")
    assert (r.returncode, r.stdout) == (0, b"piped in\nand more\n"), r.stderr


def test_podvisorctl_exec_unknown_pod(vm: DebianVM) -> None:
    r = ctl(vm.vma.agent.socket, "exec", "-n", NAMESPACE, "no-such-pod", "--", "true")
    assert r.returncode == 1
    assert r.stderr.decode().startswith("podvisorctl: no pod 'no-such-pod' in namespace 'e2e'"), r.stderr

