"""Test helpers: the manifests of k8s/ as `kubectl apply -f k8s/` reads them, and the command lines they start."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
DOCKERFILE = K8S_DIR / "image" / "Dockerfile"
NAMESPACE = "smartdiff"
CONFIGMAP = "smartdiff-config"
STAGES = ("gateway", "text-encoder", "denoiser", "vae")
PORTS = {"gateway": 50050, "text-encoder": 50051, "denoiser": 50052, "vae": 50053}  # the services' defaults
GRPC_SERVICES = {  # health service names each stage reports (proto package + service)
    "gateway": "smartdiff.gateway.v1.GatewayService",
    "text-encoder": "smartdiff.text_encoder.v1.TextEncoderService",
    "denoiser": "smartdiff.denoiser.v1.DenoiserService",
    "vae": "smartdiff.vae.v1.VaeService",
}
GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]

    def __repr__(self) -> str:  # pytest ids
        return f"{self.path.name}:{self.kind}/{self.name}"


def manifest_files(directory: Path = K8S_DIR) -> list[Path]:
    """The files `kubectl apply -f DIR` reads (not recursive), in its (lexical) order."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


@functools.cache
def _load(directory: Path) -> tuple[Manifest, ...]:
    out = []
    for path in manifest_files(directory):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append(Manifest(path, doc))
    return tuple(out)


def load_manifests(directory: Path = K8S_DIR) -> list[Manifest]:
    """Parsed once per session; treat the documents as read-only (copy before changing one)."""
    return list(_load(directory))


def by_kind(kind: str) -> dict[str, dict]:
    return {m.name: m.doc for m in load_manifests() if m.kind == kind}


def configmap() -> dict[str, str]:
    return by_kind("ConfigMap")[CONFIGMAP]["data"]


def deployment(stage: str) -> dict:
    return by_kind("Deployment")[stage]


def pod_spec(stage: str) -> dict:
    return deployment(stage)["spec"]["template"]["spec"]


def container(stage: str) -> dict:
    containers = pod_spec(stage)["containers"]
    assert len(containers) == 1, f"{stage}: one container per pod expected"
    return containers[0]


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels / matchExpressions In, NotIn, Exists, DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def env_values(stage: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: literal values and ConfigMap keys."""
    data = configmap()
    env = {}
    for e in container(stage).get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == CONFIGMAP, f"{stage}: env {e['name']} reads ConfigMap {ref['name']}"
            env[e["name"]] = data[ref["key"]]
    return env


VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expanded_args(stage: str) -> list[str]:
    """The container's command line after the kubelet's $(VAR) expansion; an undefined VAR is an error here
    (the kubelet would pass the text through unexpanded)."""
    env = env_values(stage)

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"{stage}: args use $({m.group(1)}), which its env does not define"
        return env[m.group(1)]

    c = container(stage)
    return [VAR.sub(sub, a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]


def flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a dict (the manifests write every valued flag that way)."""
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), rest.strip()))
    return stages[-1]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instr, rest in dockerfile_final_stage():
        if instr == "ENV":
            for item in rest.split():
                k, _, v = item.partition("=")
                env[k] = v
    return env
