"""CNI results (a plugin's stdout), error objects and configuration files: parsed or refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain.network import choice, cni, cni_result
from tests.fuzz.properties import Refused, domain_errors_only, value_errors_only
from tests.fuzz.strategies import deep_texts, dumps, json_values, mutate_document, wire_text

RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cnit0", "mac": "02:0d:89:0d:34:38"},
                   {"name": "eth0", "mac": "0E:2A:D7:75:FF:58", "sandbox": "/run/netns/pvpod1"}],
    "ips": [{"interface": 1, "address": "10.77.3.2/24", "gateway": "10.77.3.1"},
            {"version": "6", "interface": 1, "address": "fd00::3/64", "gateway": "fd00::1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.77.3.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.0.0.10"], "domain": "cluster.local", "search": ["a"], "options": ["ndots:5"]},
}
ERROR: dict[str, Any] = {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "more"}
CONFLIST: dict[str, Any] = {
    "cniVersion": "1.0.0", "name": "podnet",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
                {"type": "portmap", "capabilities": {"portMappings": True}}],
}
TEXTS = st.one_of(json_values.map(dumps), deep_texts, st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@given(st.one_of(mutate_document(RESULT).map(dumps), TEXTS))
@example("[" * 100_000)
def test_results_parse_or_value_error(text: str) -> None:
    result = value_errors_only(cni_result.parse_result, text.encode("utf-8", "surrogatepass"))
    if isinstance(result, Refused):
        return
    for iface in result.interfaces:
        result.ips_for(iface.name)
        result.sandbox_interface(iface.name)
    assert cni_result.parse_result(json.loads(dumps(RESULT))) == cni_result.parse_result(dumps(RESULT))


@given(st.one_of(mutate_document(ERROR).map(dumps), TEXTS))
@example("[" * 100_000)
def test_error_objects_never_raise(text: str) -> None:
    cni_result.parse_error(text.encode("utf-8", "surrogatepass"))


@given(st.one_of(mutate_document(CONFLIST).map(dumps), TEXTS))
@example("[" * 100_000)
def test_configs_load_or_value_error(text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    loaded = value_errors_only(cni.load_config, raw)
    if isinstance(loaded, Refused):
        return
    doc, summary = loaded
    assert summary == cni.parse(raw)
    domain_errors_only(cni.normalize_config, doc)


@given(st.lists(st.one_of(mutate_document(CONFLIST).map(dumps), TEXTS, st.none()), max_size=3),
       st.frozensets(st.sampled_from(["bridge", "portmap", "host-local", "loopback"])))
@example(["[" * 100_000], frozenset({"bridge"}))
def test_choice_never_raises(files: list[str | None], plugins: frozenset[str]) -> None:
    settings = choice.NetworkSettings(enabled=True, conf_dirs=(Path("/etc/cni/net.d"),), bin_dirs=(),
                                      builtin_bridge="pv0", builtin_subnet="10.99.0.0/16")
    facts = choice.CNIFacts(
        files=tuple(choice.ConfigFile(Path(f"/etc/cni/net.d/{i}.conflist"),
                                      None if f is None else f.encode("utf-8", "surrogatepass"), "unreadable")
                    for i, f in enumerate(files)),
        plugins=plugins)
    chosen = choice.choose(settings, facts)
    assert chosen.conflist is not None


@given(wire_text, wire_text, wire_text, wire_text, wire_text)
def test_attachments_validate_and_round_trip(cid: str, ifname: str, name: str, ns: str, uid: str) -> None:
    att = cni.Attachment(container_id=cid, netns=Path("/run/netns/x"), ifname=ifname or "eth0",
                         pod_name=name, pod_namespace=ns, pod_uid=uid)
    if isinstance(domain_errors_only(att.validate), Refused):
        return
    assert cni.Attachment.from_json(json.loads(json.dumps(att.to_json()))) == att
    assert att.cni_args().count(";") == 4
