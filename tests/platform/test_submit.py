"""``tvr submit`` / ``tvr jobs``: spec validation before any network, addresses, ids, the shipped
runtime_env, Ray token auth, secrets, and a real submission to a local ``ray start --head``."""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tvr_platform.cluster import cli
from tvr_platform.cluster import submit as sb

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "smoke train.yaml"
    path.write_text("run:\n  name: smoke\ntrain:\n  epochs: 1\ncluster:\n  entrypoint_num_cpus: 0.5\n"
                    "  env_vars:\n    TVR_TEST_MARK: hello\n")
    return path


@pytest.fixture
def clean_auth(monkeypatch, tmp_path):
    """No Ray token anywhere: empty HOME, no RAY_AUTH_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to reach a cluster."""
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("the cluster was contacted")

    monkeypatch.setattr(sb, "connect", refuse)
    monkeypatch.setattr("requests.get", refuse)
    return calls


# -- ids and addresses --------------------------------------------------------------------------

def test_submission_id_format():
    now = datetime(2026, 11, 23, 10, 15, 0, tzinfo=UTC)
    assert sb.make_submission_id("jobs/train.yaml", now, "ab12") == "tvr-train-20261123-101500-ab12"
    assert sb.make_submission_id("My Spec__v2!.YML", now, "0f0f") == "tvr-my-spec-v2-20261123-101500-0f0f"
    assert sb.make_submission_id("???.yaml", now, "0000") == "tvr-job-20261123-101500-0000"
    long_id = sb.make_submission_id("x" * 200 + ".yaml", now)
    assert len(long_id) <= 60
    pattern = re.compile(r"^tvr-[a-z0-9]([a-z0-9-]*[a-z0-9])?-\d{8}-\d{6}-[0-9a-f]{4}$")
    ids = {sb.make_submission_id("jobs/train.yaml") for _ in range(20)}
    assert all(pattern.match(i) for i in ids | {long_id}) and len(ids) > 1  # random suffix
    assert sb.check_submission_id("my-run.1") == "my-run.1"
    for bad in ("", "-x", "a b", "x" * 64, "a/b"):
        with pytest.raises(sb.SubmitError, match="submission-id"):
            sb.check_submission_id(bad)


def test_resolve_address_forms_and_precedence():
    assert sb.resolve_address("127.0.0.1:8265", env={}) == "http://127.0.0.1:8265"
    assert sb.resolve_address("https://ray.example.org/", env={}) == "https://ray.example.org"
    assert sb.resolve_address(None, env={"RAY_API_SERVER_ADDRESS": "http://h:1"}) == "http://h:1"
    assert sb.resolve_address(None, env={"RAY_ADDRESS": "http://r:2"}) == "http://r:2"
    assert sb.resolve_address(None, env={"RAY_ADDRESS": "auto"}, spec_address="http://s:3") == "http://s:3"
    assert sb.resolve_address("http://cli:4", env={"RAY_API_SERVER_ADDRESS": "http://h:1"},
                              spec_address="http://s:3") == "http://cli:4"
    with pytest.raises(sb.SubmitError, match="--address http://<head>:8265"):
        sb.resolve_address(None, env={"RAY_ADDRESS": "auto"}, spec_address="auto")
    for bad, match in (("auto", "not a Jobs API address"), ("ray://h:10001", "not a Jobs API address"),
                       ("http://", "not a valid address"), ("foo bar", "not a valid address"),
                       ("http://h:99999", "not a valid address"), ("http://h:8265/x", "not a valid address")):
        with pytest.raises(sb.SubmitError, match=match):
            sb.resolve_address(bad, env={})


# -- nothing reaches the cluster before the spec is valid ---------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, "job spec file not found"),
    ("train:\n  epochz: 3\n", "epochz"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("cluster:\n  env_vars:\n    AWS_SECRET_ACCESS_KEY: x\n", "looks like a credential"),
    ("tracking:\n  uri: http://bob:hunter2@mlflow:5000\n", "tracking.uri holds a password"),
])
def test_bad_spec_fails_before_contacting_the_cluster(tmp_path, capsys, no_network, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    rc = cli.main(["submit", str(path), "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.startswith("tvr submit: error:")
    assert "hunter2" not in err
    assert no_network == []


def test_bad_override_and_command(spec, capsys, no_network):
    assert cli.main(["submit", str(spec), "--address", "http://127.0.0.1:1", "train.lr=fast"]) == 1
    assert "train.lr" in capsys.readouterr().err
    with pytest.raises(sb.SubmitError, match="--command"):
        sb.prepare(spec, command="serve")
    assert no_network == []


def test_unreachable_address_is_one_clear_error(spec, capsys, clean_auth, monkeypatch):
    submitted = []
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setattr(JobSubmissionClient, "submit_job", lambda self, **kw: submitted.append(kw))
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    rc = cli.main(["submit", str(spec), "--address", address])
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot reach the Ray Jobs API at {address}" in err and "connection failed" in err
    assert "Traceback" not in err and submitted == [] and time.monotonic() - t0 < 30


def test_silent_server_times_out(spec, capsys, clean_auth):
    with socket.socket() as srv:  # accepts TCP connections (kernel backlog) but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        address = f"http://127.0.0.1:{srv.getsockname()[1]}"
        rc = cli.main(["jobs", "list", "--address", address, "--connect-timeout", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "tvr jobs list: error:" in err and address in err and "timed out" in err


class _Fixed(http.server.BaseHTTPRequestHandler):
    status = 404
    seen: list = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append(dict(self.headers))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"Unauthorized: Missing authentication token" if self.status == 401 else b"nope")

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(status: int) -> str:
        handler = type("H", (_Fixed,), {"status": status, "seen": []})
        srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler.seen

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_not_a_ray_dashboard(spec, capsys, clean_auth, http_server):
    address, _ = http_server(404)
    assert cli.main(["submit", str(spec), "--address", address]) == 1
    assert "not a Ray dashboard" in capsys.readouterr().err


@pytest.mark.parametrize("status, word", [(401, "missing"), (403, "wrong")])
def test_auth_refusal_names_the_source_not_the_token(spec, capsys, clean_auth, monkeypatch, http_server,
                                                     status, word):
    token = "tok-" + secrets.token_hex(12)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    address, seen = http_server(status)
    rc = cli.main(["submit", str(spec), "--address", address, "--auth-header", "X-Ray-Authorization"])
    out, err = capsys.readouterr()
    assert rc == 1 and f"HTTP {status}" in err and word in err and "RAY_AUTH_TOKEN" in err
    assert token not in out + err
    assert seen[0].get("X-Ray-Authorization") == f"Bearer {token}"  # it was sent, in the chosen header


# -- runtime_env: the code, the spec, the env ---------------------------------------------------

def _fake_checkout(root: Path) -> Path:
    files = {
        "pyproject.toml": "[project]\nname='x'\n", "tvr/__init__.py": "", "tvr/backbone.py": "x = 1\n",
        "platform/tvr_platform/__init__.py": "", "platform/tvr_platform/data/__init__.py": "",
        "platform/tvr_platform/data/manifest.py": "", "jobs/train.yaml": "{}\n", ".gitignore": "/data/\n",
        ".venv/lib/site.py": "", ".git/HEAD": "ref", "tvr-work/runs/ckpt.pt": "w", "mlruns/0/meta.yaml": "m",
        "data/videos/clip.mp4": "v", "infra/terraform/.terraform/provider": "bin", "infra/terraform/main.tf": "",
        "tvr/__pycache__/backbone.cpython-311.pyc": "c", "videos/a.mp4": "v",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_code_runtime_env_excludes_and_py_modules(tmp_path):
    root = _fake_checkout(tmp_path / "repo")
    env, (wd, mod) = sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root)
    assert env["working_dir"] == str(root)
    assert env["py_modules"] == [str(root / "platform" / "tvr_platform")]
    assert env["excludes"] == sb.DEFAULT_EXCLUDES
    assert wd.files == [".gitignore", "infra/terraform/main.tf", "jobs/train.yaml", "pyproject.toml",
                        "tvr/__init__.py", "tvr/backbone.py"]  # .gitignore drops data/, platform/ ships apart
    assert mod.files == ["__init__.py", "data/__init__.py", "data/manifest.py"]


def test_excludes_that_would_drop_code_are_refused(tmp_path):
    root = _fake_checkout(tmp_path / "repo")
    with pytest.raises(sb.SubmitError, match=r"data/__init__.py.*cluster.excludes"):
        sb.code_runtime_env([*sb.DEFAULT_EXCLUDES, "data/"], root)
    with pytest.raises(sb.SubmitError, match="tvr/backbone.py"):
        sb.code_runtime_env([*sb.DEFAULT_EXCLUDES, "backbone.py"], root)


def test_code_package_size_cap(tmp_path):
    root = _fake_checkout(tmp_path / "repo")
    (root / "jobs" / "big.json").write_bytes(b"0" * 300_000)
    with pytest.raises(sb.SubmitError, match=r"jobs/big.json \(0.3 MiB\).*\.gitignore or cluster.excludes"):
        sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root, max_bytes=200_000)


def test_installed_package_ships_both_packages_as_py_modules():
    import tvr
    import tvr_platform

    env, uploads = sb.code_runtime_env(sb.DEFAULT_EXCLUDES, None)
    assert "working_dir" not in env
    assert env["py_modules"] == [str(Path(tvr.__file__).parent), str(Path(tvr_platform.__file__).parent)]
    assert "cluster/submit.py" in uploads[1].files and "__init__.py" in uploads[0].files


def test_prepare_ships_checkout_resolved_spec_and_job_id(spec):
    sub = sb.prepare(spec, ["train.epochs=3", "cluster.entrypoint_num_gpus=1", "cluster.address=http://h:8265"],
                     command="check", now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert re.match(r"^tvr-smoke-train-20260102-030405-[0-9a-f]{4}$", sub.submission_id)
    kw = sub.submit_kwargs()
    assert kw["entrypoint"] == "python -m tvr_platform.cluster.launch check"
    assert (kw["entrypoint_num_cpus"], kw["entrypoint_num_gpus"]) == (0.5, 1.0)
    env = kw["runtime_env"]
    assert env["working_dir"] == str(ROOT) and env["py_modules"] == [str(ROOT / "platform" / "tvr_platform")]
    for pattern in (".venv/", ".git/", "/tvr-work/", "/mlruns/", "/platform/"):
        assert pattern in env["excludes"]
    shipped = set(sub.uploads[0].files)
    assert "tvr/__init__.py" in shipped and "pyproject.toml" in shipped
    assert not any(f.startswith((".venv/", ".git/", "tvr-work/", "platform/")) or "__pycache__" in f for f in shipped)
    assert {"__init__.py", "config.py", "cluster/launch.py", "data/__init__.py"} <= set(sub.uploads[1].files)
    ev = env["env_vars"]
    assert ev["TVR_RAY_JOB_ID"] == sub.submission_id and ev["TVR_TEST_MARK"] == "hello"
    assert ev["TVR_JOB_SPEC_NAME"] == "smoke train.yaml"
    shipped_spec = yaml.safe_load(ev["TVR_JOB_SPEC"])
    assert shipped_spec["train"]["epochs"] == 3 and shipped_spec["run"]["name"] == "smoke"
    assert shipped_spec["cluster"]["address"] == "auto" and sub.spec_address == "http://h:8265"
    assert sub.metadata["tvr_run"] == "smoke" and sub.metadata["tvr_command"] == "check"
    assert all(isinstance(v, str) for v in sub.metadata.values())
    assert len(sub.warnings) == 3  # relative work_dir, local storage, local MLflow
    assert shipped_spec["run"]["work_dir"] == "./tvr-work"  # as written: resolved on the cluster, not here


def test_shipped_spec_round_trips_through_the_launcher(spec, tmp_path, monkeypatch, capsys):
    from tvr_platform.cluster import launch
    from tvr_platform.config import load_job

    sub = sb.prepare(spec, ["run.name=roundtrip", "tracking.uri=http://mlflow:5000",
                            "storage.uri=s3://b/p", "run.work_dir=/mnt/tvr"], checkout=None)
    assert sub.warnings == []
    for k, v in sub.runtime_env["env_vars"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = launch.write_spec()
    assert path.name == "smoke train.yaml" and path.parent.name.startswith(sub.submission_id)
    job = load_job(path)
    assert (job.run.name, job.tracking.uri, job.cluster.address) == ("roundtrip", "http://mlflow:5000", "auto")
    assert launch.main(["check"]) == 0
    report = json.loads(capsys.readouterr().out.split("tvr-check ", 1)[1])
    assert report["job_id"] == sub.submission_id and report["run"] == "roundtrip"
    assert report["env_vars"] == {"TVR_TEST_MARK": "hello"}
    assert launch.main(["serve"]) == 2


def test_relative_paths_ship_as_written_absolute_ones_as_given(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_job would anchor relative paths here: a laptop path, useless on a cluster
    sub = sb.prepare(spec, ["run.work_dir=out", "storage.uri=ckpts", "tracking.uri=sqlite:///db/mlflow.db",
                            "data.root=/mnt/data/msrvtt"], checkout=None)
    shipped = yaml.safe_load(sub.runtime_env["env_vars"]["TVR_JOB_SPEC"])
    assert (shipped["run"]["work_dir"], shipped["storage"]["uri"], shipped["tracking"]["uri"]) == (
        "out", "ckpts", "sqlite:///db/mlflow.db")
    assert shipped["data"]["root"] == "/mnt/data/msrvtt"
    assert str(tmp_path) not in sub.spec_yaml
    assert any(w.startswith("run.work_dir='out' is not an absolute path") for w in sub.warnings)


@pytest.mark.parametrize("override", ["data.root=data/msrvtt", "model.backbone.pretrained=ckpt.pt"])
def test_relative_input_paths_are_rejected_before_submitting(spec, tmp_path, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    key = override.split("=")[0]
    with pytest.raises(sb.SubmitError, match=rf"^{re.escape(key)}=.* is a relative path: .*absolute path"):
        sb.prepare(spec, [override], checkout=None)


def test_ship_code_false_ships_no_code(spec):
    sub = sb.prepare(spec, ["cluster.ship_code=false"])
    assert set(sub.runtime_env) == {"env_vars"} and sub.uploads == [] and sub.metadata["tvr_git_revision"] == ""


# -- tokens and secrets -------------------------------------------------------------------------

def test_resolve_auth_sources_and_modes(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    tok_file = tmp_path / "tok"
    tok_file.write_text("file-token\n")
    assert sb.resolve_auth({"RAY_AUTH_TOKEN": "env-token"}, home=home).headers == {"Authorization": "Bearer env-token"}
    a = sb.resolve_auth({"RAY_AUTH_TOKEN_PATH": str(tok_file)}, header="X-Ray-Authorization", home=home)
    assert a.headers == {"X-Ray-Authorization": "Bearer file-token"} and str(tok_file) in a.source
    assert sb.resolve_auth({}, home=home).headers == {}
    (home / ".ray" / "auth_token").write_text("home-token")
    assert sb.resolve_auth({}, home=home).headers == {"Authorization": "Bearer home-token"}
    assert sb.resolve_auth({"RAY_AUTH_TOKEN": "env-token", "RAY_AUTH_TOKEN_PATH": str(tok_file)},
                           home=home).headers["Authorization"] == "Bearer env-token"  # Ray's order
    assert sb.resolve_auth({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "env-token"}, home=home).headers == {}
    for env, match in (({"RAY_AUTH_MODE": "token"}, "no token"),
                       ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, "no such file"),
                       ({"RAY_AUTH_MODE": "tokne"}, "RAY_AUTH_MODE"),
                       ({"RAY_AUTH_TOKEN": "two words"}, "whitespace")):
        with pytest.raises(sb.SubmitError, match=match) as info:
            sb.resolve_auth(env, home=tmp_path / "empty")
        assert "two words" not in str(info.value)
    with pytest.raises(sb.SubmitError, match="auth-header"):
        sb.resolve_auth({}, header="Cookie")
    shown = sb.resolve_auth({"RAY_AUTH_TOKEN": "env-token"}, home=home)
    assert "env-token" not in repr(shown) + str(shown)


def test_secrets_never_enter_the_submission(spec, monkeypatch, capsys, no_network):
    token, aws = "tok-" + secrets.token_hex(8), "aws-" + secrets.token_hex(8)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", aws)
    sub = sb.prepare(spec)
    blob = json.dumps(sub.submit_kwargs()) + sub.spec_yaml
    assert token not in blob and aws not in blob
    assert not any(sb_key in sub.runtime_env["env_vars"] for sb_key in
                   ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"))
    assert cli.main(["submit", str(spec), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert token not in out + err and aws not in out + err and sub.spec_yaml.strip()[:20] in out


# -- the argparse hook --------------------------------------------------------------------------

def test_add_subcommands_on_a_foreign_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="tvr")
    subs = parser.add_subparsers(dest="cmd", required=True)
    subs.add_parser("train").add_argument("spec")
    cli.add_subcommands(subs)
    a = parser.parse_args(["submit", "jobs/t.yaml", "--address", "http://h:8265", "train.lr=1", "--follow", "x=2"])
    assert (a.spec, a.overrides, a.address, a.follow, a.func) == (
        "jobs/t.yaml", ["train.lr=1", "x=2"], "http://h:8265", True, cli.cmd_submit)
    assert parser.parse_args(["train", "s.yaml"]).spec == "s.yaml"  # other parsers untouched
    a = parser.parse_args(["jobs", "logs", "tvr-x", "--follow"])
    assert (a.func, a.job_id, a.follow) == (cli.cmd_logs, "tvr-x", True)
    for name, func in (("status", cli.cmd_status), ("stop", cli.cmd_stop)):
        assert parser.parse_args(["jobs", name, "tvr-x"]).func is func
    assert parser.parse_args(["jobs", "list"]).func is cli.cmd_list


# -- a real cluster -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on 127.0.0.1 with the Jobs API and token auth on, in its own temp
    dir, HOME and process group; yields (address, token). Torn down by signalling that process group
    (not ``ray stop``, which would kill every Ray process on the machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="tvr-ray-", dir="/tmp"))  # short: Ray's unix sockets live here
    (tmp / "home").mkdir()
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop now, do not drain for 30 s
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # `python` = this env
    proc = None
    try:
        for attempt in range(3):  # a port picked by free_port() can be taken before Ray binds it: retry
            proc, address = _start_head(tmp / f"r{attempt}", env, token)
            if address:
                break
            _stop(proc, str(tmp / f"r{attempt}"))
        else:
            raise RuntimeError(f"ray start failed 3 times: {(tmp / 'r2.log').read_text()[-4000:]}")
        yield address, token
    finally:
        if proc is not None:
            _stop(proc, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def _start_head(temp_dir: Path, env: dict, token: str) -> tuple[subprocess.Popen, str | None]:
    import requests

    dash = free_port()
    ports = {f"--{name}": free_port() for name in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=true", f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
           "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    with open(f"{temp_dir}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            r = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.status_code == 200:
                return proc, address
        except requests.exceptions.RequestException:
            pass
        time.sleep(1)
    return proc, None


def _stop(proc: subprocess.Popen, marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _kill_leftovers(marker)


def _kill_leftovers(marker: str) -> None:
    """Ray workers that left the process group: kill those (and only those) started under our temp dir."""
    import psutil

    time.sleep(1)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


def _submitted_id(out: str) -> str:
    m = re.search(r"^submitted (\S+) to ", out, re.MULTILINE)
    assert m, out
    return m.group(1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_to_a_real_cluster(ray_head, spec, capsys, clean_auth, monkeypatch):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    rc = cli.main(["submit", str(spec), "--address", address, "--command", "check", "--follow",
                   "run.name=submit-smoke", "tracking.uri=http://mlflow:5000"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    job_id = _submitted_id(out)
    assert re.match(r"^tvr-smoke-train-\d{8}-\d{6}-[0-9a-f]{4}$", job_id)
    report = json.loads(out.split("tvr-check ", 1)[1].splitlines()[0])
    assert report["job_id"] == job_id and report["run"] == "submit-smoke" and report["cluster_address"] == "auto"
    assert report["env_vars"] == {"TVR_TEST_MARK": "hello"}
    # the code came from the uploaded packages, not from this checkout
    assert "runtime_resources" in report["tvr"] and "runtime_resources" in report["tvr_platform"]
    assert not report["tvr"].startswith(str(ROOT)) and f"job {job_id} SUCCEEDED" in out
    assert token not in out + err

    assert cli.main(["jobs", "status", job_id, "--address", address]) == 0
    out = capsys.readouterr().out
    assert f"{job_id}: SUCCEEDED" in out and "tvr_run: submit-smoke" in out
    assert cli.main(["jobs", "logs", job_id, "--address", address]) == 0
    assert "tvr-check" in capsys.readouterr().out
    assert cli.main(["jobs", "list", "--address", address]) == 0
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s+\S+ \S+\s+submit-smoke", capsys.readouterr().out, re.MULTILINE)
    assert cli.main(["jobs", "status", "tvr-no-such-job", "--address", address]) == 1
    assert "tvr-no-such-job" in capsys.readouterr().err

    # the wrong token, or none: one clear error, nothing submitted
    for var, value in (("RAY_AUTH_TOKEN", "0" * 32), ("RAY_AUTH_MODE", "disabled")):
        monkeypatch.setenv(var, value)
        assert cli.main(["submit", str(spec), "--address", address]) == 1
        err = capsys.readouterr().err
        assert "refused the request" in err and token not in err and "0" * 32 not in err
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert cli.main(["jobs", "list", "--address", address]) == 0
    assert capsys.readouterr().out.count("tvr-smoke-train-") == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_a_running_job(ray_head, capsys, clean_auth, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    job_id = client.submit_job(entrypoint="python -c 'import time; time.sleep(120)'", submission_id="tvr-sleeper")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id)) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cli.main(["jobs", "stop", job_id, "--address", address]) == 0
    assert f"stop requested for {job_id}" in capsys.readouterr().out
    assert cli.main(["jobs", "logs", job_id, "--follow", "--address", address]) == 1  # ends STOPPED
    assert f"job {job_id} STOPPED" in capsys.readouterr().err
    assert cli.main(["jobs", "stop", job_id, "--address", address]) == 0
    assert "already ended (STOPPED)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_submitted_training_job_logs_to_mlflow_under_its_ray_job_id(ray_head, spec, tmp_path, capsys, clean_auth,
                                                                    monkeypatch):
    """A tiny `tvr train` job through the Jobs API: logs followed to SUCCEEDED, the run URL printed by
    the job, and its MLflow run tagged with the submission id."""
    from mlflow.tracking import MlflowClient

    from tiny import tiny_overrides
    from tvr_platform.config import load_job
    from tvr_platform.data.pipeline import synth_dataset

    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    overrides = [*tiny_overrides(tmp_path / "work"), "train.epochs=1", "run.name=submitted-tiny",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    job = load_job(spec, overrides)
    synth_dataset(job)  # the cluster shares this machine's disk: the job reads these clips
    rc = cli.main(["submit", str(spec), "--address", address, "--follow", *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, out[-6000:] + err[-3000:]
    job_id = _submitted_id(out)
    assert f"job {job_id} SUCCEEDED" in out
    printed = re.search(r"\[tvr\] MLflow run: (sqlite:///\S+) experiment (\S+) run ([0-9a-f]{32})", out)
    assert printed, out[-6000:]

    client = MlflowClient(job.tracking_uri)
    run = client.get_run(printed.group(3))
    assert run.info.experiment_id == printed.group(2) and run.info.status == "FINISHED"
    assert run.data.tags["tvr.ray_job_id"] == job_id and run.data.tags["tvr.run_name"] == "submitted-tiny"
    assert run.data.params["train.epochs"] == "1" and "final/test/t2v_R1" in run.data.metrics
    assert token not in out + err


def test_launcher_links_the_ray_submission_id_when_tvr_submit_did_not():
    from tvr_platform.cluster import launch

    config = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "rayjob-abc", "job_name": "x"}})
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": config}
    assert launch.link_job_id(env) == "rayjob-abc" and env["TVR_RAY_JOB_ID"] == "rayjob-abc"
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": config, "TVR_RAY_JOB_ID": "tvr-train-1"}
    assert launch.link_job_id(env) == "tvr-train-1"  # tvr submit's id wins (it is the same id)
    for env in ({}, {"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}, {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}):
        assert launch.link_job_id(env) is None and "TVR_RAY_JOB_ID" not in env


def test_tracker_url_is_the_run_page_on_a_tracking_server():
    from types import SimpleNamespace

    from tvr_platform.tracking import Tracker

    run = SimpleNamespace(info=SimpleNamespace(experiment_id="7"))

    class Fixed(Tracker):
        @property
        def client(self):
            return SimpleNamespace(get_run=lambda run_id: run)

    assert Fixed("http://mlflow.tvr.svc:5000/", "ab12").url() == "http://mlflow.tvr.svc:5000/#/experiments/7/runs/ab12"
    assert Fixed("sqlite:////w/mlflow.db", "ab12").url() == "sqlite:////w/mlflow.db experiment 7 run ab12"


def test_driver_leaves_the_jobs_env_vars_to_the_job():
    """Ray rejects a driver ray.init runtime_env naming a variable the submitted job already sets."""
    from tvr_platform.cluster import launch

    sub_env = {"runtime_env": {"env_vars": {"TVR_TEST_MARK": "hello", "TVR_RAY_JOB_ID": "tvr-x"}}, "metadata": {}}
    assert launch.job_env_var_names({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(sub_env)}) == {
        "TVR_TEST_MARK", "TVR_RAY_JOB_ID"}
    assert launch.job_env_var_names({}) == set()


def _git_checkout(tmp_path):
    import subprocess

    root = _fake_checkout(tmp_path / "repo")
    shutil.rmtree(root / ".git", ignore_errors=True)      # the fake one: a real repository instead
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    return root


def test_only_git_tracked_files_and_named_ones_are_shipped(tmp_path):
    root = _git_checkout(tmp_path)
    (root / "scratch.txt").write_text("untracked notes")
    (root / "jobs" / "mine.yaml").write_text("run: {name: mine}\n")
    env, (wd, _) = sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root, ship_untracked=["jobs/*.yaml"])
    assert "scratch.txt" not in wd.files and "jobs/mine.yaml" in wd.files and "tvr/backbone.py" in wd.files
    assert "/scratch.txt" in env["excludes"]


@pytest.mark.parametrize("secret", [".env", ".aws/credentials", "id_rsa", ".netrc", "secrets.json"])
def test_known_secret_files_are_refused_even_when_tracked(tmp_path, secret):
    import subprocess

    root = _git_checkout(tmp_path)
    (root / secret).parent.mkdir(parents=True, exist_ok=True)
    (root / secret).write_text("AWS_SECRET_ACCESS_KEY=abc")
    subprocess.run(["git", "add", "-f", secret], cwd=root, check=True)
    with pytest.raises(sb.SubmitError, match=rf"refusing to ship credential file\(s\) {re.escape(secret)}"):
        sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + f"\n{secret}\n")
    subprocess.run(["git", "rm", "-q", "--cached", secret], cwd=root, check=True)
    _, (wd, _) = sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root)   # ignored and untracked: stays home
    assert secret not in wd.files


def test_the_real_checkout_ships_no_secret_file():
    root = sb.find_checkout()
    if root is None:
        pytest.skip("not running from a checkout")
    _, uploads = sb.code_runtime_env(sb.DEFAULT_EXCLUDES, root)
    assert not sb.secret_files(f for u in uploads for f in u.files)
