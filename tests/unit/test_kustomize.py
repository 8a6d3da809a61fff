"""The Kubernetes manifests in deploy/kubernetes: every build renders with `kubectl kustomize`,
every object is valid for the Kubernetes versions the docs name, and the wiring a platform
engineer relies on holds (native sidecars, the shared socket, probes, security contexts,
drain budget, secrets by reference, the Envoy bootstrap identical to the rendered one, the
dashboard's command, address, token file, Service and NetworkPolicy)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tollgate.config import Settings, load_settings
from tollgate.envoyconf import render_yaml
from tollgate.localstack import envoy_binary

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
CHECKED_IN_BOOTSTRAP = REPO / "envoy" / "envoy-kubernetes.yaml"
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
DOC = REPO / "docs" / "deploy-kubernetes.md"
DOCKERFILE = REPO / "Dockerfile"

#: Validated against the oldest version the docs support (native sidecars on by default since
#: 1.29, the preStop `sleep` action and the HPA's ContainerResource since 1.30) and a newer one.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")

BUILDS = {
    "base": DEPLOY / "base",
    "sidecar": DEPLOY / "overlays" / "sidecar",
    "gateway": DEPLOY / "overlays" / "gateway",
    "inject": DEPLOY / "examples" / "inject",
}
#: Builds whose pods run Tollgate, and how (native sidecars or plain containers).
POD_BUILDS = {"sidecar": "sidecar", "gateway": "gateway", "inject": "sidecar"}
#: Builds that include components/dashboard: both overlays; not base (a component is opt-in
#: for whoever composes their own build, such as examples/inject).
DASHBOARD_BUILDS = ("sidecar", "gateway")

TOLLGATE_IMAGE_NAME = "ghcr.io/tollgate-dev/tollgate"
ENVOY_IMAGE_NAME = "envoyproxy/envoy"
TOLLGATE_UID = 10001
SOCKET_DIR = "/run/tollgate"
JOURNAL_DIR = "/var/lib/tollgate"
METRICS_PORT = 9464
ENVOY_PORT = 10000
#: The writer's final flush after the drain (app.py bounds it at 5 s).
WRITER_FLUSH_S = 5
#: Journal segment size: disk use can exceed journal_max_bytes by a partly shipped segment.
JOURNAL_SEGMENT_BYTES = 64 * 1024 * 1024
SECRET_NAME = "tollgate-secrets"
DASHBOARD = "tollgate-dashboard"
DASHBOARD_PORT = 8080
DASHBOARD_TOKEN_KEY = "dashboard-admin-token"
#: The label a namespace needs for its pods to reach the dashboard (networkpolicy.yaml).
DASHBOARD_ACCESS_LABEL = "tollgate.dev/dashboard-access"
#: The `tollgate` subcommands that run a long-lived server with HTTP health endpoints.
SERVER_COMMANDS = ("serve", "dashboard")

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not on PATH; the manifests are rendered with `kubectl kustomize` "
    "(kubectl >= 1.27, built-in kustomize v5)",
)


@functools.cache
def _rendered(build: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(BUILDS[build])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {BUILDS[build]}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def rendered(build: str) -> list[dict[str, Any]]:
    return list(_rendered(build))


def objects(build: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in rendered(build) if o["kind"] == kind]


def the(build: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(build, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{build}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(build: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every Deployment and Job."""
    for obj in rendered(build):
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield obj["metadata"]["name"], obj["spec"]["template"]


def proxy_pods(build: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of the workloads whose pods run Tollgate."""
    found = [
        (obj, obj["spec"]["template"]["spec"])
        for obj in objects(build, "Deployment")
        if "tollgate.dev/proxy" in obj["spec"]["template"]["metadata"].get("labels", {})
    ]
    assert found, f"{build}: no Deployment runs Tollgate"
    return found


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in all_containers(pod) if c["name"] == name]
    return found


def configmap(build: str) -> dict[str, Any]:
    (cm,) = [
        o
        for o in objects(build, "ConfigMap")
        if o["metadata"]["name"].startswith("tollgate-config")
    ]
    return cm


def settings_of(pod: dict[str, Any]) -> Settings:
    """What Tollgate in this pod runs with: the ConfigMap's TOML (base/tollgate.toml; the
    ConfigMap holds it verbatim, tested below) plus the container's literal TOLLGATE_*
    variables (TOLLGATE_CONFIG names the mounted file)."""
    env = {
        e["name"]: e["value"]
        for e in container(pod, "tollgate").get("env", [])
        if "value" in e and e["name"].startswith("TOLLGATE_") and e["name"] != "TOLLGATE_CONFIG"
    }
    return load_settings(BASE / "tollgate.toml", environ=env)


def quantity_bytes(text: str) -> int:
    """Bytes in a Kubernetes quantity such as ``512Mi`` or ``1G``."""
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert match, text
    assert match[2] in units, f"unexpected unit in {text!r}"
    return int(match[1]) * units[match[2]]


def image_tag(image: str) -> str | None:
    """The tag (or digest) an image reference pins, None when it pins nothing."""
    name, _, digest = image.partition("@")
    if digest:
        return digest
    last = name.rsplit("/", 1)[-1]
    return last.partition(":")[2] or None


def named_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return int(found)


def secret_sources(volume: dict[str, Any]) -> list[dict[str, Any]]:
    """The Secret references of a volume (a `secret` volume or a `projected` one's sources),
    each as ``{"name": ..., "items": [...], ...}``."""
    if "secret" in volume:
        source = dict(volume["secret"])
        source["name"] = source.pop("secretName", None)
        return [source]
    return [s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]


def secret_file(pod: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any] | None:
    """Where the file ``path`` in container ``c`` comes from when it is a key of a mounted
    Secret: ``{"secret", "key", "mode", "mount", "optional"}``; None when it is no such file."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        sources = secret_sources(volumes.get(mount["name"], {}))
        if not sources:
            continue
        root = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            relative = mount["subPath"] if path == root else None
        else:
            relative = path[len(root) + 1 :] if path.startswith(root + "/") else None
        if relative is None:
            continue
        volume = volumes[mount["name"]]
        default_mode = (volume.get("secret") or volume.get("projected") or {}).get(
            "defaultMode", 0o644
        )
        for source in sources:
            for item in source.get("items", []):
                if item["path"] == relative:
                    return {
                        "secret": source["name"],
                        "key": item["key"],
                        "mode": item.get("mode", default_mode),
                        "mount": mount,
                        "optional": bool(source.get("optional")),
                    }
    return None


def bootstrap() -> dict[str, Any]:
    return yaml.safe_load(CHECKED_IN_BOOTSTRAP.read_text(encoding="utf-8"))


def envoy_listener_port(doc: dict[str, Any]) -> int:
    (listener,) = doc["static_resources"]["listeners"]
    return int(listener["address"]["socket_address"]["port_value"])


def extproc_address(doc: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "tollgate_extproc"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    return endpoint["endpoint"]["address"]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


# -- files that need no kubectl ---------------------------------------------------------------


def test_base_bootstrap_is_byte_identical_to_the_rendered_one() -> None:
    """deploy/kubernetes/base/envoy-kubernetes.yaml is a copy only because kustomize loads
    files from inside the kustomization; it must never drift from envoy/envoy-kubernetes.yaml
    (`make envoy-configs` writes both)."""
    assert (BASE / "envoy-kubernetes.yaml").read_bytes() == CHECKED_IN_BOOTSTRAP.read_bytes(), (
        "deploy/kubernetes/base/envoy-kubernetes.yaml differs from envoy/envoy-kubernetes.yaml: "
        "run `make envoy-configs`"
    )


def test_base_bootstrap_is_what_envoy_config_renders() -> None:
    """... and both are `tollgate envoy-config --target kubernetes` with default settings."""
    rendered_now = render_yaml(load_settings(environ={}), "kubernetes")
    assert (BASE / "envoy-kubernetes.yaml").read_text(encoding="utf-8") == rendered_now


def test_bootstrap_reaches_tollgate_over_the_configured_unix_socket() -> None:
    toml = tomllib.loads((BASE / "tollgate.toml").read_text(encoding="utf-8"))
    assert toml["grpc_address"] == f"unix:{SOCKET_DIR}/extproc.sock"
    address = extproc_address(bootstrap())
    assert address == {"pipe": {"path": f"{SOCKET_DIR}/extproc.sock"}}, (
        f"the kubernetes bootstrap must reach ext_proc on the pod's unix socket, got {address}"
    )
    assert envoy_listener_port(bootstrap()) == ENVOY_PORT
    admin = bootstrap()["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"


def test_tollgate_toml_is_valid_settings() -> None:
    settings = load_settings(BASE / "tollgate.toml", environ={})
    assert settings.grpc_address == f"unix:{SOCKET_DIR}/extproc.sock"
    assert settings.metrics_address == f"0.0.0.0:{METRICS_PORT}"
    assert str(settings.state_dir) == JOURNAL_DIR
    assert not settings.database_url, "the database URL comes from the Secret, never the TOML"


def test_secret_example_is_not_part_of_any_kustomization() -> None:
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text(encoding="utf-8"))
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == SECRET_NAME
    kustomizations = sorted(DEPLOY.rglob("kustomization.yaml"))
    assert len(kustomizations) >= len(BUILDS)
    for path in kustomizations:
        # Every string the kustomization holds (resources, patches, generators; not comments).
        assert "secret.example" not in json.dumps(yaml.safe_load(path.read_text("utf-8"))), path


def test_docs_name_the_validated_versions() -> None:
    text = DOC.read_text(encoding="utf-8")
    for version in KUBERNETES_VERSIONS:
        assert version.rsplit(".", 1)[0] in text, f"docs/deploy-kubernetes.md: {version}"


# -- rendered builds --------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_object_is_valid_kubernetes(build: str, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = rendered(build)
    assert docs
    for obj in docs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{build}: {obj['kind']} {obj['metadata']['name']} ({version}): {exc}")


@needs_kubectl
def test_validation_catches_a_broken_object() -> None:
    """The validator is not a no-op: an unknown field fails in strict mode."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (job,) = objects("base", "Job")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["template"]["spec"]["containers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_no_secret_objects_and_secrets_only_by_reference(build: str) -> None:
    example_keys = set(yaml.safe_load(SECRET_EXAMPLE.read_text(encoding="utf-8"))["stringData"])
    assert not objects(build, "Secret"), f"{build} renders a Secret: secrets do not go in Git"
    secretish = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|DATABASE_URL|DSN|CREDENTIAL)", re.I)
    literal = re.compile(r"(postgres(ql)?://|\bsk-[A-Za-z0-9]|\btg_[A-Za-z0-9])")
    for name, template in pod_templates(build):
        for volume in template["spec"].get("volumes", []):
            for source in secret_sources(volume):
                where = f"{build}/{name}: volume {volume['name']}"
                assert source["name"] == SECRET_NAME, where
                # Only the keys the pod needs, each named (and so checked) here.
                assert source.get("items"), f"{where} mounts every key of the Secret"
                for item in source["items"]:
                    assert item["key"] in example_keys, (
                        f"{where}: key {item['key']!r} is missing from secret.example.yaml"
                    )
        for c in all_containers(template["spec"]):
            for env in c.get("env", []):
                where = f"{build}/{name}/{c['name']}: {env['name']}"
                if "value" in env:
                    if secretish.search(env["name"]) and env["name"].endswith("_FILE"):
                        # A path is no secret, but it must be a key of the mounted Secret.
                        found = secret_file(template["spec"], c, str(env["value"]))
                        assert found, f"{where}: {env['value']} is not a file of a mounted Secret"
                    else:
                        assert not secretish.search(env["name"]), f"{where} is set literally"
                    assert not literal.search(str(env["value"])), f"{where} holds a credential"
                else:
                    ref = env["valueFrom"].get("secretKeyRef")
                    if ref is not None:
                        assert ref["name"] == SECRET_NAME, where
                        assert ref["key"] in example_keys, (
                            f"{where}: key {ref['key']!r} is missing from secret.example.yaml"
                        )
            assert not c.get("envFrom"), f"{build}/{name}/{c['name']}: envFrom hides what is read"
    for cm in objects(build, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            assert not literal.search(text), f"{build}: ConfigMap key {key} holds a credential"


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_configmap_holds_the_checked_in_bootstrap_and_toml(build: str) -> None:
    data = configmap(build)["data"]
    assert data["envoy-kubernetes.yaml"] == CHECKED_IN_BOOTSTRAP.read_text(encoding="utf-8")
    assert data["tollgate.toml"] == (BASE / "tollgate.toml").read_text(encoding="utf-8")


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_container_is_locked_down(build: str) -> None:
    for name, template in pod_templates(build):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, f"{build}/{name}"
        for c in all_containers(pod):
            where = f"{build}/{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, where
            for id_field in ("runAsUser", "runAsGroup"):
                assert isinstance(sc.get(id_field), int), f"{where}: {id_field}"
                assert sc[id_field] > 0, f"{where}: {id_field}"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert not sc.get("privileged"), where
            tag = image_tag(c["image"])
            assert tag, f"{where}: image {c['image']!r} names no tag"
            assert tag != "latest", where
            assert re.search(r"[0-9]", tag), f"{where}: {c['image']!r} is not a version"
            if c["name"] in ("tollgate", "envoy"):
                assert sc["runAsUser"] == TOLLGATE_UID, where
                assert sc["runAsGroup"] == TOLLGATE_UID, where
            elif "tollgate.dev/proxy" in template["metadata"].get("labels", {}):
                # Only Envoy may share Tollgate's UID: the socket is 0600, and anything with
                # that UID could open ext_proc and make up usage.
                assert sc["runAsUser"] != TOLLGATE_UID, f"{where} runs with Tollgate's UID"


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_images_are_the_release_and_the_wheels_envoy(build: str) -> None:
    from importlib.metadata import version

    out = subprocess.run(
        [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert match, out
    envoy_version = match[1]
    for name, template in pod_templates(build):
        for c in all_containers(template["spec"]):
            repo, _, tag = c["image"].rpartition(":")
            if c["name"] == "envoy":
                assert repo == ENVOY_IMAGE_NAME
                assert tag == f"v{envoy_version}", (
                    f"{build}/{name}: Envoy image {c['image']} but the tested wheel is "
                    f"{envoy_version}"
                )
            if repo == TOLLGATE_IMAGE_NAME:
                assert tag == version("tollgate"), f"{build}/{name}: {c['image']}"


@needs_kubectl
@pytest.mark.parametrize("build", ["sidecar", "inject"])
def test_native_sidecars_start_tollgate_then_envoy(build: str) -> None:
    for workload, pod in proxy_pods(build):
        names = [c["name"] for c in pod.get("initContainers", [])]
        assert names[-2:] == ["tollgate", "envoy"], (
            f"{build}: Tollgate must start before Envoy (Envoy then stops first), got {names}"
        )
        for name in ("tollgate", "envoy"):
            assert container(pod, name)["restartPolicy"] == "Always", f"{build}: {name}"
            assert name not in [c["name"] for c in pod["containers"]]
        # The kubelet starts Envoy only once Tollgate's startup probe passed (socket exists).
        assert container(pod, "tollgate")["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert workload["metadata"]["labels"]["tollgate.dev/inject"] == "sidecar"


@needs_kubectl
@pytest.mark.parametrize("build", ["sidecar", "inject"])
def test_app_reaches_envoy_on_localhost(build: str) -> None:
    port = envoy_listener_port(bootstrap())
    for _, pod in proxy_pods(build):
        apps = pod["containers"]
        assert apps, build
        for app in apps:
            env = {e["name"]: e.get("value") for e in app.get("env", [])}
            url = urlsplit(env.get("OPENAI_BASE_URL") or "")
            assert (url.scheme, url.hostname, url.port, url.path) == (
                "http",
                "127.0.0.1",
                port,
                "/v1",
            ), f"{build}/{app['name']}: OPENAI_BASE_URL={env.get('OPENAI_BASE_URL')}"
            mounts = {m["mountPath"] for m in app.get("volumeMounts", [])}
            assert SOCKET_DIR not in mounts, f"{build}: the app must not see the ext_proc socket"


@needs_kubectl
@pytest.mark.parametrize("build", sorted(POD_BUILDS))
def test_shared_socket_volume_is_in_memory_and_only_for_envoy_and_tollgate(build: str) -> None:
    for _, pod in proxy_pods(build):
        volumes = {v["name"]: v for v in pod["volumes"]}
        holders = {
            c["name"]: m["name"]
            for c in all_containers(pod)
            for m in c.get("volumeMounts", [])
            if m["mountPath"] == SOCKET_DIR
        }
        assert set(holders) == {"tollgate", "envoy"}, f"{build}: {SOCKET_DIR} mounted in {holders}"
        (volume_name,) = set(holders.values())
        assert volumes[volume_name]["emptyDir"]["medium"] == "Memory", build
        config = volumes["tollgate-config"]["configMap"]["name"]
        assert config == configmap(build)["metadata"]["name"], "pods mount the generated ConfigMap"
        envoy = container(pod, "envoy")
        (envoy_conf,) = [m for m in envoy["volumeMounts"] if m["name"] == "tollgate-config"]
        assert envoy_conf["subPath"] == "envoy-kubernetes.yaml"
        assert envoy["args"][envoy["args"].index("-c") + 1] == envoy_conf["mountPath"]
        tollgate = container(pod, "tollgate")
        (toml_mount,) = [m for m in tollgate["volumeMounts"] if m["name"] == "tollgate-config"]
        env = {e["name"]: e.get("value") for e in tollgate["env"]}
        assert env["TOLLGATE_CONFIG"] == toml_mount["mountPath"]
        assert toml_mount["subPath"] == "tollgate.toml"
        writable = {m["mountPath"] for m in tollgate["volumeMounts"] if not m.get("readOnly")}
        assert {SOCKET_DIR, JOURNAL_DIR, "/tmp"} <= writable, build


@needs_kubectl
@pytest.mark.parametrize("build", sorted(POD_BUILDS))
def test_journal_volume_is_bigger_than_the_journal_cap(build: str) -> None:
    """The kubelet evicts a pod whose emptyDir outgrows its sizeLimit, and the journal goes
    with the pod: the cap (plus a partly shipped segment or two) must fit."""
    for _, pod in proxy_pods(build):
        settings = settings_of(pod)
        (mount,) = [
            m for m in container(pod, "tollgate")["volumeMounts"] if m["mountPath"] == JOURNAL_DIR
        ]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        limit = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        assert settings.journal_max_bytes + 2 * JOURNAL_SEGMENT_BYTES <= limit, (
            f"{build}: journal_max_bytes {settings.journal_max_bytes} does not fit {limit}"
        )
        assert settings.resolved_state_dir() == Path(JOURNAL_DIR)


@needs_kubectl
@pytest.mark.parametrize("build", sorted(POD_BUILDS))
def test_tollgate_probes_are_http_on_the_metrics_port(build: str) -> None:
    for _, pod in proxy_pods(build):
        tollgate = container(pod, "tollgate")
        expected = {
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
            "startupProbe": "/readyz",
        }
        for probe, path in expected.items():
            get = tollgate[probe].get("httpGet")
            assert get is not None, f"{build}: {probe} must be httpGet (ext_proc is a unix socket)"
            assert get["path"] == path, f"{build}: {probe}"
            assert named_port(tollgate, get["port"]) == METRICS_PORT, f"{build}: {probe}"
        host, _, port = settings_of(pod).metrics_address.rpartition(":")
        assert (host, int(port)) == ("0.0.0.0", METRICS_PORT), "the kubelet probes the pod IP"
        envoy = container(pod, "envoy")
        for probe in ("startupProbe", "readinessProbe"):
            assert named_port(envoy, envoy[probe]["tcpSocket"]["port"]) == ENVOY_PORT


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_tollgate_server_has_http_probes(build: str) -> None:
    """Every container running a long-lived `tollgate serve` or `tollgate dashboard` (the
    proxy's sidecars or containers, the dashboard) is probed over HTTP, on a port it
    declares, at one of Tollgate's health endpoints."""
    found = []
    for name, template in pod_templates(build):
        for c in all_containers(template["spec"]):
            if not c["image"].startswith(TOLLGATE_IMAGE_NAME + ":"):
                continue
            if c.get("command") or (c.get("args") or [None])[0] not in SERVER_COMMANDS:
                continue
            where = f"{build}/{name}/{c['name']}"
            found.append(where)
            for probe in ("readinessProbe", "livenessProbe"):
                get = c.get(probe, {}).get("httpGet")
                assert get is not None, f"{where}: no httpGet {probe}"
                assert get["path"] in ("/healthz", "/readyz"), f"{where}: {probe} {get['path']}"
                declared = {p["containerPort"] for p in c["ports"]}
                assert named_port(c, get["port"]) in declared, f"{where}: {probe} port"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", (
                f"{where}: liveness must not depend on readiness (/readyz turns 503 on purpose)"
            )
    assert found or build == "base", f"{build}: no Tollgate server found"


@needs_kubectl
@pytest.mark.parametrize("build", sorted(POD_BUILDS))
def test_termination_grace_covers_the_drain(build: str) -> None:
    for _workload, pod in proxy_pods(build):
        settings = settings_of(pod)
        shutdown = settings.shutdown_delay_s + settings.shutdown_grace_s + WRITER_FLUSH_S
        grace = pod["terminationGracePeriodSeconds"]
        tollgate = container(pod, "tollgate")
        envoy = container(pod, "envoy")
        args = envoy["args"]
        assert args[args.index("--drain-strategy") + 1] == "gradual"
        drain_time = int(args[args.index("--drain-time-s") + 1])
        assert drain_time == settings.shutdown_grace_s, "Envoy's drain follows shutdown_grace_s"
        if POD_BUILDS[build] == "gateway":
            pre_stop = tollgate["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop[:2] == ["tollgate", "envoy-drain"], pre_stop
            assert pre_stop[pre_stop.index("--admin-address") + 1] == "127.0.0.1:{}".format(
                bootstrap()["admin"]["address"]["socket_address"]["port_value"]
            )
            drain_timeout = int(pre_stop[pre_stop.index("--timeout-s") + 1])
            envoy_sleep = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert drain_time <= drain_timeout, "Envoy's drain must fit the drain hook's wait"
            assert envoy_sleep >= drain_timeout, "Envoy must outlive Tollgate's drain hook"
            assert grace >= drain_timeout + shutdown + 5, (
                f"{build}: terminationGracePeriodSeconds {grace} < drain {drain_timeout} + "
                f"shutdown {shutdown} + margin"
            )
            assert grace > envoy_sleep
        else:
            # Native sidecar order does the drain: the app stops, then Envoy, then Tollgate.
            assert "lifecycle" not in tollgate, build
            assert "lifecycle" not in envoy, build
            assert grace >= shutdown + 5, f"{build}: terminationGracePeriodSeconds {grace}"


@needs_kubectl
def test_envoy_accepts_the_manifests_command_line(tmp_path: Path) -> None:
    """Envoy validates the bootstrap with exactly the container's arguments."""
    for build in ("sidecar", "gateway"):
        for _, pod in proxy_pods(build):
            args = list(container(pod, "envoy")["args"])
            args[args.index("-c") + 1] = str(CHECKED_IN_BOOTSTRAP)
            done = subprocess.run(
                [envoy_binary(), "--mode", "validate", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"{build}: {done.stdout}{done.stderr}"


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_base_pieces(build: str) -> None:
    sa = the(build, "ServiceAccount", "tollgate")
    assert sa["automountServiceAccountToken"] is False
    job = the(build, "Job", "tollgate-migrate")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    (migrate,) = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"].startswith(TOLLGATE_IMAGE_NAME + ":")
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "tollgate"
    (db,) = [e for e in migrate["env"] if e["name"] == "TOLLGATE_DATABASE_URL"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "database-url"}
    labels = spec["template"]["metadata"]["labels"]
    policies = objects(build, "NetworkPolicy")
    assert any(selector_matches(p["spec"]["podSelector"], labels) for p in policies)


def _policy_for(build: str, labels: dict[str, str]) -> dict[str, Any]:
    (policy,) = [
        p
        for p in objects(build, "NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], labels)
    ]
    return policy


@needs_kubectl
@pytest.mark.parametrize("build", ["sidecar", "gateway"])
def test_network_policy(build: str) -> None:
    for workload, _pod in proxy_pods(build):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        policy = _policy_for(build, labels)["spec"]
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        expected = {METRICS_PORT} | ({ENVOY_PORT} if build == "gateway" else set())
        assert ingress_ports == expected, f"{build}: ingress to {ingress_ports}"
        for rule in policy["ingress"]:
            assert rule.get("from"), f"{build}: an ingress rule open to every pod: {rule}"
        egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        assert egress_ports == {53, 5432, 443}, egress_ports
        (https,) = [r for r in policy["egress"] if {p["port"] for p in r["ports"]} == {443}]
        blocks = [peer["ipBlock"] for peer in https["to"]]
        assert all("except" in b for b in blocks), "443 must not reach private ranges"
        v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
        assert "169.254.0.0/16" in v4["except"], "the metadata service must be out of reach"
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(v4["except"])
        # The ext_proc socket is no port: nothing may name the old TCP port either.
        assert 9002 not in ingress_ports


@needs_kubectl
def test_sidecar_overlay_objects() -> None:
    (workload, _pod) = proxy_pods("sidecar")[0]
    pdb = the("sidecar", "PodDisruptionBudget", workload["metadata"]["name"])
    assert selector_matches(
        pdb["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"]
    )
    assert not objects("sidecar", "HorizontalPodAutoscaler")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    to_proxy = [
        s["metadata"]["name"]
        for s in objects("sidecar", "Service")
        if selector_matches({"matchLabels": s["spec"]["selector"]}, labels)
    ]
    assert not to_proxy, f"the app reaches Envoy on localhost, yet Services {to_proxy} do too"
    assert [s["metadata"]["name"] for s in objects("sidecar", "Service")] == [DASHBOARD]


@needs_kubectl
def test_gateway_overlay_objects() -> None:
    (workload, pod) = proxy_pods("gateway")[0]
    name = workload["metadata"]["name"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["replicas"] >= 2
    names = [c["name"] for c in pod["containers"]]
    assert set(names) == {"tollgate", "envoy"}
    service = the("gateway", "Service", name)
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == ENVOY_PORT
    assert named_port(container(pod, "envoy"), port["targetPort"]) == ENVOY_PORT
    hpa = the("gateway", "HorizontalPodAutoscaler", name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    resource = metric.get("containerResource") or metric.get("resource")
    assert resource["name"] == "cpu"
    if metric["type"] == "ContainerResource":
        assert resource["container"] == "tollgate"
    assert "cpu" in container(pod, resource.get("container", "tollgate"))["resources"]["requests"]
    pdb = the("gateway", "PodDisruptionBudget", name)
    assert selector_matches(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be possible"


@needs_kubectl
def test_inject_example_leaves_the_app_as_it_was() -> None:
    app_docs = [
        d
        for d in yaml.safe_load_all(
            (BUILDS["inject"] / "web" / "deployment.yaml").read_text(encoding="utf-8")
        )
        if d
    ]
    (original,) = app_docs
    ((workload, pod),) = proxy_pods("inject")
    assert workload["metadata"]["name"] == original["metadata"]["name"]
    (web,) = pod["containers"]
    (before,) = original["spec"]["template"]["spec"]["containers"]
    assert web["image"] == before["image"]
    assert web["ports"] == before["ports"]
    assert {e["name"] for e in before["env"]} < {e["name"] for e in web["env"]}
    assert pod["securityContext"] == original["spec"]["template"]["spec"]["securityContext"]
    policy = _policy_for("inject", workload["spec"]["template"]["metadata"]["labels"])
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert before["ports"][0]["containerPort"] in ports, "the app's own port stays reachable"


# -- the dashboard (components/dashboard) -----------------------------------------------------


def dashboard_pod(build: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Deployment, pod spec, container) of the dashboard."""
    workload = the(build, "Deployment", DASHBOARD)
    pod = workload["spec"]["template"]["spec"]
    assert not pod.get("initContainers"), f"{build}: the dashboard pod runs no sidecars"
    (c,) = pod["containers"]
    return workload, pod, c


def dashboard_settings(c: dict[str, Any]) -> Settings:
    """What `tollgate dashboard` runs with: its literal TOLLGATE_* variables, no TOML."""
    env = {
        e["name"]: e["value"]
        for e in c.get("env", [])
        if "value" in e and e["name"].startswith("TOLLGATE_")
    }
    assert "TOLLGATE_CONFIG" not in env, "the dashboard is configured by its environment only"
    return load_settings(environ=env)


@needs_kubectl
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_dashboard_is_in_both_overlays_and_opt_in_elsewhere(build: str) -> None:
    names = {o["metadata"]["name"] for o in rendered(build) if "dashboard" in o["metadata"]["name"]}
    if build in DASHBOARD_BUILDS:
        assert {o["kind"] for o in rendered(build) if o["metadata"]["name"] == DASHBOARD} == {
            "Deployment",
            "Service",
            "NetworkPolicy",
        }, build
    else:
        assert not names, f"{build} renders {names}: the dashboard is a component to opt into"


@needs_kubectl
@pytest.mark.parametrize("build", DASHBOARD_BUILDS)
def test_dashboard_wiring(build: str) -> None:
    workload, pod, c = dashboard_pod(build)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["replicas"] == 1
    assert selector_matches(workload["spec"]["selector"], labels)
    assert "tollgate.dev/proxy" not in labels, "the dashboard is no proxy pod"
    assert pod["serviceAccountName"] == "tollgate"
    # `tollgate dashboard`: the image's entrypoint is `tollgate`, the container adds the rest.
    assert re.search(r'^ENTRYPOINT \["tollgate"\]$', DOCKERFILE.read_text("utf-8"), re.M)
    assert c["image"].startswith(TOLLGATE_IMAGE_NAME + ":")
    assert "command" not in c, "keep the image's entrypoint"
    assert c["args"] == ["dashboard"]

    # It listens on the pod IP, on the port the container declares.
    settings = dashboard_settings(c)
    host, _, port = settings.dashboard_address.rpartition(":")
    assert host == "0.0.0.0", "the Service and the kubelet reach it on the pod IP"
    assert int(port) == DASHBOARD_PORT == named_port(c, "http")
    (declared,) = c["ports"]
    assert (declared["name"], declared["protocol"]) == ("http", "TCP")

    # The ledger from the Secret; the admin token as a file of the Secret, never a value.
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET_NAME,
        "key": "database-url",
    }
    assert not settings.database_url
    assert "TOLLGATE_DASHBOARD_ADMIN_TOKEN" not in env, "the token goes in a file, not the env"
    assert not settings.dashboard_admin_token
    token_file = settings.dashboard_admin_token_file
    assert token_file, "without a token file the dashboard would generate one in state_dir"
    source = secret_file(pod, c, token_file)
    assert source is not None, f"{token_file} is not a file of a mounted Secret"
    assert (source["secret"], source["key"]) == (SECRET_NAME, DASHBOARD_TOKEN_KEY)
    assert not source["optional"], "a missing key must stop the pod, not start it tokenless"
    assert source["mount"].get("readOnly") is True
    example = yaml.safe_load(SECRET_EXAMPLE.read_text(encoding="utf-8"))["stringData"]
    assert len(example[DASHBOARD_TOKEN_KEY]) >= 16, "the example must be a valid token"
    # Secret files belong to root and to the pod's fsGroup: the container's UID must be able
    # to read the token, nobody else may.
    sc, mode = c["securityContext"], source["mode"]
    groups = {
        pod["securityContext"].get("fsGroup"),
        *pod["securityContext"].get("supplementalGroups", []),
    }
    readable = bool(mode & 0o004) or (bool(mode & 0o040) and sc["runAsGroup"] in groups)
    assert readable, f"mode {mode:o}: UID {sc['runAsUser']} cannot read {token_file}"
    assert not mode & 0o007, f"mode {mode:o}: the admin token is readable by others"
    assert not mode & 0o222, f"mode {mode:o}: the token file is writable"

    # Nothing to write: only /tmp is writable (no state_dir volume, no journal, no socket).
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}, writable
    assert SOCKET_DIR not in {m["mountPath"] for m in c["volumeMounts"]}

    # Probes: /healthz (public, answers without Postgres) on the dashboard's port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", f"{build}: {probe}"
        assert named_port(c, get["port"]) == DASHBOARD_PORT, f"{build}: {probe}"
        assert get.get("scheme", "HTTP") == "HTTP"
    resources = c["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert quantity_bytes(resources["requests"]["memory"]) <= quantity_bytes(
        resources["limits"]["memory"]
    )

    # The Service: ClusterIP, port 8080 named http, onto the container's port, only this pod.
    service = the(build, "Service", DASHBOARD)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    for other, _ in proxy_pods(build):
        other_labels = other["spec"]["template"]["metadata"]["labels"]
        assert not selector_matches({"matchLabels": service["spec"]["selector"]}, other_labels)
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port.get("protocol", "TCP")) == (
        "http",
        DASHBOARD_PORT,
        "TCP",
    )
    assert named_port(c, port["targetPort"]) == DASHBOARD_PORT


@needs_kubectl
@pytest.mark.parametrize("build", DASHBOARD_BUILDS)
def test_dashboard_network_policy(build: str) -> None:
    workload, _pod, c = dashboard_pod(build)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    policy = _policy_for(build, labels)
    assert policy["metadata"]["name"] == DASHBOARD, "only the dashboard's own policy selects it"
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    # Ingress: the dashboard's port only, from labelled namespaces only (never everyone).
    ports = {named_port(c, p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    assert ports == {DASHBOARD_PORT}, ports
    for rule in spec["ingress"]:
        assert rule.get("from"), f"{build}: an ingress rule open to every pod: {rule}"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, peer
            assert peer["namespaceSelector"]["matchLabels"] == {DASHBOARD_ACCESS_LABEL: "true"}
    assert DASHBOARD_ACCESS_LABEL in DOC.read_text(encoding="utf-8"), "document the label"
    # Egress: DNS and Postgres only (no providers, no 443, no ipBlock to the world).
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 5432}, egress_ports
    (dns,) = [r for r in spec["egress"] if {p["port"] for p in r["ports"]} == {53}]
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    (peer,) = dns["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert not any("ipBlock" in peer for r in spec["egress"] for peer in r.get("to", []))
    # The same two rules as the migration Job's policy, which reads the same Postgres.
    migrate = the(build, "NetworkPolicy", "tollgate-migrate")["spec"]
    assert spec["egress"] == migrate["egress"]
