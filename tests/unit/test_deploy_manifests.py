"""docs/DEPLOY.md's Kubernetes manifests: they parse and fit together (StatefulSet, headless
Service, Service, PodDisruptionBudget), and their settings are the daemon's real settings."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.daemon.config import all_settings, env_name, load_config
from reconciler.daemon.shard import Shard

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "DEPLOY.md"


def manifests() -> list[dict[str, Any]]:
    text = DEPLOY.read_text()
    section = text[text.index("### Sharded over a StatefulSet") : text.index("## Building the image")]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    return [d for d in yaml.safe_load_all(block.group(1)) if d]


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests() if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_statefulset_headless_service_and_pdb_fit_together() -> None:
    sts = by_kind("StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == labels
    peers = by_kind("Service", sts["spec"]["serviceName"])
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["selector"] == labels
    assert peers["spec"]["publishNotReadyAddresses"] is True  # peers reach a replica still starting
    assert by_kind("Service", "reconciler")["spec"]["selector"] == labels
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_env_gives_each_pod_its_shard() -> None:
    sts = by_kind("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RECONCILER_SHARD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert int(env["RECONCILER_SHARD_REPLICAS"]["value"]) == sts["spec"]["replicas"]
    peer_url = env["RECONCILER_SHARD_PEER_URL"]["value"]
    assert f".{sts['spec']['serviceName']}:" in peer_url
    known = {env_name(s) for s in all_settings()}
    config_map = by_kind("ConfigMap")["data"]
    for name in [*env, *config_map]:
        assert name.removesuffix("_FILE") in known, name
    # what pod reconciler-1 would get: a valid shard with the other two as peers
    values = {k: v for k, v in config_map.items() if "SOURCE" in k and "SSH_KEY" not in k}
    values.update({"RECONCILER_SOURCE_VERIFY": "none",
                   "RECONCILER_SHARD_NAME": f"{sts['metadata']['name']}-1",
                   "RECONCILER_SHARD_REPLICAS": env["RECONCILER_SHARD_REPLICAS"]["value"],
                   "RECONCILER_SHARD_PEER_URL": peer_url})  # fmt: skip
    shard = Shard.from_config(load_config(None, values).shard)
    assert [p.url for p in shard.peers] == [
        "http://reconciler-0.reconciler-peers:8080",
        "http://reconciler-2.reconciler-peers:8080",
    ]


def test_kubectl_dry_run_when_a_cluster_answers(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (Debian: kubernetes-client)")
    probe = subprocess.run([kubectl, "version", "--request-timeout=3s"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("kubectl apply --dry-run=client needs an API server (discovery); none answers here")
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump_all(manifests()))
    out = subprocess.run(
        [kubectl, "apply", "--dry-run=client", "-f", str(path)], capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()
