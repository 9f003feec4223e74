"""`smartdiff deploy status|wait`: the four stages of a Kubernetes deployment (k8s/), read through the user's kubeconfig.

`status` prints one row per stage (pods ready, GPUs, restarts, image, what is wrong) and exits 0 only when all
four are ready; `wait` polls until they are (for smoke tests and CI), or exits 1 at the timeout. The
`kubernetes` client is an optional dependency (`pip install -e '.[deploy]'` in a checkout), imported on use.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from smartdiff.shared.argtypes import seconds

STAGES = ("gateway", "text-encoder", "denoiser", "vae")  # Deployment names in k8s/
DEFAULT_NAMESPACE = "smartdiff"
PART_OF = "app.kubernetes.io/part-of=smartdiff"  # label on every Deployment and pod of k8s/
GPU_RESOURCE = "nvidia.com/gpu"
REQUEST_TIMEOUT_S = 15.0  # per API call
# Answers worth waiting through (the API server restarting, throttling); anything else is the user's to fix.
TRANSIENT_HTTP = {429, 500, 502, 503, 504}

EXIT_READY, EXIT_NOT_READY, EXIT_ERROR = 0, 1, 2


class DeployError(RuntimeError):
    """The cluster cannot be asked (no kubeconfig, refused credentials, unreachable API server)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StageStatus:
    """One stage as the cluster reports it."""

    stage: str
    desired: int  # spec.replicas; 0 when the Deployment is missing
    ready: int  # pods passing their readiness probe
    updated: int  # pods of the current template
    gpus: int  # nvidia.com/gpu held: limits summed over the stage's pods placed on a node
    restarts: int  # container restarts summed over the stage's live pods
    image: str  # the template's image ("-" when missing)
    state: str  # "ready", or what is in the way

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"


# ---- reading the cluster ----

def load_apis(kubeconfig: str | None = None, context: str | None = None) -> tuple[Any, Any]:
    """(AppsV1Api, CoreV1Api) for the kubeconfig (default: $KUBECONFIG or ~/.kube/config), else in-cluster."""
    try:
        from kubernetes import client, config
    except ImportError as e:  # optional dependency
        raise DeployError("the kubernetes client is not installed: pip install -e '.[deploy]' (in the "
                          "repository's checkout; the `deploy` extra)") from e
    import yaml  # the kubernetes client's own dependency

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, FileNotFoundError) as e:
        if kubeconfig is not None:
            raise DeployError(f"kubeconfig {kubeconfig}: {e}") from e
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise DeployError(f"no usable kubeconfig ({e}); pass --kubeconfig PATH or set KUBECONFIG") from e
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:  # a folder, or not a kubeconfig
        raise DeployError(f"kubeconfig {kubeconfig or '(default)'} cannot be read: {type(e).__name__}: {e}") from e
    api = client.ApiClient(configuration)
    return client.AppsV1Api(api), client.CoreV1Api(api)


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """One API call, with the client's exceptions turned into DeployError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(_request_timeout=REQUEST_TIMEOUT_S, **kwargs)
    except ApiException as e:
        reason = {401: "unauthorized: the kubeconfig's credentials were refused",
                  403: "forbidden: the kubeconfig's user may not list deployments and pods here"}.get(e.status, e.reason)
        raise DeployError(f"Kubernetes API: {e.status} {reason}", transient=e.status in TRANSIENT_HTTP) from e
    except HTTPError as e:  # connection refused, DNS, TLS, timeouts
        raise DeployError(f"cannot reach the Kubernetes API server: {e}", transient=True) from e


def collect(apps: Any, core: Any, namespace: str = DEFAULT_NAMESPACE) -> list[StageStatus]:
    """The four stages' status, from two list calls (Deployments and pods labelled part-of=smartdiff)."""
    deployments = _call(apps.list_namespaced_deployment, namespace=namespace, label_selector=PART_OF).items
    pods = _call(core.list_namespaced_pod, namespace=namespace, label_selector=PART_OF).items
    by_name = {d.metadata.name: d for d in deployments}
    return [stage_status(stage, by_name.get(stage), pods) for stage in STAGES]


# ---- judging one stage ----

def _selects(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _gpus(pod: Any) -> int:
    total = 0
    for c in pod.spec.containers or []:
        limits = (c.resources.limits if c.resources else None) or {}
        total += int(limits.get(GPU_RESOURCE, 0))
    return total


def _pod_problem(pod: Any) -> str | None:
    """Why this pod is not ready, in the words `kubectl describe` would use; None when it is ready."""
    status = pod.status
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":  # the scheduler's first sentence says why
            first = (cond.message or "").split(". ")[0].rstrip(".")
            return f"{cond.reason or 'Pending'}: {first}" if first else cond.reason or "Pending"
    containers = status.container_statuses or []
    if not containers:
        return status.phase or "Pending"
    for cs in containers:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
            last = cs.last_state.terminated if cs.last_state else None
            suffix = f" (last exit: {last.reason or last.exit_code})" if last is not None else ""
            return f"{waiting.reason}{suffix}"
        if waiting is not None:
            return waiting.reason
        if cs.state and cs.state.running and not cs.started:
            return "starting (loading weights, warm-up)"
        if not cs.ready:
            return "not ready (health NOT_SERVING)"
    return None


def stage_status(stage: str, deployment: Any | None, pods: Iterable[Any]) -> StageStatus:
    """Judge one stage from its Deployment (None: missing) and the namespace's pods."""
    if deployment is None:
        return StageStatus(stage, 0, 0, 0, 0, 0, "-", "missing (kubectl apply -f k8s/)")
    spec, st = deployment.spec, deployment.status
    selector = spec.selector.match_labels or {}
    live = [p for p in pods if _selects(selector, p.metadata.labels) and p.metadata.deletion_timestamp is None]
    desired = spec.replicas if spec.replicas is not None else 1
    ready, updated = st.ready_replicas or 0, st.updated_replicas or 0
    gpus = sum(_gpus(p) for p in live if p.spec.node_name)  # a Pending pod holds none
    restarts = sum(cs.restart_count or 0 for p in live for cs in (p.status.container_statuses or []))
    image = spec.template.spec.containers[0].image
    rolled_out = ((st.observed_generation or 0) >= (deployment.metadata.generation or 0)
                  and updated == desired and (st.replicas or 0) == desired)
    if desired == 0:
        state = "scaled to 0"
    elif ready >= desired and rolled_out:
        state = "ready"
    else:
        problems = [p for p in (_pod_problem(p) for p in live) if p]
        if problems:
            state = problems[0]
        elif not live:
            state = "no pods yet"
        else:
            state = f"rolling out ({updated}/{desired} updated)"
        for cond in st.conditions or []:
            if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                state += "; ProgressDeadlineExceeded"
    return StageStatus(stage, desired, ready, updated, gpus, restarts, image, state)


# ---- output ----

COLUMNS = ("STAGE", "READY", "UP-TO-DATE", "GPUS", "RESTARTS", "IMAGE", "STATUS")


def format_table(statuses: Iterable[StageStatus]) -> str:
    rows = [COLUMNS] + [(s.stage, f"{s.ready}/{s.desired}", str(s.updated), str(s.gpus), str(s.restarts),
                         s.image, s.state) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("   ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in rows)


def _waiting_for(statuses: Iterable[StageStatus]) -> str:
    return ", ".join(f"{s.stage} {s.ready}/{s.desired} {s.state}" for s in statuses if not s.is_ready)


# ---- commands ----

def cmd_status(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    apps, core = load_apis(args.kubeconfig, args.context)
    statuses = collect(apps, core, args.namespace)
    print(f"namespace {args.namespace}", file=out)
    print(format_table(statuses), file=out)
    return EXIT_READY if all(s.is_ready for s in statuses) else EXIT_NOT_READY


def cmd_wait(args: argparse.Namespace, out=None, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll every `args.interval` s until the four stages are ready (0) or `args.timeout` s passed (1)."""
    out = out or sys.stdout
    apps, core = load_apis(args.kubeconfig, args.context)
    start = clock()
    last_line, statuses = None, None
    while True:
        elapsed = clock() - start
        try:
            statuses = collect(apps, core, args.namespace)
            line = _waiting_for(statuses)
        except DeployError as e:
            if not e.transient:
                raise
            line = f"API unavailable ({e}); retrying"
        if statuses is not None and line == "" and all(s.is_ready for s in statuses):
            print(format_table(statuses), file=out)
            print(f"all {len(STAGES)} stages ready in namespace {args.namespace} after {elapsed:.0f} s", file=out)
            return EXIT_READY
        if line != last_line:
            print(f"[{elapsed:5.0f} s] waiting for: {line}", file=out, flush=True)
            last_line = line
        if elapsed >= args.timeout:
            if statuses is not None:
                print(format_table(statuses), file=out)
            print(f"timed out after {args.timeout:g} s; not ready: {line}", file=out)
            return EXIT_NOT_READY
        sleep(min(args.interval, max(args.timeout - elapsed, 0.0)))


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    """`smartdiff deploy status|wait`; sets `deploy_handler` for `run`."""
    deploy = sub.add_parser("deploy", help="state of a Kubernetes deployment of the four services (k8s/)")
    actions = deploy.add_subparsers(dest="deploy_command", required=True)
    status = actions.add_parser("status", help="one row per stage: pods ready, GPUs, restarts, image; "
                                "exit 0 when all are ready, 1 otherwise, 2 when the cluster cannot be asked")
    wait = actions.add_parser("wait", help="wait until the four stages are ready (exit 0) or the timeout (exit 1)")
    for p in (status, wait):
        p.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, help=f"default {DEFAULT_NAMESPACE}")
        p.add_argument("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config, then in-cluster")
        p.add_argument("--context", help="kubeconfig context (default: its current context)")
    wait.add_argument("--timeout", type=seconds(0.0), default=900.0, help="seconds (default 900)")
    wait.add_argument("--interval", type=seconds(0.1), default=5.0, help="seconds between polls, >= 0.1 (default 5)")
    status.set_defaults(deploy_handler=cmd_status)
    wait.set_defaults(deploy_handler=cmd_wait)


def run(args: argparse.Namespace) -> int:
    """Entry point from the CLI: the chosen command, with cluster errors as exit code 2."""
    try:
        return args.deploy_handler(args)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
