"""The CRI ImageService of the real agent against a real docker-registry."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.adapters.registry import RegistryClient
from agent.adapters.registry.credentials import RegistryCredentials
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain import oci
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry, containerdisk_layer, push_image


@pytest.fixture
def client() -> Any:
    with RegistryClient(timeout=30) as c:
        yield c


def qcow2_bytes(tmp: Path, size: str = "16M", backing: str | None = None) -> bytes:
    path = tmp / f"{uuid.uuid4().hex}.qcow2"
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "raw"]
    subprocess.run([*cmd, str(path), size], check=True, timeout=60)
    data = path.read_bytes()
    path.unlink()
    return data


def raw_disk(size: int = 1 << 20) -> bytes:
    return os.urandom(size)


def push(client: RegistryClient, registry: RunningRegistry, files: dict[str, bytes],
         tag: str = "v1", layers: list[bytes] | None = None) -> tuple[str, Any]:
    name = f"podvisor-test/{uuid.uuid4().hex[:12]}"
    pushed = push_image(client, registry.repository(name), tag,
                        layers if layers is not None else [containerdisk_layer(files)])
    return f"{registry.host}/{name}", pushed


def pull(agent: AgentProcess, image: str, auth: pb.AuthConfig | None = None) -> str:
    req = pb.PullImageRequest(image=pb.ImageSpec(image=image))
    if auth is not None:
        req.auth.CopyFrom(auth)
    return str(agent.images.PullImage(req, timeout=120).image_ref)


def status(agent: AgentProcess, image: str, verbose: bool = False) -> Any:
    return agent.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image),
                                                          verbose=verbose), timeout=10)


def listed(agent: AgentProcess) -> list[Any]:
    return list(agent.images.ListImages(pb.ListImagesRequest(), timeout=10).images)


def blob_fetches(agent: AgentProcess, digest: str) -> int:
    return sum(1 for line in agent.log().splitlines()
               if "registry.blob_fetched" in line and digest in line)


def rpc_error(fn: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(request, timeout=120)
    return err.value


def stored_files(agent: AgentProcess) -> list[str]:
    root = agent.state_dir / "images"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_pull_by_tag_and_digest(running_agent: AgentProcess, registry: RunningRegistry,
                                client: RegistryClient, tmp_path: Path) -> None:
    disk = qcow2_bytes(tmp_path)
    name, pushed = push(client, registry, {"disk/disk.qcow2": disk})
    image_id = pull(running_agent, f"{name}:v1")
    assert image_id == oci.sha256_digest(pushed.config)

    by_digest = pull(running_agent, f"{name}@{pushed.digest}")
    assert by_digest == image_id
    images = listed(running_agent)
    assert len(images) == 1
    img = images[0]
    assert list(img.repo_tags) == [f"{name}:v1"]
    assert list(img.repo_digests) == [f"{name}@{pushed.digest}"]
    assert img.size == len(pushed.config) + sum(len(layer) for layer in pushed.layers)

    st = status(running_agent, f"{name}:v1", verbose=True)
    assert st.image.id == image_id
    info = json.loads(st.info["info"])
    assert info["containerDisk"] is True
    (disk_info,) = info["disks"]
    assert disk_info["format"] == "qcow2" and disk_info["virtualSize"] == 16 << 20
    base = Path(disk_info["hostPath"])
    assert base.read_bytes() == disk
    assert base.stat().st_mode & 0o777 == 0o640  # root:kvm, never world-readable
    # The same image by id, by short id and by digest reference.
    assert status(running_agent, image_id).image.id == image_id
    assert status(running_agent, image_id[7:]).image.id == image_id
    assert status(running_agent, f"{name}@{pushed.digest}").image.id == image_id


def test_unknown_image_status_is_empty_not_an_error(running_agent: AgentProcess) -> None:
    st = status(running_agent, "127.0.0.1:1/nothing/here:v9")
    assert not st.HasField("image")
    err = rpc_error(running_agent.images.PullImage,
                    pb.PullImageRequest(image=pb.ImageSpec(image="Not A Reference!")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.image" in (err.details() or "")
    err = rpc_error(running_agent.images.PullImage, pb.PullImageRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_warm_pull_downloads_nothing(running_agent: AgentProcess, registry: RunningRegistry,
                                     client: RegistryClient) -> None:
    name, pushed = push(client, registry, {"disk/disk.img": raw_disk()})
    layer = oci.sha256_digest(pushed.layers[0])
    pull(running_agent, f"{name}:v1")
    assert blob_fetches(running_agent, layer) == 1
    pull(running_agent, f"{name}:v1")
    pull(running_agent, f"{name}@{pushed.digest}")
    assert blob_fetches(running_agent, layer) == 1


def test_ten_concurrent_pulls_share_one_download(running_agent: AgentProcess,
                                                 registry: RunningRegistry,
                                                 client: RegistryClient) -> None:
    name, pushed = push(client, registry, {"disk/disk.img": raw_disk(8 << 20)})
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(pull(running_agent, f"{name}:v1"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(set(results)) == 1 and len(results) == 10
    assert blob_fetches(running_agent, oci.sha256_digest(pushed.layers[0])) == 1
    assert len(listed(running_agent)) == 1


def test_multi_arch_index_picks_linux_amd64(running_agent: AgentProcess, registry: RunningRegistry,
                                            client: RegistryClient) -> None:
    name = f"podvisor-test/{uuid.uuid4().hex[:12]}"
    repo = registry.repository(name)
    arm = push_image(client, repo, None, [containerdisk_layer({"disk/arm.img": raw_disk()})],
                     architecture="arm64")
    amd = push_image(client, repo, None, [containerdisk_layer({"disk/amd.img": raw_disk()})],
                     architecture="amd64")

    def entry(p: Any, arch: str) -> oci.Descriptor:
        return oci.Descriptor(p.media_type, p.digest, len(p.manifest), platform=oci.Platform("linux", arch))

    index = oci.encode_index(oci.ImageIndex(oci.OCI_INDEX, (entry(arm, "arm64"), entry(amd, "amd64"))))
    index_digest = client.push_manifest(repo, "multi", index, oci.OCI_INDEX)
    image_id = pull(running_agent, f"{registry.host}/{name}:multi")
    assert image_id == oci.sha256_digest(amd.config)
    st = status(running_agent, image_id, verbose=True)
    assert list(st.image.repo_digests) == [f"{registry.host}/{name}@{index_digest}"]
    assert json.loads(st.info["info"])["disks"][0]["pathInImage"] == "/disk/amd.img"


def test_basic_auth(agent_factory: Any, auth_registry: RunningRegistry, tmp_path: Path) -> None:
    agent = agent_factory().start()
    user, password = next(iter(auth_registry.users.items()))
    with RegistryClient(credentials=lambda _r: RegistryCredentials(user, password), timeout=30) as c:
        name, pushed = push(c, auth_registry, {"disk/disk.img": raw_disk()})
    err = rpc_error(agent.images.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=f"{name}:v1")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth_registry.host in (err.details() or "")
    wrong = pb.AuthConfig(username=user, password="wrong-" + password)
    err = rpc_error(agent.images.PullImage,
                    pb.PullImageRequest(image=pb.ImageSpec(image=f"{name}:v1"), auth=wrong))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth_registry.host in (err.details() or "")
    assert listed(agent) == []
    image_id = pull(agent, f"{name}:v1", pb.AuthConfig(username=user, password=password))
    assert image_id == oci.sha256_digest(pushed.config)


def test_bearer_token_auth(agent_factory: Any, token_registry: RunningRegistry) -> None:
    agent = agent_factory().start()
    user, password = next(iter(token_registry.users.items()))
    with RegistryClient(credentials=lambda _r: RegistryCredentials(user, password), timeout=30) as c:
        name, pushed = push(c, token_registry, {"disk/disk.img": raw_disk()})
    err = rpc_error(agent.images.PullImage, pb.PullImageRequest(
        image=pb.ImageSpec(image=f"{name}:v1"), auth=pb.AuthConfig(username=user, password="nope")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert pull(agent, f"{name}:v1", pb.AuthConfig(username=user, password=password)) == \
        oci.sha256_digest(pushed.config)


def test_corrupted_blob_is_refused_and_nothing_stored(running_agent: AgentProcess,
                                                      registry: RunningRegistry,
                                                      client: RegistryClient) -> None:
    name, pushed = push(client, registry, {"disk/disk.img": raw_disk()})
    layer_digest = oci.sha256_digest(pushed.layers[0])
    data_path = registry.blob_data_path(layer_digest)
    original = data_path.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    data_path.write_bytes(bytes(tampered))
    try:
        err = rpc_error(running_agent.images.PullImage,
                        pb.PullImageRequest(image=pb.ImageSpec(image=f"{name}:v1")))
    finally:
        data_path.write_bytes(original)
    assert err.code() != grpc.StatusCode.OK
    assert layer_digest in (err.details() or "") or "digest" in (err.details() or "")
    assert listed(running_agent) == []
    assert not any(layer_digest[7:] in f for f in stored_files(running_agent))
    assert not any("tmp/" in f or f.endswith(".partial") for f in stored_files(running_agent))


def test_qcow2_with_host_backing_file_is_refused(running_agent: AgentProcess,
                                                 registry: RunningRegistry,
                                                 client: RegistryClient, tmp_path: Path) -> None:
    evil = qcow2_bytes(tmp_path, backing="/etc/shadow")
    name, _ = push(client, registry, {"disk/disk.qcow2": evil})
    err = rpc_error(running_agent.images.PullImage,
                    pb.PullImageRequest(image=pb.ImageSpec(image=f"{name}:v1")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "backing file" in (err.details() or "") and "/etc/shadow" in (err.details() or "")
    assert listed(running_agent) == []
    assert not list((running_agent.state_dir / "images" / "disks").iterdir())


def test_tar_escaping_the_root_is_refused(running_agent: AgentProcess, registry: RunningRegistry,
                                          client: RegistryClient) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for entry_name, payload in (("disk/disk.img", raw_disk()), ("../../etc/evil", b"owned")):
            info = tarfile.TarInfo(entry_name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    name, _ = push(client, registry, {}, layers=[gzip.compress(raw.getvalue(), mtime=0)])
    err = rpc_error(running_agent.images.PullImage,
                    pb.PullImageRequest(image=pb.ImageSpec(image=f"{name}:v1")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "../../etc/evil" in (err.details() or "")
    assert listed(running_agent) == []
    assert not Path("/etc/evil").exists()


def test_image_without_a_disk_pulls_fine_one_with_two_is_refused(running_agent: AgentProcess,
                                                                  registry: RunningRegistry,
                                                                  client: RegistryClient) -> None:
    plain, _ = push(client, registry, {"etc/motd": b"hello\n"})
    image_id = pull(running_agent, f"{plain}:v1")
    info = json.loads(status(running_agent, image_id, verbose=True).info["info"])
    assert info["containerDisk"] is False
    assert "no file under /disk/" in info["diskProblem"]

    two, _ = push(client, registry, {"disk/a.img": raw_disk(), "disk/b.img": raw_disk()})
    err = rpc_error(running_agent.images.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=f"{two}:v1")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "makes a second entry under /disk/ (/disk/a.img, /disk/b.img)" in (err.details() or "")
    assert [i.id for i in listed(running_agent)] == [image_id]


def test_layers_and_whiteouts(running_agent: AgentProcess, registry: RunningRegistry,
                              client: RegistryClient) -> None:
    old, new = raw_disk(), raw_disk()
    lower = containerdisk_layer({"disk/old.img": old})
    upper = containerdisk_layer({"disk/.wh.old.img": b"", "disk/new.img": new})
    name, _ = push(client, registry, {}, layers=[lower, upper])
    image_id = pull(running_agent, f"{name}:v1")
    info = json.loads(status(running_agent, image_id, verbose=True).info["info"])
    (disk,) = info["disks"]
    assert disk["pathInImage"] == "/disk/new.img" and disk["format"] == "raw"
    assert Path(disk["hostPath"]).read_bytes() == new


def test_remove_image_by_tag_id_and_digest(running_agent: AgentProcess, registry: RunningRegistry,
                                           client: RegistryClient) -> None:
    refs = []
    for _ in range(3):
        name, pushed = push(client, registry, {"disk/disk.img": raw_disk()})
        pull(running_agent, f"{name}:v1")
        refs.append((name, pushed))
    before = set(stored_files(running_agent))
    fs_before = running_agent.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10)
    assert fs_before.image_filesystems[0].used_bytes.value > 3 << 20

    (n0, p0), (n1, p1), (n2, p2) = refs
    for text in (f"{n0}:v1", oci.sha256_digest(p1.config), f"{n2}@{p2.digest}"):
        running_agent.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=text)), timeout=30)
        running_agent.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=text)), timeout=30)
    assert listed(running_agent) == []
    after = set(stored_files(running_agent))
    assert not any(f.startswith(("blobs/", "disks/")) for f in after), after
    assert before - after
    fs_after = running_agent.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10)
    assert fs_after.image_filesystems[0].used_bytes.value < fs_before.image_filesystems[0].used_bytes.value


def test_tag_moves_to_the_newer_image(running_agent: AgentProcess, registry: RunningRegistry,
                                      client: RegistryClient) -> None:
    name = f"podvisor-test/{uuid.uuid4().hex[:12]}"
    repo = registry.repository(name)
    first = push_image(client, repo, "stable", [containerdisk_layer({"disk/d.img": raw_disk()})])
    first_id = pull(running_agent, f"{registry.host}/{name}:stable")
    second = push_image(client, repo, "stable", [containerdisk_layer({"disk/d.img": raw_disk()})])
    second_id = pull(running_agent, f"{registry.host}/{name}:stable")
    assert first_id != second_id
    by_id = {i.id: i for i in listed(running_agent)}
    assert list(by_id[second_id].repo_tags) == [f"{registry.host}/{name}:stable"]
    assert list(by_id[first_id].repo_tags) == []
    assert first.digest != second.digest


def test_registry_rewrite_serves_docker_hub_names_locally(agent_factory: Any, registry: RunningRegistry,
                                                          client: RegistryClient) -> None:
    repo = registry.repository("kubevirt/cirros-registry-disk-demo")
    pushed = push_image(client, repo, "latest", [containerdisk_layer({"disk/c.img": raw_disk()})])
    agent = agent_factory(extra_config=(
        "[[registries.rewrite]]\n"
        'prefix = "docker.io/kubevirt/"\n'
        f'replacement = "{registry.host}/kubevirt/"\n'))
    agent.start()
    image_id = pull(agent, "kubevirt/cirros-registry-disk-demo")
    assert image_id == oci.sha256_digest(pushed.config)
    img = status(agent, "docker.io/kubevirt/cirros-registry-disk-demo:latest").image
    assert list(img.repo_tags) == ["docker.io/kubevirt/cirros-registry-disk-demo:latest"]


def test_images_survive_restart_and_crash_leftovers_are_collected(
        agent_factory: Any, registry: RunningRegistry, client: RegistryClient) -> None:
    agent = agent_factory().start()
    name, pushed = push(client, registry, {"disk/disk.img": raw_disk()})
    image_id = pull(agent, f"{name}:v1")
    big, big_pushed = push(client, registry, {"disk/big.img": os.urandom(96 << 20)})
    big_layer = oci.sha256_digest(big_pushed.layers[0])
    blobs = agent.state_dir / "images" / "blobs" / "sha256"

    # Kill -9 in the middle of a pull: as soon as the big layer is being written.
    def pull_big() -> None:
        try:
            pull(agent, f"{big}:v1")
        except grpc.RpcError:
            pass

    puller = threading.Thread(target=pull_big)
    puller.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.name.endswith(".partial") for p in blobs.iterdir()) or \
                (blobs / big_layer[7:]).exists() or list((agent.state_dir / "images" / "tmp").iterdir()):
            break
        time.sleep(0.001)
    else:  # killing an agent that never began the pull would test nothing
        raise AssertionError("the big pull never began writing within 60 s")
    agent.kill9()
    puller.join(30)

    again = agent_factory(state_dir=agent.state_dir).start()
    images = listed(again)
    assert [i.id for i in images] == [image_id]  # no half image visible
    assert not any(p.name.endswith(".partial") for p in blobs.iterdir())
    assert not (blobs / big_layer[7:]).exists()
    assert not list((agent.state_dir / "images" / "tmp").iterdir())
    # The surviving image is intact and usable.
    info = json.loads(status(again, image_id, verbose=True).info["info"])
    assert Path(info["disks"][0]["hostPath"]).is_file()
    assert pull(again, f"{big}:v1") == oci.sha256_digest(big_pushed.config)
