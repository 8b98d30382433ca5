"""podvisorctl's streaming client: the pure parts (status → exit code, URLs,
port arguments). The sessions themselves are tested against the agent's real
streaming server in tests/integration/test_podvisorctl_streams.py."""

from __future__ import annotations

import argparse
import json

import pytest

from agent.cli.main import _port_pair, build_parser
from agent.cli.streams import StreamError, exit_code_of, ws_url


def test_success_is_exit_code_zero() -> None:
    assert exit_code_of(json.dumps({"metadata": {}, "status": "Success"}).encode()) == (0, "")


def test_non_zero_exit_code_is_read_from_the_causes() -> None:
    status = {"metadata": {}, "status": "Failure", "message": "command terminated with non-zero exit code: 7",
              "reason": "NonZeroExitCode",
              "details": {"causes": [{"reason": "ExitCode", "message": "7"}]}}
    assert exit_code_of(json.dumps(status).encode()) == (7, status["message"])


def test_another_failure_is_one_with_its_message() -> None:
    status = {"status": "Failure", "message": "the guest agent does not answer"}
    assert exit_code_of(json.dumps(status).encode()) == (1, "the guest agent does not answer")


def test_plain_text_error_of_an_old_protocol_is_a_failure() -> None:
    assert exit_code_of(b"error executing command\n") == (1, "error executing command")


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:4242/exec/AbCd1234", "ws://127.0.0.1:4242/exec/AbCd1234"),
    ("https://[::1]:9/attach/x_-y", "wss://[::1]:9/attach/x_-y"),
])
def test_streaming_urls_become_websocket_urls(url: str, expected: str) -> None:
    assert ws_url(url) == expected


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(StreamError, match="unknown scheme"):
        ws_url("ftp://host/exec/x")


@pytest.mark.parametrize(("text", "pair"), [("80", (80, 80)), ("8080:80", (8080, 80)), ("0:22", (0, 22)),
                                            (":22", (0, 22))])
def test_port_pairs(text: str, pair: tuple[int, int]) -> None:
    assert _port_pair(text) == pair


@pytest.mark.parametrize("text", ["0", "70000", "a:80", "80:b", "-1:80"])
def test_bad_port_pairs_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _port_pair(text)


def test_exec_takes_the_command_after_the_double_dash() -> None:
    args = build_parser().parse_args(["exec", "-it", "web", "--", "sh", "-c", "ls -l"])
    assert (args.stdin, args.tty, args.pod, args.cmd) == (True, True, "web", ["sh", "-c", "ls -l"])
