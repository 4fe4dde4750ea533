"""Offline validation of ``infra/``: every YAML manifest parses; RayCluster / RayJob use only the
KubeRay v1 fields we know (a small schema below); GPU worker groups agree with the ViT-bigG-14
memory plan (``tvr_platform.cluster.capacity``); no secret is written in any file; the Dockerfiles
pass a structural lint; Terraform is formatted and validates (when a ``terraform`` binary and a
local provider mirror exist, else skipped with the reason)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TERRAFORM = INFRA / "terraform" / "aws"
KUSTOMIZATIONS = [INFRA / "kuberay", INFRA / "mlflow", INFRA / "minio"]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.y*ml") if ".terraform" not in p.parts)


def documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files() for d in yaml.safe_load_all(p.read_text()) if d is not None]


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in documents() if d.get("kind") == kind]


# -- a small schema of the KubeRay v1 fields we use ---------------------------------------------
# Field names from ray-project/kuberay ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go
# (json tags) and the KubeRay >= 1.6 token-auth API (spec.authOptions.mode). A key not listed is
# a typo or a field this KubeRay version does not know: the operator would silently ignore it.
ANY = object()  # a value we do not descend into (Kubernetes core types: pod templates, services)

POD_TEMPLATE = ANY
AUTOSCALER_OPTIONS = {"resources": ANY, "image": str, "imagePullPolicy": str, "securityContext": ANY,
                      "idleTimeoutSeconds": int, "upscalingMode": str, "env": ANY, "envFrom": ANY,
                      "volumeMounts": ANY}
HEAD_GROUP = {"template": POD_TEMPLATE, "headService": ANY, "enableIngress": bool, "rayStartParams": dict,
              "serviceType": str}
WORKER_GROUP = {"suspend": bool, "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                "idleTimeoutSeconds": int, "rayStartParams": dict, "template": POD_TEMPLATE,
                "scaleStrategy": ANY, "numOfHosts": int}
RAY_CLUSTER_SPEC = {"suspend": bool, "managedBy": str, "autoscalerOptions": AUTOSCALER_OPTIONS,
                    "headServiceAnnotations": dict, "enableInTreeAutoscaling": bool,
                    "gcsFaultToleranceOptions": ANY, "headGroupSpec": HEAD_GROUP, "rayVersion": str,
                    "workerGroupSpecs": [WORKER_GROUP], "authOptions": {"mode": str}}
RAY_JOB_SPEC = {"activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": RAY_CLUSTER_SPEC,
                "submitterPodTemplate": POD_TEMPLATE, "metadata": dict, "clusterSelector": dict,
                "submitterConfig": {"backoffLimit": int}, "managedBy": str, "deletionPolicy": str,
                "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
                "entrypointResources": str, "entrypointNumCpus": (int, float),
                "entrypointNumGpus": (int, float), "ttlSecondsAfterFinished": int,
                "shutdownAfterJobFinishes": bool, "suspend": bool}
REQUIRED = {"headGroupSpec": ("template", "rayStartParams"),
            "workerGroupSpecs": ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template")}
ENUMS = {"upscalingMode": {"Default", "Aggressive", "Conservative"}, "mode": {"token", "disabled"},
         "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
         "deletionPolicy": {"DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"}}


def schema_errors(value: Any, schema: Any, where: str) -> list[str]:
    """Unknown keys, wrong types, missing required keys and bad enum values under ``where``."""
    if schema is ANY:
        return []
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        errors = [f"{where}.{k}: not a KubeRay v1 field" for k in value if k not in schema]
        leaf = where.rsplit(".", 1)[-1].split("[")[0]
        errors += [f"{where}.{k}: required" for k in REQUIRED.get(leaf, ()) if k not in value]
        for k, v in value.items():
            if k in schema:
                errors += schema_errors(v, schema[k], f"{where}.{k}")
                if k in ENUMS and v not in ENUMS[k]:
                    errors.append(f"{where}.{k}: {v!r} is not one of {sorted(ENUMS[k])}")
        return errors
    if schema is int and isinstance(value, bool) or not isinstance(value, schema):
        return [f"{where}: expected {getattr(schema, '__name__', schema)}, got {type(value).__name__}"]
    return []


def pod_templates(kind: str, spec: dict) -> list[tuple[str, dict]]:
    cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def ray_objects() -> list[tuple[Path, dict]]:
    return by_kind("RayCluster") + by_kind("RayJob")


# -- parsing ------------------------------------------------------------------------------------

def test_every_yaml_file_parses_and_names_its_kind():
    files = yaml_files()
    assert len(files) >= 10, files
    for path, doc in documents():
        assert isinstance(doc, dict), path
        assert doc.get("kind") and (doc.get("apiVersion") or path.name == "kustomization.yaml"), path
    kinds = {d["kind"] for _, d in documents()}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "ConfigMap", "ServiceAccount",
            "Kustomization"} <= kinds


def test_ray_objects_use_only_known_kuberay_fields():
    objects = ray_objects()
    assert {d["kind"] for _, d in objects} == {"RayCluster", "RayJob"}
    for path, doc in objects:
        assert doc["apiVersion"] == "ray.io/v1", path
        schema = RAY_CLUSTER_SPEC if doc["kind"] == "RayCluster" else RAY_JOB_SPEC
        assert schema_errors(doc["spec"], schema, f"{path.name}:spec") == []


def test_the_schema_check_catches_typos_and_bad_values():
    spec = {"entrypoint": "x", "shutdownAfterJobFinish": True, "ttlSecondsAfterFinished": "600",
            "submissionMode": "Batch",
            "rayClusterSpec": {"headGroupSpec": {"template": {}}, "authOptions": {"mode": "tokens"},
                               "workerGroupSpecs": [{"groupName": "g", "replica": 1}]}}
    errors = schema_errors(spec, RAY_JOB_SPEC, "spec")
    for expected in ("spec.shutdownAfterJobFinish: not a KubeRay v1 field",
                     "spec.ttlSecondsAfterFinished: expected int", "spec.submissionMode: 'Batch'",
                     "spec.rayClusterSpec.headGroupSpec.rayStartParams: required",
                     "spec.rayClusterSpec.authOptions.mode: 'tokens'",
                     "spec.rayClusterSpec.workerGroupSpecs[0].replica: not a KubeRay v1 field",
                     "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas: required"):
        assert any(e.startswith(expected) for e in errors), (expected, errors)


def test_ray_pods_are_complete():
    """Every Ray container: pinned image, requests == limits (KubeRay sizes Ray's resources from
    them), the shared env; the head exposes the GCS, dashboard and client ports."""
    for path, doc in ray_objects():
        for group, template in pod_templates(doc["kind"], doc["spec"]):
            containers = {c["name"]: c for c in template["spec"]["containers"]}
            ray = containers["ray-head" if group == "head" else "ray-worker"]
            assert ray["resources"]["requests"] == ray["resources"]["limits"], (path, group)
            assert {"configMapRef": {"name": "tvr-env"}} in ray["envFrom"], (path, group)
            assert template["spec"]["serviceAccountName"] == "tvr-ray", (path, group)
            for c in containers.values():
                assert image_is_pinned(c["image"]) or c["image"] == "tvr-worker", (path, group, c["image"])
            if group == "head":
                ports = {p["containerPort"] for p in ray["ports"]}
                assert {6379, 8265, 10001} <= ports, (path, ports)


def image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# -- RayJob: lifecycle, logs, the shipped spec ------------------------------------------------

def test_rayjob_template_cleans_up_keeps_logs_and_ships_a_valid_spec(tmp_path):
    from tvr_platform.config import load_job

    ((path, job),) = by_kind("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["entrypoint"] == "python -m tvr_platform.cluster.launch train"
    assert "deletionPolicy" not in spec  # incompatible with shutdownAfterJobFinishes
    for group, template in pod_templates("RayJob", spec):  # log persistence: a shipper beside every Ray pod
        containers = {c["name"]: c for c in template["spec"]["containers"]}
        mounts = {m["mountPath"] for m in containers["fluent-bit"]["volumeMounts"]}
        assert "/tmp/ray" in mounts, group
    ((_, fluent),) = [(p, d) for p, d in by_kind("ConfigMap") if d["metadata"]["name"] == "fluent-bit-ray-logs"]
    conf = fluent["data"]["fluent-bit.conf"]
    assert "/tmp/ray/session_latest/logs/job-driver-*.log" in conf and re.search(r"Name\s+s3", conf)

    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    shipped = tmp_path / env["TVR_JOB_SPEC_NAME"]
    shipped.write_text(env["TVR_JOB_SPEC"])
    cfg = load_job(shipped)
    assert cfg.cluster.ship_code is False and cfg.cluster.address == "auto"
    assert cfg.tracking.uri.startswith("http://mlflow.") and cfg.storage.uri.startswith("s3://")
    assert cfg.model.backbone.name == "ViT-bigG-14" and cfg.train.strategy == "deepspeed"
    assert cfg.train.zero_stage == 3 and cfg.train.use_gpu


# -- the memory plan ----------------------------------------------------------------------------

def _quantity(q: str | int) -> float:
    """Kubernetes quantity -> number (cpu in cores, memory in GiB)."""
    q = str(q)
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "m": 1e-3}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def gpu_groups() -> list[tuple[str, dict, dict]]:
    out = []
    for path, doc in ray_objects():
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for g in cluster["workerGroupSpecs"]:
            (ray,) = [c for c in g["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
            if "nvidia.com/gpu" in ray["resources"]["limits"]:
                out.append((f"{path.name}:{g['groupName']}", g, ray))
    return out


def test_gpu_groups_follow_the_bigG_zero3_memory_plan():
    from tvr_platform.cluster import capacity

    shape = capacity.model_shape("ViT-bigG-14")
    groups = gpu_groups()
    assert len(groups) >= 3
    for name, group, ray in groups:
        node = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        inst = capacity.INSTANCES[node]
        gpus = int(ray["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == inst["gpus"] == 8 and inst["gpu_mem_gib"] >= 80, name  # one pod = one 8 x 80 GB node
        assert _quantity(ray["resources"]["limits"]["cpu"]) <= 0.95 * inst["vcpus"], name
        assert _quantity(ray["resources"]["limits"]["memory"]) <= 0.9 * inst["mem_gib"], name
        for nodes in {max(group["minReplicas"], 1), group["maxReplicas"]}:
            clips = capacity.max_clips_per_gpu(shape, stage=3, gpus=gpus * nodes, gpu_mem_gib=inst["gpu_mem_gib"],
                                               frames=12, checkpointing=True)
            assert clips >= 32, (name, nodes, clips)
        tolerations = group["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations, name


def test_the_numbers_in_the_comments_are_the_plan():
    """raycluster.yaml states the arithmetic; it must agree with capacity.py."""
    from tvr_platform.cluster import capacity

    shape = capacity.model_shape("ViT-bigG-14")
    text = (INFRA / "kuberay" / "raycluster.yaml").read_text()
    assert f"Psi = {shape.params:,}" in text
    states = {}
    for gpus in (8, 16, 32):
        states[gpus] = capacity.model_state_bytes(shape.params, stage=3, gpus=gpus) / capacity.GB
        assert re.search(rf"N = +{gpus} .*= {states[gpus]:.1f} GB per GPU", text), (gpus, states[gpus])
    usable = (capacity.USABLE_FRACTION * 80 * capacity.GiB - capacity.OVERHEAD) / capacity.GB
    clip = capacity.clip_activation_bytes(shape, frames=12, checkpointing=True) / capacity.GB
    ceiling = capacity.max_clips_per_gpu(shape, stage=3, gpus=16, gpu_mem_gib=80, frames=12, checkpointing=True)
    assert f"= {usable:.1f} GB" in text and f"{clip:.2f} GB per 12-frame clip" in text
    assert f"16 clips = {16 * clip:.1f} GB, {states[16]:.1f} + {16 * clip:.1f} = {states[16] + 16 * clip:.1f} GB" in text
    assert f"(ceiling: {ceiling} clips per GPU)" in text


def test_gpu_sizing_is_the_memory_plan_row_for_bigG():
    """docs/memory-plan.md names the nodes x GPUs for ViT-bigG-14; the RayJob template runs exactly that."""
    plan = ROOT / "docs" / "memory-plan.md"
    if not plan.is_file():
        pytest.skip("docs/memory-plan.md is not in this checkout")
    row = next(line for line in plan.read_text().splitlines() if line.startswith("| ViT-bigG-14 |") and "node" in line)
    nodes, per_node = map(int, re.search(r"(\d+) nodes? × (\d+) GPUs", row).groups())
    assert "ZeRO-3" in row
    ((_, job),) = by_kind("RayJob")
    (group,) = [g for name, g, _ in gpu_groups() if name.startswith("rayjob.yaml")]
    (ray,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    assert (group["replicas"], int(ray["resources"]["limits"]["nvidia.com/gpu"])) == (nodes, per_node)
    spec = yaml.safe_load(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["TVR_JOB_SPEC"])
    assert spec["model"]["backbone"]["grad_checkpointing"] is True  # "checkpointing required"


def test_rayjob_workers_match_its_gpus_and_batch_fits():
    from tvr_platform.cluster import capacity

    ((_, job),) = by_kind("RayJob")
    spec = yaml.safe_load(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["TVR_JOB_SPEC"])
    gpus = sum(int(ray["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for name, g, ray in gpu_groups() if name.startswith("rayjob.yaml"))
    assert spec["train"]["num_workers"] == gpus
    shape = capacity.model_shape("ViT-bigG-14")
    fits = capacity.max_clips_per_gpu(shape, stage=3, gpus=gpus, gpu_mem_gib=80, frames=spec["data"]["num_frames"],
                                      checkpointing=True)
    assert spec["data"]["batch_size"] <= fits


def test_terraform_gpu_node_group_is_the_planned_instance():
    from tvr_platform.cluster import capacity

    variables = (TERRAFORM / "variables.tf").read_text()
    default = re.search(r'variable "gpu_instance_types".*?default\s*=\s*\[([^\]]*)\]', variables, re.S)
    types = re.findall(r'"([^"]+)"', default.group(1))
    assert types and all(capacity.INSTANCES[t]["gpus"] == 8 and capacity.INSTANCES[t]["gpu_mem_gib"] >= 80
                         for t in types)
    groups = {g["template"]["spec"]["nodeSelector"]["tvr.io/pool"] for _, g, _ in gpu_groups()}
    assert groups == {"gpu"} and '"tvr.io/pool" = each.key' in (TERRAFORM / "eks.tf").read_text()


# -- secrets --------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URI": re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:$]+:(?!\$\()[^/@\s]+@", re.I),
    "password assignment": re.compile(r"(?i)\b(password|passwd|secret|token)\b\s*[:=]\s*['\"][^'\"$]{6,}['\"]"),
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_no_secret_is_written_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file() and ".terraform" not in p.parts]
    assert len(files) >= 15
    for path in files:
        assert secret_findings(path.read_text()) == [], path
    assert by_kind("Secret") == []  # Secrets are created with kubectl, never committed


def test_secret_looking_env_vars_come_from_secrets():
    from tvr_platform.cluster.config import SECRET_NAME

    def envs(node: Any):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "env" and isinstance(v, list):
                    yield from v
                else:
                    yield from envs(v)
        elif isinstance(node, list):
            for item in node:
                yield from envs(item)

    checked = 0
    for path, doc in documents():
        for env in envs(doc):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (path, env["name"])
                checked += 1
    assert checked >= 2  # the Postgres and MLflow database passwords


def test_the_secret_scan_finds_planted_secrets():
    planted = ("key: AKIAIOSFODNN7EXAMPLE\n", "uri: postgresql://mlflow:hunter2@db:5432/mlflow\n",
               "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
               "-----BEGIN RSA PRIVATE KEY-----\n", 'password: "correct-horse"\n')
    for text in planted:
        assert secret_findings(text), text
    assert secret_findings("value: postgresql://$(DB_USER):$(DB_PASSWORD)@db:5432/mlflow\n") == []


# -- kustomize ------------------------------------------------------------------------------------

def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomizations_render(folder):
    cmd = _kustomize()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed: kustomize rendering not checked")
    out = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs and all(d["metadata"].get("namespace") == "tvr" for d in docs if d["kind"] != "Namespace")
    images = re.findall(r"image: (\S+)", out.stdout)
    assert images and all(image_is_pinned(i) for i in images), images


# -- Dockerfiles ----------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def lint_dockerfile(text: str) -> list[str]:
    """A minimal hadolint: pinned bases, a non-root final user, pinned pip installs, clean apt, no secrets."""
    problems = []
    ins = dockerfile_instructions(text)
    args = {m.group(1): m.group(2) for kind, rest in ins if kind == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", rest)] if m}
    stages = []
    for kind, rest in ins:
        if kind == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)),
                           [w for w in rest.split() if not w.startswith("--")][0])
            stages.append(image)
            if not image_is_pinned(image):
                problems.append(f"FROM {image}: pin a version tag (not latest)")
        elif kind == "COPY" and "--from=" in rest:
            source = re.search(r"--from=(\S+)", rest).group(1)
            if ("/" in source or ":" in source) and not image_is_pinned(source):
                problems.append(f"COPY --from={source}: pin the image")
        elif kind == "ADD" and re.search(r"https?://", rest):
            problems.append("ADD <url>: use curl in RUN with a checksum")
        elif kind in ("ENV", "ARG") and re.search(r"(?i)(secret|password|token|access_key)\w*=\S", rest):
            problems.append(f"{kind} {rest.split('=')[0]}: no credentials in images")
        elif kind == "RUN":
            if "apt-get install" in rest and ("--no-install-recommends" not in rest
                                              or "rm -rf /var/lib/apt/lists" not in rest):
                problems.append("RUN apt-get install: use --no-install-recommends and clean the lists")
            for cmd in re.findall(r"pip install ([^&;]+)", rest):
                for token in cmd.split():
                    if token.startswith(("-", "/", ".", "$")) or token.endswith(".whl") or "://" in token:
                        continue
                    if not re.search(r"[=<>~]", token):
                        problems.append(f"pip install {token}: pin a version")
        elif kind == "WORKDIR" and not rest.startswith("/"):
            problems.append(f"WORKDIR {rest}: use an absolute path")
    users = [rest for kind, rest in ins if kind == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("the final stage must run as a non-root USER")
    if not stages:
        problems.append("no FROM")
    problems += [f"secret: {name}" for name in secret_findings(text)]
    return problems


DOCKERFILES = sorted((INFRA / "docker").glob("*Dockerfile"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_the_lint(path):
    assert lint_dockerfile(path.read_text()) == []


def test_worker_image_recipe_has_what_workers_need():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    froms = [rest for kind, rest in ins if kind == "FROM"]
    assert len(froms) == 2 and all(f.startswith("nvidia/cuda:") for f in froms)  # CUDA build + runtime
    assert "devel" in froms[0] and "runtime" in froms[1]
    run = " ".join(rest for kind, rest in ins if kind == "RUN")
    assert re.search(r"DS_BUILD_FUSED_ADAM=1", text) and "--no-build-isolation" in run  # DeepSpeed ops prebuilt
    assert "import av, deepspeed, open_clip, ray, torch, tvr, tvr_platform" in run
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "deepspeed", "ray"):
        version = re.search(rf"{package}(?:\[[^\]]*\])?==([\d.]+)", run).group(1)
        spec = next(p for p in pins if re.match(rf"{package}\b", p))
        low = re.search(r">=([\d.]+)", spec).group(1)
        assert tuple(map(int, version.split("."))) >= tuple(map(int, low.split("."))), (package, version, spec)
    ignore = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "**" and "!tvr/" in ignore and "!platform/" in ignore  # an allow-list context


def test_the_lint_finds_planted_problems():
    bad = ("FROM python:latest\nARG API_TOKEN=abc123\nWORKDIR app\n"
           "RUN apt-get update && apt-get install -y curl\nRUN pip install requests numpy==2.0\n"
           "COPY --from=ghcr.io/astral-sh/uv /uv /uv\nADD https://example.org/x.tgz /x\n")
    problems = lint_dockerfile(bad)
    for expected in ("FROM python:latest", "ARG API_TOKEN", "WORKDIR app", "RUN apt-get install",
                     "pip install requests", "COPY --from=ghcr.io/astral-sh/uv", "ADD <url>", "non-root USER"):
        assert any(p.startswith(expected) or expected in p for p in problems), (expected, problems)
    assert not any("numpy" in p for p in problems)


# -- Terraform ------------------------------------------------------------------------------------

def test_terraform_buckets_are_encrypted_private_versioned_and_roles_scoped():
    """Structural checks that need no terraform binary."""
    s3 = (TERRAFORM / "s3.tf").read_text()
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert re.search(rf"{flag}\s*=\s*true", s3), flag
    assert re.search(r'sse_algorithm\s*=\s*"aws:kms"', s3) and re.search(r'status\s*=\s*"Enabled"', s3)
    assert "aws:SecureTransport" in s3 and "BucketOwnerEnforced" in s3
    buckets = re.search(r"buckets = \{\n(.*?)\n\s*\}\n", s3, re.S).group(1)
    assert {"videos", "checkpoints", "mlflow"} == set(re.findall(r"^\s*(\w+)\s*=", buckets, re.M))
    iam = (TERRAFORM / "iam.tf").read_text()
    assert "sts:AssumeRoleWithWebIdentity" in iam and "system:serviceaccount:" in iam
    assert '"s3:*"' not in iam and not re.search(r'resources\s*=\s*\["\*"\]', iam)  # scoped to the buckets
    for sa in ("tvr-ray", "tvr-mlflow"):
        assert f'service_account = "{sa}"' in iam
        assert any(d["metadata"]["name"] == sa and "eks.amazonaws.com/role-arn" in d["metadata"]["annotations"]
                   for _, d in by_kind("ServiceAccount"))


def _plugin_dir() -> Path | None:
    for candidate in (os.environ.get("TVR_TF_PLUGIN_DIR"), "/opt/tf-plugins",
                      str(Path.home() / ".terraform.d" / "plugins")):
        if candidate and (Path(candidate) / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            return Path(candidate)
    return None


def _terraform(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    return subprocess.run(["terraform", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_terraform_fmt():
    if shutil.which("terraform") is None:
        pytest.skip("no terraform binary on PATH: `terraform fmt -check` not run (install Terraform >= 1.5)")
    out = _terraform("fmt", "-check", "-recursive", "-diff", cwd=TERRAFORM)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(300)
def test_terraform_validate(tmp_path):
    if shutil.which("terraform") is None:
        pytest.skip("no terraform binary on PATH: `terraform validate` not run (install Terraform >= 1.5)")
    plugins = _plugin_dir()
    if plugins is None:
        pytest.skip("no local provider mirror with hashicorp/aws (set TVR_TF_PLUGIN_DIR, or /opt/tf-plugins): "
                    "`terraform validate` needs the provider and CI is offline")
    work = tmp_path / "aws"
    shutil.copytree(TERRAFORM, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    init = _terraform("init", "-backend=false", "-input=false", f"-plugin-dir={plugins}", cwd=work)
    assert init.returncode == 0, init.stdout + init.stderr
    out = _terraform("validate", "-no-color", cwd=work)
    assert out.returncode == 0 and "Success" in out.stdout, out.stdout + out.stderr


# -- security: authenticated MLflow, network allow-lists, non-root pods, no secret on a command line --

def _containers(doc: dict) -> list[tuple[dict, dict]]:
    """(pod spec, container) of every pod template in a Deployment / StatefulSet / RayCluster / RayJob."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                out.extend((node, c) for c in node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc.get("spec", {}))
    return out


def test_mlflow_requires_login_and_keeps_passwords_off_the_command_line():
    ((_, deploy),) = [(p, d) for p, d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    ((_, c),) = _containers(deploy)
    argv = [*c["command"], *c["args"]]
    assert "--app-name=basic-auth" in argv
    assert not any("PASSWORD" in a or "$(DB_" in a or "backend-store-uri" in a for a in argv), argv
    env = {e["name"]: e for e in c["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "DB_PASSWORD"):
        assert "secretKeyRef" in env[key]["valueFrom"], key
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    for _, d in by_kind("StatefulSet"):
        for _, pc in _containers(d):
            assert not any("PASSWORD" in str(a) for a in [*pc.get("command", []), *pc.get("args", [])])
    # Ray pods log in to MLflow with a Secret, not anonymously
    for kind in ("RayCluster", "RayJob"):
        for _, d in by_kind(kind):
            for _, rc in _containers(d):
                if rc["name"].startswith("ray"):
                    refs = {e.get("secretRef", {}).get("name") for e in rc.get("envFrom", [])}
                    assert "tvr-mlflow-client" in refs, (kind, rc["name"])


def test_network_policies_allow_only_ray_and_ingress_to_mlflow_and_only_the_head_to_the_dashboard():
    pols = {d["metadata"]["name"]: d["spec"] for _, d in by_kind("NetworkPolicy")}
    mlflow = pols["mlflow-ingress"]
    assert mlflow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    (rule,) = mlflow["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5000] and len(rule["from"]) == 2
    pg = pols["mlflow-postgres-ingress"]
    assert pg["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    head = pols["ray-head-ingress"]
    assert head["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    for rule in head["ingress"]:
        sources = [f["podSelector"]["matchLabels"] for f in rule["from"]]
        if sources != [{"ray.io/node-type": "head"}]:          # anyone but the head: never port 8265
            assert "ports" in rule
            assert not any(p["port"] <= 8265 <= p.get("endPort", p["port"]) for p in rule["ports"]), rule


def test_pods_run_non_root_without_privilege_escalation():
    for kind in ("Deployment", "StatefulSet", "RayCluster", "RayJob"):
        for path, d in by_kind(kind):
            for pod, c in _containers(d):
                if c["name"] == "fluent-bit" or kind == "RayJob" and c["name"] not in ("ray-head", "ray-worker"):
                    continue
                sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
                where = f"{path.name}:{d['metadata']['name']}:{c['name']}"
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), where
                assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
                if kind in ("Deployment", "StatefulSet") and d["metadata"]["name"].startswith("mlflow"):
                    assert sc.get("readOnlyRootFilesystem") is True, where


def test_log_shipping_never_uploads_the_runtime_env_logs():
    """runtime_env / dashboard / job supervisor logs echo TVR_JOB_SPEC: they are not shipped to S3."""
    ((_, fluent),) = [(p, d) for p, d in by_kind("ConfigMap") if d["metadata"]["name"] == "fluent-bit-ray-logs"]
    conf = fluent["data"]["fluent-bit.conf"]
    (paths,) = re.findall(r"^\s*Path\s+(\S+)", conf, re.M)
    assert all(not p.endswith("/*") for p in paths.split(",")), paths
    assert all(any(p.rsplit("/", 1)[1].startswith(k) for k in ("job-driver-", "worker-")) for p in paths.split(","))
    assert "runtime_env" in conf.split("Exclude_Path", 1)[1].splitlines()[0]
