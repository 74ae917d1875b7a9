"""The deployment files as a platform engineer would check them, offline: every Kubernetes
manifest against the Kubernetes schemas (kubernetes-validate, strict), checkov with no failed
check and every skip explained, the cross-references between the manifests, the configuration
in the ConfigMap and the app, and the Dockerfile's promises. The image's steps themselves are
proven by tests/functional/test_wheel.py (the wheel installed outside the checkout, run as a
non-root user); no container engine runs here.

The two tools live in their own virtual environment (`make tools`, which `make test` runs), so
that checkov's pins never touch the project's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import load_settings, parse_duration
from sidecar.web.app import MANAGEMENT_PATHS

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERNETES_VERSION = "1.30.0"  # native sidecar containers (initContainers restartPolicy: Always)


def tool(name: str) -> str:
    for candidate in (ROOT / ".venv-tools" / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is not installed: run `make tools` (make test does)")


def resources(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found.extend((path, document) for document in yaml.safe_load_all(path.read_text()))
    return found


def kustomization(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


ALL = resources(BASE) + resources(OVERLAY)
WORKLOADS = [("Deployment", "gateway"), ("Job", "token-sidecar-migrate")]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in ALL if document["kind"] == kind]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    [workload] = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def sidecar_container() -> dict[str, Any]:
    [container] = [
        c
        for c in pod_spec("Deployment", "gateway")["initContainers"]
        if c["name"] == "token-sidecar"
    ]
    return container


# --- the tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted({p for p, _ in ALL}), ids=lambda p: p.name)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_checkov_finds_no_failed_check_and_every_skip_is_explained() -> None:
    result = subprocess.run(
        [
            tool("checkov"),
            "--directory",
            str(KUBERNETES),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout or "{}")
    summary = report.get("summary", {})
    failed = report.get("results", {}).get("failed_checks", [])
    assert summary.get("failed") == 0, [(f["check_id"], f["file_path"]) for f in failed]
    assert summary.get("passed", 0) > 100
    for _, document in ALL:
        for key, value in (document["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                assert len(reason.split()) >= 6, f"unexplained skip: {value}"


# --- cross-references ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "gateway"), ("Job", "token-sidecar-migrate")]
)
def test_every_volume_mount_names_a_volume_and_every_volume_a_source_that_exists(
    kind: str, name: str
) -> None:
    spec = pod_spec(kind, name)
    volumes = {v["name"]: v for v in spec["volumes"]}
    containers = spec.get("initContainers", []) + spec["containers"]
    mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    assert mounted <= set(volumes)
    assert set(volumes) <= mounted  # no volume left unused
    config_maps = {d["metadata"]["name"] for d in of_kind("ConfigMap")} | {
        g["name"] for g in kustomization(OVERLAY).get("configMapGenerator", [])
    }
    generated = {g["name"] for g in kustomization(OVERLAY).get("secretGenerator", [])}
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps
        if "secret" in volume:
            assert volume["secret"]["secretName"] in generated


def test_the_sidecar_is_a_native_sidecar_with_probes_on_paths_the_app_serves() -> None:
    container = sidecar_container()
    assert container["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in MANAGEMENT_PATHS
        assert http["port"] in ports
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /token on loopback only: the gateway container of the same pod reaches it, nobody else.
    assert container["args"][container["args"].index("--bind") + 1].startswith("127.0.0.1:")


def test_the_configuration_in_the_config_map_is_valid_and_matches_the_ports(
    tmp_path: Path,
) -> None:
    [config_map] = of_kind("ConfigMap")
    text = config_map["data"]["sidecar.yaml"]
    # The Secret's files, from the overlay's examples, where the pod mounts them.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for generator in kustomization(OVERLAY)["secretGenerator"]:
        for entry in generator["files"]:
            key, _, source = entry.partition("=")
            shutil.copy(OVERLAY / source, secrets_dir / key)
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    for generator in kustomization(OVERLAY)["configMapGenerator"]:
        for entry in generator["files"]:
            key, _, source = entry.partition("=")
            shutil.copy(OVERLAY / source, cluster_dir / key)
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(
        text.replace("/etc/sidecar/secrets/", f"{secrets_dir}/").replace(
            "/etc/sidecar/cluster/", f"{cluster_dir}/"
        )
    )

    settings = load_settings(config_file, env={"POD_NAMESPACE": "gateway-example"})

    assert settings.missing_files() == []
    assert settings.kubernetes is not None
    [client] = settings.clients
    # The gateway's identity is its service account; the pod's token is bound to that audience.
    assert client.kubernetes_service_account == "system:serviceaccount:gateway-example:gateway"
    projected = {
        v["name"]: v for v in pod_spec("Deployment", "gateway")["volumes"] if "projected" in v
    }
    [source] = projected["token-exchange-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] in settings.kubernetes.audiences

    assert settings.management is not None
    container = sidecar_container()
    management_port = {p["name"]: p["containerPort"] for p in container["ports"]}["management"]
    assert settings.management.listen_port == management_port
    [service] = of_kind("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["management"]
    # SIGTERM: preStop's sleep, then the server's graceful timeout, within the grace period.
    pod = pod_spec("Deployment", "gateway")
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["terminationGracePeriodSeconds"]
    assert sleep + settings.server.graceful_timeout < grace
    assert parse_duration("20s") == settings.server.graceful_timeout


def test_selectors_select_the_pods_they_protect() -> None:
    [deployment] = of_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = [
        *(d["spec"]["selector"] for d in of_kind("Service")),
        *(d["spec"]["selector"]["matchLabels"] for d in of_kind("PodDisruptionBudget")),
        deployment["spec"]["selector"]["matchLabels"],
    ]
    for selector in selected:
        assert selector.items() <= labels.items()
    policies = {d["metadata"]["name"]: d for d in of_kind("NetworkPolicy")}
    assert policies["gateway"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    [job] = of_kind("Job")
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    migrate_selector = policies["token-sidecar-migrate"]["spec"]["podSelector"]["matchLabels"]
    assert migrate_selector.items() <= job_labels.items()
    # The management port is the only port of the sidecar that other pods may reach.
    rules = policies["gateway"]["spec"]["ingress"]
    assert {p["port"] for r in rules for p in r["ports"]} == {8000, 9091}


def test_the_kustomizations_name_files_that_exist() -> None:
    for directory in (BASE, OVERLAY):
        for entry in kustomization(directory)["resources"]:
            assert (directory / entry).exists(), entry


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "gateway"), ("Job", "token-sidecar-migrate")]
)
def test_every_container_runs_restricted(kind: str, name: str) -> None:
    spec = pod_spec(kind, name)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec.get("initContainers", []) + spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]


# --- the Dockerfile -----------------------------------------------------------------------------


def test_the_dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) == 2
    final = lines[stages[1] :]
    assert any(line.startswith("COPY --from=build") for line in final)
    [user] = [line for line in final if line.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert not any(re.search(r"apt-get|gcc|build-essential|pip wheel", line) for line in final)
    assert 'ENTRYPOINT ["sidecar"]' in final
    [healthcheck] = [line for line in final if line.startswith("HEALTHCHECK")]
    assert "/healthz" in healthcheck
    assert "--no-index" in " ".join(final)  # the final stage installs only the built wheels
