"""Every manifest of k8s/ validates, offline and in strict mode, against Kubernetes 1.30 and the newest schemas shipped."""

from __future__ import annotations

import copy
import socket

import pytest
from k8s_manifests import K8S_DIR, NAMESPACE, load_manifests, manifest_files

kv = pytest.importorskip("kubernetes_validate")

# The oldest Kubernetes these manifests support (native gRPC probes GA, preStop sleep on by default) and
# the newest the installed kubernetes-validate ships.
VERSIONS = sorted({"1.30.0", kv.latest_version()})
MANIFESTS = load_manifests()
EXAMPLES = load_manifests(K8S_DIR / "examples")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The schemas ship inside the package: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_newest_schema_is_at_least_1_30():
    assert [int(x) for x in kv.latest_version().split(".")[:2]] >= [1, 30]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS + EXAMPLES, ids=repr)
def test_manifest_matches_schema_strictly(manifest, version):
    assert kv.validate(manifest.doc, version, strict=True) == ".".join(version.split(".")[:2])


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_mode_rejects_misspelled_and_mistyped_fields(version):
    """The check has teeth: a typo or a wrong type in a Deployment is an error, not a silently dropped field."""
    dep = next(m.doc for m in MANIFESTS if m.kind == "Deployment")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "IfNotPresent"
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, version, strict=True)
    mistyped = copy.deepcopy(dep)
    mistyped["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kv.ValidationError):
        kv.validate(mistyped, version, strict=True)


def test_kubectl_apply_reads_only_manifests_and_namespace_first():
    """`kubectl apply -f k8s/` reads the top level in lexical order: YAML only, no kustomization, Namespace first."""
    top = [p for p in K8S_DIR.iterdir() if p.is_file()]
    assert top and all(p.suffix == ".yaml" for p in top), [p.name for p in top]
    assert not any(p.name.startswith("kustomization") for p in top)
    first = load_manifests()[0]
    assert (first.kind, first.name) == ("Namespace", NAMESPACE)
    assert manifest_files()[0] == first.path


def test_every_object_is_namespaced_in_smartdiff_and_unique():
    seen = set()
    for m in MANIFESTS:
        key = (m.kind, m.name)
        assert key not in seen, f"{key} defined twice"
        seen.add(key)
        if m.kind != "Namespace":
            assert m.doc["metadata"].get("namespace") == NAMESPACE, m
        assert m.doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "smartdiff", m
    kinds = {m.kind for m in MANIFESTS}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "Deployment", "Service",
            "PodDisruptionBudget"} <= kinds
