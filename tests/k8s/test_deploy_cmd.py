"""`smartdiff deploy status|wait` against recorded Kubernetes API responses served over HTTP through a kubeconfig.

The fixtures (tests/k8s/fixtures/) are API-server list responses in wire format (camelCase JSON): the
whole client stack runs (kubeconfig loading, bearer token, URL and label selector, deserialization).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from k8s_manifests import STAGES

pytest.importorskip("kubernetes")

from smartdiff.services.gateway import deploy

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "recorded-token"


def fixture(name: str) -> tuple[int, dict]:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc.get("code", 200), doc


class FakeApiServer:
    """Answers list calls from a script of snapshots; one snapshot per `collect` (deployments, then pods)."""

    def __init__(self, snapshots: list[str | tuple[dict, dict]]):
        self.snapshots = snapshots
        self.calls = 0  # completed collects
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlparse(self.path)
                server.requests.append({"path": url.path, "query": parse_qs(url.query),
                                        "auth": self.headers.get("Authorization")})
                code, body = server.answer(url.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, path: str) -> tuple[int, dict]:
        snap = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        if isinstance(snap, str) and snap.startswith("status-"):  # an error answer ends this collect
            self.calls += 1
            return fixture(snap)
        # A fixture name, or (DeploymentList, PodList) bodies edited by the test.
        deployments, pods = (fixture(f"deployments-{snap}")[1], fixture(f"pods-{snap}")[1]) if isinstance(snap, str) \
            else snap
        if path.endswith("/deployments"):
            return 200, deployments
        if path.endswith("/pods"):
            self.calls += 1
            return 200, pods
        return 404, {"kind": "Status", "code": 404}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path):
    servers = []

    def start(*snapshots: str | tuple[dict, dict]) -> tuple[FakeApiServer, Path]:
        srv = FakeApiServer(list(snapshots))
        servers.append(srv)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "recorded",
            "clusters": [{"name": "recorded", "cluster": {"server": srv.url}}],
            "users": [{"name": "recorded", "user": {"token": TOKEN}}],
            "contexts": [{"name": "recorded", "context": {"cluster": "recorded", "user": "recorded"}}],
        }))
        return srv, kubeconfig

    yield start
    for s in servers:
        s.close()


def wait_args(kubeconfig: Path, timeout: float = 900, interval: float = 5) -> argparse.Namespace:
    return argparse.Namespace(kubeconfig=str(kubeconfig), context=None, namespace="smartdiff", timeout=timeout,
                              interval=interval)


class FakeClock:
    def __init__(self):
        self.t = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def rows(text: str) -> dict[str, list[str]]:
    """STAGE -> the other columns of the status table (STATUS may contain spaces: last column, kept whole)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("STAGE"))
    out = {}
    for line in lines[header + 1:header + 1 + len(STAGES)]:
        cols = line.split(None, 6)
        out[cols[0]] = cols[1:]
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from smartdiff.services.gateway import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_status_of_a_ready_deployment(api, capsys):
    srv, kubeconfig = api("ready")
    code, out, err = run_cli(["deploy", "status", "--kubeconfig", str(kubeconfig)], capsys)
    assert code == 0, err
    table = rows(out)
    assert list(table) == list(STAGES)
    #                        READY  UP-TO-DATE GPUS RESTARTS IMAGE              STATUS
    assert table["gateway"] == ["2/2", "2", "0", "0", "smartdiff:0.1.0", "ready"]
    assert table["text-encoder"] == ["1/1", "1", "1", "0", "smartdiff:0.1.0", "ready"]
    assert table["denoiser"] == ["1/1", "1", "4", "0", "smartdiff:0.1.0", "ready"]
    assert table["vae"] == ["1/1", "1", "1", "1", "smartdiff:0.1.0", "ready"]
    # Two list calls, in our namespace, selected by label, with the kubeconfig's credentials.
    assert [r["path"] for r in srv.requests] == ["/apis/apps/v1/namespaces/smartdiff/deployments",
                                                 "/api/v1/namespaces/smartdiff/pods"]
    assert all(r["query"]["labelSelector"] == ["app.kubernetes.io/part-of=smartdiff"] for r in srv.requests)
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in srv.requests)


def test_status_says_why_each_stage_is_not_ready(api, capsys):
    _, kubeconfig = api("starting")
    code, out, _ = run_cli(["deploy", "status", "--kubeconfig", str(kubeconfig), "-n", "smartdiff"], capsys)
    assert code == 1
    table = rows(out)
    assert table["gateway"][-1] == "ready"
    assert table["text-encoder"][:4] == ["0/1", "1", "0", "0"]  # no GPU held while unschedulable
    assert table["text-encoder"][-1] == "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu"
    assert table["denoiser"][:3] == ["0/1", "1", "4"]
    assert table["denoiser"][-1] == "starting (loading weights, warm-up)"
    assert table["vae"][-1] == "ImagePullBackOff"


def test_status_of_an_empty_namespace_points_at_kubectl_apply(api, capsys):
    _, kubeconfig = api("empty")
    code, out, _ = run_cli(["deploy", "status", "--kubeconfig", str(kubeconfig)], capsys)
    assert code == 1
    assert all(r == ["0/0", "0", "0", "0", "-", "missing (kubectl apply -f k8s/)"] for r in rows(out).values())


def test_wait_returns_once_all_four_stages_are_ready(api):
    srv, kubeconfig = api("starting", "starting", "ready")
    clock, out = FakeClock(), io.StringIO()
    code = deploy.cmd_wait(wait_args(kubeconfig, interval=5), out=out, clock=clock, sleep=clock.sleep)
    text = out.getvalue()
    assert code == 0, text
    assert srv.calls == 3 and clock.sleeps == [5, 5]
    waiting = [line for line in text.splitlines() if "waiting for:" in line]
    assert len(waiting) == 1  # printed when the picture changes, not every poll
    assert "text-encoder 0/1 Unschedulable" in waiting[0] and "denoiser 0/1 starting" in waiting[0]
    assert "gateway" not in waiting[0]
    assert text.splitlines()[-1] == "all 4 stages ready in namespace smartdiff after 10 s"
    assert all(r[-1] == "ready" for r in rows(text).values())


def test_wait_gives_up_at_the_timeout_naming_the_stages_not_ready(api):
    srv, kubeconfig = api("starting")
    clock, out = FakeClock(), io.StringIO()
    code = deploy.cmd_wait(wait_args(kubeconfig, timeout=12, interval=5), out=out, clock=clock, sleep=clock.sleep)
    text = out.getvalue()
    assert code == 1
    assert clock.sleeps == [5, 5, 2] and srv.calls == 4  # polls at 0, 5, 10 and 12 s
    last = text.splitlines()[-1]
    assert last.startswith("timed out after 12 s; not ready: text-encoder 0/1 Unschedulable")
    assert "denoiser 0/1 starting" in last and "vae 0/1 ImagePullBackOff" in last and "gateway" not in last
    assert rows(text)["denoiser"][-1] == "starting (loading weights, warm-up)"


def test_wait_rides_out_an_api_server_restart(api):
    _, kubeconfig = api("status-unavailable", "ready")
    clock, out = FakeClock(), io.StringIO()
    code = deploy.cmd_wait(wait_args(kubeconfig), out=out, clock=clock, sleep=clock.sleep)
    assert code == 0
    assert "API unavailable (Kubernetes API: 503" in out.getvalue()


def test_wait_through_the_cli_exits_0_when_ready(api, capsys):
    _, kubeconfig = api("ready")
    code, out, _ = run_cli(["deploy", "wait", "--kubeconfig", str(kubeconfig), "--timeout", "30"], capsys)
    assert code == 0 and "all 4 stages ready" in out


@pytest.mark.parametrize("command", [["status"], ["wait", "--timeout", "30"]])
def test_refused_credentials_are_an_error_not_a_wait(api, capsys, command):
    _, kubeconfig = api("status-forbidden")
    code, _, err = run_cli(["deploy", *command, "--kubeconfig", str(kubeconfig)], capsys)
    assert code == 2
    assert err.strip() == ("error: Kubernetes API: 403 forbidden: the kubeconfig's user may not list deployments "
                           "and pods here")


def test_missing_kubeconfig_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(["deploy", "status", "--kubeconfig", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith(f"error: kubeconfig {tmp_path / 'nope'}")


def test_unreachable_api_server_is_an_error_for_status(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],  # discard port: refused
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    code, _, err = run_cli(["deploy", "status", "--kubeconfig", str(kubeconfig)], capsys)
    assert code == 2 and "cannot reach the Kubernetes API server" in err


def test_kubernetes_client_is_imported_only_when_used():
    code = ("import sys, smartdiff.services.gateway.cli, smartdiff.services.gateway.deploy; "
            "assert 'kubernetes' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_the_kubernetes_client_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    code, _, err = run_cli(["deploy", "status"], capsys)
    assert code == 2 and "pip install -e '.[deploy]'" in err


@pytest.mark.parametrize("name", ["deployments-ready", "deployments-starting", "pods-ready", "pods-starting"])
def test_fixtures_are_valid_api_objects(name):
    """The recorded items pass the API schema, so the tests read what a real server sends."""
    kv = pytest.importorskip("kubernetes_validate")
    _, doc = fixture(name)
    api_version, kind = ("apps/v1", "Deployment") if name.startswith("deployments") else ("v1", "Pod")
    for item in doc["items"]:
        kv.validate({"apiVersion": api_version, "kind": kind, **item}, "1.30.0", strict=True)


def test_crash_loops_name_the_last_exit_and_rollouts_wait_for_the_new_pods(api, capsys):
    _, deps = fixture("deployments-ready")
    _, pods = fixture("pods-ready")
    denoiser_pod = next(p for p in pods["items"] if p["metadata"]["labels"]["app.kubernetes.io/component"] == "denoiser")
    cs = denoiser_pod["status"]["containerStatuses"][0]
    cs.update(ready=False, started=False, restartCount=3,
              state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
              lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    next(d for d in deps["items"] if d["metadata"]["name"] == "denoiser")["status"].pop("readyReplicas")
    gateway = next(d for d in deps["items"] if d["metadata"]["name"] == "gateway")
    gateway["metadata"]["generation"] = 4  # a new template, not yet observed by the controller
    _, kubeconfig = api((deps, pods))
    code, out, _ = run_cli(["deploy", "status", "--kubeconfig", str(kubeconfig)], capsys)
    table = rows(out)
    assert code == 1
    assert table["denoiser"] == ["0/1", "1", "4", "3", "smartdiff:0.1.0", "CrashLoopBackOff (last exit: OOMKilled)"]
    assert table["gateway"] == ["2/2", "2", "0", "0", "smartdiff:0.1.0", "rolling out (2/2 updated)"]


@pytest.mark.parametrize("make", [lambda d: d, lambda d: _write(d / "bad.yaml", "clusters: [1"),
                                  lambda d: _write(d / "list.yaml", "- 1\n- 2\n")])
def test_a_kubeconfig_that_is_not_one_is_an_error(tmp_path, capsys, make):
    path = make(tmp_path)
    code, _, err = run_cli(["deploy", "status", "--kubeconfig", str(path)], capsys)
    assert code == 2 and err.startswith(f"error: kubeconfig {path}") and "Traceback" not in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("flags,words", [(["--interval", "-1"], "--interval: must be finite and >= 0.1"),
                                         (["--interval", "0"], "--interval: must be finite and >= 0.1"),
                                         (["--timeout", "nan"], "--timeout: must be finite and >= 0"),
                                         (["--timeout", "-1"], "--timeout: must be finite and >= 0")])
def test_wait_checks_its_times(capsys, flags, words):
    from smartdiff.services.gateway.cli import main

    with pytest.raises(SystemExit) as e:
        main(["deploy", "wait", *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err
