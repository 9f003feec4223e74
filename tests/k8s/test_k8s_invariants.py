"""What a cluster would only reveal later: k8s/'s objects agree with each other, with the image and with the services.

Labels and selectors, Service / container / ConfigMap ports, probes on the health service, who the
NetworkPolicies admit, GPUs / ranks / parallel degrees, shutdown budgets, security and writable paths.
"""

from __future__ import annotations

import argparse
import re
from pathlib import PurePosixPath

import pytest
from k8s_manifests import (
    CONFIGMAP,
    GPU,
    GRPC_SERVICES,
    NAMESPACE,
    PORTS,
    REPO,
    STAGES,
    by_kind,
    configmap,
    container,
    deployment,
    dockerfile_env,
    dockerfile_final_stage,
    env_values,
    expanded_args,
    flags,
    load_manifests,
    pod_spec,
    selects,
)

GPU_STAGES = ("text-encoder", "denoiser", "vae")
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m)?$")
UNITS = {None: 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
         "Ti": 2**40}


def quantity(q: str | int) -> float:
    m = QUANTITY.match(str(q))
    assert m, f"unparsable quantity {q!r}"
    return float(m.group(1)) * UNITS[m.group(2)]


def template_labels(stage: str) -> dict:
    return deployment(stage)["spec"]["template"]["metadata"]["labels"]


def volumes(stage: str) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec(stage).get("volumes") or []}


def mounts(stage: str) -> dict[str, dict]:
    """mountPath -> (mount, volume)."""
    vols = volumes(stage)
    return {m["mountPath"]: {**m, "volume": vols[m["name"]]} for m in container(stage).get("volumeMounts") or []}


# ---- labels and selectors ----

def test_the_four_stages_and_nothing_else_are_deployed():
    assert set(by_kind("Deployment")) == set(STAGES)
    assert set(by_kind("Service")) == set(STAGES)
    assert set(by_kind("PodDisruptionBudget")) == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_selectors_match_the_pod_labels_of_their_own_stage_only(stage):
    dep = deployment(stage)
    assert selects(dep["spec"]["selector"], template_labels(stage)), f"{stage}: Deployment selector vs template"
    for kind, sel in (("Service", {"matchLabels": by_kind("Service")[stage]["spec"]["selector"]}),
                      ("PodDisruptionBudget", by_kind("PodDisruptionBudget")[stage]["spec"]["selector"])):
        chosen = [s for s in STAGES if selects(sel, template_labels(s))]
        assert chosen == [stage], f"{kind} {stage} selects the pods of {chosen}"
    # Two Deployments whose selectors overlap would fight over pods.
    others = [s for s in STAGES if s != stage and selects(dep["spec"]["selector"], template_labels(s))]
    assert not others, f"{stage}'s selector also matches {others}"


def test_every_network_policy_selects_existing_pods():
    for name, pol in by_kind("NetworkPolicy").items():
        assert any(selects(pol["spec"]["podSelector"], template_labels(s)) for s in STAGES), name


# ---- ports: Service, container, flags, ConfigMap ----

@pytest.mark.parametrize("stage", STAGES)
def test_service_port_targets_the_container_port_the_service_listens_on(stage):
    svc = by_kind("Service")[stage]["spec"]
    (port,) = svc["ports"]
    cport = next(p for p in container(stage)["ports"] if p["name"] == "grpc")
    target = port["targetPort"]
    assert target in (cport["name"], cport["containerPort"]), f"{stage}: targetPort {target} names no container port"
    assert port["port"] == cport["containerPort"] == PORTS[stage]
    assert int(flags(expanded_args(stage))["port"]) == PORTS[stage], f"{stage}: --port differs from the container port"
    assert port.get("protocol", "TCP") == cport.get("protocol", "TCP") == "TCP"


@pytest.mark.parametrize("stage", STAGES)
def test_metrics_flag_container_port_annotations_and_policy_agree(stage):
    """Each stage serves /metrics on the port its container declares, its pod's annotations name and the metrics
    NetworkPolicy admits; the Service stays gRPC only."""
    port = int(flags(expanded_args(stage))["metrics-port"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container(stage)["ports"]
    annotations = deployment(stage)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/scrape"] == "true"
    policy = by_kind("NetworkPolicy")["metrics"]["spec"]
    assert selects(policy["podSelector"], template_labels(stage))
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [port]
    assert [p["port"] for p in by_kind("Service")[stage]["spec"]["ports"]] == [PORTS[stage]]


def test_shared_port_defaults_agree():
    serving = pytest.importorskip("smartdiff.shared.serving")
    assert serving.DEFAULT_PORTS == PORTS


def test_balanced_stages_have_headless_services_and_the_gateway_a_virtual_ip():
    services = by_kind("Service")
    for stage in GPU_STAGES:
        assert services[stage]["spec"].get("clusterIP") == "None", f"{stage}: headless for client-side balancing"
        assert not services[stage]["spec"].get("publishNotReadyAddresses"), f"{stage}: DNS must list ready pods only"
    assert services["gateway"]["spec"].get("clusterIP") != "None"


ADDRESS = re.compile(r"^dns:///(?P<svc>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc\.cluster\.local:(?P<port>\d+)$")


def test_gateway_reaches_each_stage_at_its_service_through_the_configmap():
    """--text-encoder/--denoiser/--vae resolve, via ConfigMap keys, to headless Services and their ports."""
    f = flags(expanded_args("gateway"))
    services = by_kind("Service")
    for stage in GPU_STAGES:
        m = ADDRESS.match(f[stage])
        assert m, f"gateway --{stage}={f[stage]!r} is not dns:///<service>.<namespace>.svc.cluster.local:<port>"
        assert m["svc"] == stage and m["ns"] == NAMESPACE
        assert int(m["port"]) == services[stage]["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("stage", STAGES)
def test_env_reads_existing_configmap_keys_and_args_use_defined_vars(stage):
    env_values(stage)  # asserts each configMapKeyRef names our ConfigMap and an existing key
    argv = expanded_args(stage)  # asserts each $(VAR) is defined
    assert not any("$(" in a for a in argv), argv


def test_every_configmap_key_is_used():
    used = {e["valueFrom"]["configMapKeyRef"]["key"] for s in STAGES for e in container(s).get("env") or []
            if "valueFrom" in e}
    assert set(configmap()) == used, f"unused ConfigMap keys: {set(configmap()) - used}"


# ---- the command lines the services will parse ----

class Parsed(Exception):
    """Raised in place of loading the model: the stage's own parser accepted the command line."""

    def __init__(self, parsed: argparse.Namespace):
        super().__init__("parsed")
        self.parsed = parsed


def parse_with_the_service(monkeypatch, run, argv: list[str], shown: str) -> argparse.Namespace:
    """Run a stage entry point on `argv` until its own parser has read the flags; return what it read.

    The stage's parser is the one whose result has a `--port`; it is stopped there, before any loading.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        result = original(self, args, namespace)
        if hasattr(result, "port"):
            raise Parsed(result)
        return result

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    try:
        run(argv)
    except Parsed as p:
        return p.parsed
    except SystemExit:
        pytest.fail(f"`{shown}` is refused by the service's argument parser")
    pytest.fail(f"`{shown}` never parsed its flags")


@pytest.mark.parametrize("stage", STAGES)
def test_smartdiff_serve_command_lines_parse(stage, monkeypatch):
    argv = expanded_args(stage)
    assert argv[:3] == ["smartdiff", "serve", stage]
    cli = pytest.importorskip("smartdiff.services.gateway.cli")
    args = parse_with_the_service(monkeypatch, cli.main, argv[1:], " ".join(argv))
    assert args.port == PORTS[stage]
    assert str(args.checkpoint) == configmap()["SMARTDIFF_MODEL_DIR"]
    assert args.model == configmap()["SMARTDIFF_MODEL"]


def denoiser_args(monkeypatch) -> argparse.Namespace:
    """The denoiser's command line as its own parser reads it."""
    argv = expanded_args("denoiser")
    cli = pytest.importorskip("smartdiff.services.gateway.cli")
    return parse_with_the_service(monkeypatch, cli.main, argv[1:], " ".join(argv))


def test_denoiser_ranks_equal_gpus_and_parallel_degrees(monkeypatch):
    args = denoiser_args(monkeypatch)
    world = args.nproc_per_node
    limits = container("denoiser")["resources"]["limits"]
    degrees = args.cfg_degree * args.ulysses_degree * args.ring_degree
    assert world == int(limits[GPU]) == degrees == 4, (world, limits[GPU], degrees)
    literal = [a for a in container("denoiser")["args"] if a.startswith("--nproc-per-node")]
    assert literal and "$(" not in literal[0], "--nproc-per-node must be literal, beside the GPU limit"
    # Ulysses splits attention heads across ranks.
    from smartdiff.shared.config import available_models, load_model_config

    model = configmap()["SMARTDIFF_MODEL"]
    assert model in available_models()
    assert load_model_config(model).dit.num_heads % args.ulysses_degree == 0


def test_allowed_attention_backends_are_registered(monkeypatch):
    attention = pytest.importorskip("smartdiff.services.denoiser.attention")
    allowed = denoiser_args(monkeypatch).attention_backends.split(",")
    assert set(allowed) <= set(attention.backend_names()), set(allowed) - set(attention.backend_names())


# ---- GPUs, shared memory, scheduling ----

def test_denoiser_has_its_gpus_and_a_memory_backed_dev_shm():
    res = container("denoiser")["resources"]
    assert int(res["limits"][GPU]) == 4
    assert res["requests"].get(GPU, res["limits"][GPU]) == res["limits"][GPU], "GPU requests must equal limits"
    shm = mounts("denoiser").get("/dev/shm")
    assert shm is not None, "NCCL needs more /dev/shm than the runtime's 64 MiB"
    empty = shm["volume"]["emptyDir"]
    assert empty["medium"] == "Memory" and quantity(empty["sizeLimit"]) >= 8 * 2**30
    # A memory emptyDir is charged to the container's memory limit.
    assert quantity(empty["sizeLimit"]) <= quantity(res["limits"]["memory"]) / 4


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_stages_land_on_gpu_nodes_and_the_gateway_needs_none(stage):
    spec, res = pod_spec(stage), container(stage)["resources"]
    if stage == "gateway":
        assert GPU not in res.get("limits", {}) and "nodeSelector" not in spec and "tolerations" not in spec
        return
    assert int(res["limits"][GPU]) >= 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


# ---- probes ----

@pytest.mark.parametrize("stage", STAGES)
def test_probes_are_native_grpc_on_the_health_service_of_the_serving_port(stage):
    c = container(stage)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{stage} {kind}"
        port = probe["grpc"]["port"]
        assert isinstance(port, int) and port == c["ports"][0]["containerPort"], f"{stage} {kind} port {port!r}"
        assert probe["grpc"].get("service") == GRPC_SERVICES[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_probe_service_names_exist_in_the_protos(stage):
    package, service = GRPC_SERVICES[stage].rsplit(".", 1)
    protos = "\n".join(p.read_text() for p in (REPO / "proto").rglob("*.proto"))
    assert re.search(rf"^package {re.escape(package)};", protos, re.MULTILINE) and f"service {service} {{" in protos


def budget(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize(("stage", "minimum"), [("gateway", 1200), ("text-encoder", 600), ("denoiser", 1200),
                                                ("vae", 300)])
def test_startup_budget_covers_loading_and_the_rollout_waits_for_it(stage, minimum):
    c = container(stage)
    startup = budget(c["startupProbe"])
    assert startup >= minimum, f"{stage}: {startup} s to load weights and warm up"
    if stage == "gateway":  # SERVING once a ready denoiser answered: it may wait for the denoiser's whole start
        assert startup >= budget(container("denoiser")["startupProbe"])
    # Otherwise the Deployment reports ProgressDeadlineExceeded while pods are still legitimately loading.
    assert deployment(stage)["spec"]["progressDeadlineSeconds"] > startup
    # Once started, a hung server is taken out of rotation within seconds and restarted within minutes.
    ready = c["readinessProbe"]
    assert ready["periodSeconds"] * ready.get("failureThreshold", 3) <= 15
    assert 60 <= budget(c["livenessProbe"]) <= 300


# ---- network policy ----

def endpoint(labels: dict | None = None, namespace: str = NAMESPACE) -> dict | None:
    return {"labels": labels or {}, "namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}}


OUTSIDE = None  # a client outside the cluster (or a host not in any selector)
DNS = endpoint({"k8s-app": "kube-dns"}, "kube-system")


def _peer_admits(peer: dict, other: dict | None) -> bool:
    if "ipBlock" in peer:
        return other is OUTSIDE and peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") and not peer["ipBlock"].get("except")
    if other is OUTSIDE:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other["ns_labels"]):
            return False
    elif other["namespace"] != NAMESPACE:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other["labels"])


def _ports_admit(ports: list | None, port: int, protocol: str) -> bool:
    return not ports or any(p.get("protocol", "TCP") == protocol
                            and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
                            for p in ports)


def _side_admits(pod: dict | None, other: dict | None, port: int, protocol: str, direction: str) -> bool:
    """Do the policies of `pod`'s namespace let `other` in (Ingress) / let `pod` out to `other` (Egress)?"""
    if pod is OUTSIDE or pod["namespace"] != NAMESPACE:
        return True  # not governed by our policies
    field, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [p["spec"] for p in by_kind("NetworkPolicy").values() if selects(p["spec"]["podSelector"], pod["labels"])
                 and direction in p["spec"].get("policyTypes", ["Ingress"] + (["Egress"] if "egress" in p["spec"] else []))]
    if not isolating:
        return True
    return any((not rule.get(peers) or any(_peer_admits(peer, other) for peer in rule[peers]))
               and _ports_admit(rule.get("ports"), port, protocol)
               for spec in isolating for rule in spec.get(field) or [])


def connects(src: dict | None, dst: dict | None, port: int, protocol: str = "TCP") -> bool:
    return _side_admits(src, dst, port, protocol, "Egress") and _side_admits(dst, src, port, protocol, "Ingress")


def pod(stage: str) -> dict:
    return endpoint(template_labels(stage))


def test_clients_anywhere_reach_the_gateway_port_only():
    gw = pod("gateway")
    for client in (OUTSIDE, endpoint({"app": "client"}, "apps")):
        assert connects(client, gw, PORTS["gateway"])
        assert not connects(client, gw, 22)


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_stages_admit_the_gateway_and_nobody_else(stage):
    gw, target, port = pod("gateway"), pod(stage), PORTS[stage]
    assert connects(gw, target, port), f"gateway cannot reach {stage}:{port}"
    assert not connects(gw, target, port + 100)
    strangers = [OUTSIDE, endpoint({"app": "client"}, "apps"), endpoint({"app": "debug"}),
                 endpoint(template_labels("gateway"), "elsewhere")]  # a gateway look-alike in another namespace
    strangers += [pod(s) for s in GPU_STAGES if s != stage]
    for who in strangers:
        assert not connects(who, target, port), f"{who} reaches {stage}"


def test_the_gateway_resolves_names_and_the_stages_make_no_outbound_connections():
    assert connects(pod("gateway"), DNS, 53, "UDP") and connects(pod("gateway"), DNS, 53, "TCP")
    assert not connects(pod("gateway"), OUTSIDE, 443)
    for stage in GPU_STAGES:
        for dst, port, proto in ((OUTSIDE, 443, "TCP"), (DNS, 53, "UDP"), (pod("gateway"), PORTS["gateway"], "TCP")):
            assert not connects(pod(stage), dst, port, proto), f"{stage} -> {dst}:{port}"


@pytest.mark.parametrize("stage", STAGES)
def test_kubelet_probes_are_admitted(stage):
    """Probes come from the pod's node, which NetworkPolicy always admits; they must target a port the policies
    open (the serving port) so no CNI that filters node traffic by port alone blocks them."""
    c = container(stage)
    policies = [p["spec"] for p in by_kind("NetworkPolicy").values()
                if selects(p["spec"]["podSelector"], template_labels(stage)) and p["spec"].get("ingress")]
    open_ports = {pp["port"] for spec in policies for rule in spec["ingress"] for pp in rule.get("ports") or []}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["grpc"]["port"] in open_ports


# ---- shutdown ----

@pytest.mark.parametrize("stage", STAGES)
def test_shutdown_fits_in_the_termination_grace_period(stage):
    """preStop sleep (leave the endpoints) + --drain-seconds (NOT_SERVING, finish in-flight) < grace period."""
    spec, c = pod_spec(stage), container(stage)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(flags(expanded_args(stage))["drain-seconds"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10, (stage, pre_stop, drain)


# ---- resources ----

@pytest.mark.parametrize("stage", STAGES)
def test_requests_and_limits_are_set_and_volumes_fit_in_them(stage):
    res = container(stage)["resources"]
    for r in ("cpu", "memory", "ephemeral-storage"):
        assert r in res["requests"] and r in res["limits"], f"{stage}: {r}"
        assert quantity(res["requests"][r]) <= quantity(res["limits"][r])
    if stage in GPU_STAGES:  # Guaranteed QoS: last to be evicted, eligible for exclusive CPUs
        assert res["requests"] == res["limits"]
    disk = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in volumes(stage).values()
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    assert disk <= quantity(res["limits"]["ephemeral-storage"])
    for v in volumes(stage).values():
        if "emptyDir" in v:
            assert "sizeLimit" in v["emptyDir"], f"{stage}: unbounded emptyDir {v['name']}"


def test_disruption_budgets_let_drains_proceed_one_pod_at_a_time():
    for name, pdb in by_kind("PodDisruptionBudget").items():
        assert pdb["spec"].get("maxUnavailable") == 1, name
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", name


# ---- security, image, writable paths ----

def image_user() -> tuple[int, int]:
    users = [rest for instr, rest in dockerfile_final_stage() if instr == "USER"]
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)


@pytest.mark.parametrize("stage", STAGES)
def test_pods_run_restricted(stage):
    """The namespace enforces the 'restricted' Pod Security Standard; these are its rules that apply here."""
    spec, c = pod_spec(stage), container(stage)
    psc, sc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and (psc["runAsUser"], psc["runAsGroup"]) == image_user() != (0, 0)
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["readOnlyRootFilesystem"] is True
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in volumes(stage).values())
    assert spec["automountServiceAccountToken"] is False  # the services never call the API
    assert spec.get("enableServiceLinks") is False  # no {SERVICE}_PORT variables colliding with ours
    ns = by_kind("Namespace")[NAMESPACE]["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"


def test_one_image_for_all_roles_tagged_with_the_project_version():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {container(s)["image"] for s in STAGES}
    assert len(images) == 1, images
    assert re.fullmatch(rf"([^/\s]+/)*smartdiff:{re.escape(version)}", images.pop()), "tagged with the project version"
    assert all("command" not in container(s) for s in STAGES), "args only: the image's tini entrypoint stays PID 1"


@pytest.mark.parametrize("stage", STAGES)
def test_everything_the_image_writes_lands_on_a_writable_emptydir(stage):
    env = dockerfile_env()
    writable = [PurePosixPath(p) for p, m in mounts(stage).items() if "emptyDir" in m["volume"] and not m.get("readOnly")]
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH"):
        path = PurePosixPath(env[var])
        assert any(path == w or w in path.parents for w in writable), f"{stage}: {var}={path} is read-only"
    assert PurePosixPath("/tmp") in writable


@pytest.mark.parametrize("stage", STAGES)
def test_weights_come_from_the_read_only_claim_without_downloads(stage):
    env = {**dockerfile_env(), **env_values(stage)}
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert not pod_spec(stage).get("initContainers")
    model_dir = PurePosixPath(configmap()["SMARTDIFF_MODEL_DIR"])
    (mount,) = [m for p, m in mounts(stage).items() if PurePosixPath(p) in model_dir.parents]
    claim = mount["volume"]["persistentVolumeClaim"]
    assert mount["readOnly"] is True and claim["readOnly"] is True
    pvc = by_kind("PersistentVolumeClaim")[claim["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_configmap_is_the_one_the_pods_read():
    assert CONFIGMAP in by_kind("ConfigMap")
    assert all(m.doc["metadata"]["name"] != "kustomization" for m in load_manifests())
