"""Static checks of what operators deploy: the Dockerfile, docker-compose.yml (against the
Compose specification's JSON schema) and the Kubernetes manifests (against the Kubernetes
schemas shipped by kubernetes-validate). Their relay configurations pass `check-config`."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from relay.plugins import load as load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
COMPOSE_SCHEMA = REPO / "tests" / "fixtures" / "compose-spec.json"
# The oldest and newest Kubernetes versions whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
HEALTHZ_PORT = 9477


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    out = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def test_dockerfile_parser_joins_continuations() -> None:
    parsed = dockerfile_instructions('# c\nFROM a AS b\nRUN x \\\n    && y\n\nCMD ["z"]\n')
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y"), ("CMD", '["z"]')]


def test_base_image_is_a_build_argument_with_a_pinned_python(
    dockerfile: list[tuple[str, str]],
) -> None:
    keyword, args = dockerfile[0]
    assert keyword == "ARG"
    name, _, default = args.partition("=")
    assert name == "BASE_IMAGE"
    # Pinned to a patch release of Python on a named Debian release, never a floating tag.
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", default)
    froms = [args for keyword, args in dockerfile if keyword == "FROM"]
    assert len(froms) == 2, "multi-stage: a builder and a runtime stage"
    assert froms[0] == "${BASE_IMAGE} AS builder"
    assert froms[1] == "${BASE_IMAGE}"


def test_builder_installs_into_a_venv_that_the_runtime_copies(
    dockerfile: list[tuple[str, str]],
) -> None:
    builder, runtime = stages(dockerfile)
    runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "python3 -m venv /opt/relay" in runs
    assert "/opt/relay/bin/pip install" in runs
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert copies == ["--from=builder /opt/relay /opt/relay"]
    # Nothing is installed at run time: no pip, no compiler, no package manager in the runtime.
    runtime_runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    for tool in ("pip", "apt-get", "curl", "wget"):
        assert tool not in runtime_runs


def test_runtime_runs_the_relay_as_pid_1_unprivileged_with_a_healthcheck(
    dockerfile: list[tuple[str, str]],
) -> None:
    runtime = dict(stages(dockerfile)[1])
    entrypoint = json.loads(runtime["ENTRYPOINT"])  # exec form: JSON, no shell in between
    assert entrypoint == ["docker-event-relay"]
    assert json.loads(runtime["CMD"]) == ["run"]
    assert runtime.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    user = runtime["USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert runtime["EXPOSE"] == str(HEALTHZ_PORT)
    assert "/var/lib/docker-event-relay" in runtime["VOLUME"]

    health = runtime["HEALTHCHECK"]
    options, _, command = health.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python3", "-c"], "the interpreter in the image, no curl"
    assert "/healthz" in argv[2] and "RELAY_HTTP__PORT" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")  # the one-liner is valid Python


def test_healthcheck_one_liner_fails_when_nothing_answers() -> None:
    """The command exits non-zero (unhealthy) when the port is closed, 0 when it answers."""
    runtime = dict(stages(dockerfile_instructions((REPO / "Dockerfile").read_text()))[1])
    code = json.loads(runtime["HEALTHCHECK"].partition(" CMD ")[2])[2]
    closed = subprocess.run(
        [sys.executable, "-c", code], env={"RELAY_HTTP__PORT": "1"}, capture_output=True
    )
    assert closed.returncode != 0


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!relay/", "!sinks/"} <= set(lines)
    copied = [
        args
        for keyword, args in dockerfile_instructions((REPO / "Dockerfile").read_text())
        if keyword == "COPY" and "--from" not in args
    ]
    for args in copied:
        for source in shlex.split(args)[:-1]:
            assert (
                f"!{source.rstrip('*')}" in {ln.rstrip("*") for ln in lines}
                or f"!{source}/" in lines
            ), f"COPY {source} is excluded by .dockerignore"


# -- docker-compose.yml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The file says draft 2019-09 under a URI jsonschema does not recognise; name it here.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_follows_the_compose_specification(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["services"]["relay"].update(restart_policy="always"),  # not a service key
        lambda c: c["services"]["relay"].update(ports=9477),
        lambda c: c.update(servcies={}),
        lambda c: c["services"]["kafka"]["healthcheck"].update(retires=3),
    ],
)
def test_compose_schema_check_catches_mistakes(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator, break_it: Any
) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert list(compose_validator.iter_errors(broken))


def test_compose_wires_all_three_sinks_to_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"relay", "kafka", "mosquitto", "webhook"} <= services.keys()
    relay = services["relay"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in relay["volumes"]
    assert relay["group_add"], "the socket's group"
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    config_mount = next(v for v in relay["volumes"] if v.endswith("relay.yaml:ro"))
    host_path, container_path, _ = config_mount.split(":")
    assert relay["environment"]["RELAY_CONFIG_FILE"] == container_path
    settings = load_settings(REPO / host_path)
    by_type = {s.type: s for s in settings.sinks}
    assert set(by_type) == {"kafka", "mqtt", "webhook"}
    kafka_host, _, kafka_port = by_type["kafka"].bootstrap_servers[0].partition(":")
    assert kafka_host == "kafka"
    assert (
        f"PLAINTEXT://kafka:{kafka_port}"
        in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert "broker,controller" == services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    assert by_type["mqtt"].host == "mosquitto"
    conf = (REPO / "deploy" / "compose" / "mosquitto.conf").read_text().split("\n")
    assert f"listener {by_type['mqtt'].port}" in conf and "allow_anonymous true" in conf
    assert by_type["webhook"].url.host == "webhook"
    assert services["webhook"]["environment"]["PORT"] == str(by_type["webhook"].url.port)
    assert settings.http.port == int(relay["ports"][0].split(":")[1]) == HEALTHZ_PORT
    for service in services.values():
        image = service.get("image", "")
        assert (":" in image and not image.endswith(":latest")) or service is relay, image
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{source} is mounted but missing"


def check_config(config: Path | str) -> subprocess.CompletedProcess[str]:
    """`docker-event-relay check-config` on a file, with no RELAY_* variables around."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(config), "check-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_compose_relay_config_passes_check_config() -> None:
    result = check_config("deploy/compose/relay.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "configuration OK: sinks: kafka (kafka), mqtt (mqtt), webhook (webhook)"
    )


def test_compose_webhook_receiver_is_valid_python() -> None:
    source = (REPO / "deploy" / "compose" / "webhook-receiver.py").read_text()
    compile(source, "webhook-receiver.py", "exec")


# -- Kubernetes --------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {name: yaml.safe_load((K8S / name).read_text()) for name in kustomization["resources"]}


def by_kind(kind: str) -> dict[str, Any]:
    found = [m for m in manifests().values() if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def test_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == by_kind("Namespace")["metadata"]["name"]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The ServiceMonitor and the PrometheusRule need the Prometheus Operator's CRDs: listed,
    # commented out (tests/unit/test_deploy_monitoring.py checks the PrometheusRule).
    assert on_disk - listed == {"servicemonitor.yaml", "prometheusrule.yaml"}
    assert "servicemonitor.yaml" in (K8S / "kustomization.yaml").read_text()
    kinds = sorted(m["kind"] for m in manifests().values())
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "DaemonSet"]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    kubernetes_validate.validate(manifests()[name], version, strict=True)


def test_kubernetes_schema_check_catches_mistakes() -> None:
    daemonset = copy.deepcopy(by_kind("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True  # wrong case: strict mode rejects unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[-1], strict=True)


def test_daemonset_runs_everywhere_unprivileged_with_the_socket_read_only() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["supplementalGroups"], "the socket's group"
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (relay,) = pod["containers"]
    mounts = {m["name"]: m for m in relay["volumeMounts"]}

    socket = volumes["docker-socket"]["hostPath"]
    assert socket == {"path": "/var/run/docker.sock", "type": "Socket"}
    assert mounts["docker-socket"]["readOnly"] is True
    env = {e["name"]: e for e in relay["env"]}
    assert mounts["docker-socket"]["mountPath"] == env["DOCKER_HOST"]["value"].removeprefix(
        "unix://"
    )

    # The checkpoint survives pod restarts: on the node, where the config says it is.
    state = volumes["state"]["hostPath"]
    assert state["type"] == "DirectoryOrCreate"
    config = yaml.safe_load(by_kind("ConfigMap")["data"]["relay.yaml"])
    assert mounts["state"]["mountPath"] == config["state_dir"]

    ctx = relay["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsNonRoot"] is True and ctx.get("privileged", False) is False
    for init in pod.get("initContainers", []):
        ictx = init["securityContext"]
        assert ictx["allowPrivilegeEscalation"] is False
        assert ictx["capabilities"]["drop"] == ["ALL"]
        assert set(ictx["capabilities"].get("add", [])) <= {"CHOWN"}

    resources = relay["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


def test_daemonset_node_name_probes_and_config() -> None:
    daemonset = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    env = {e["name"]: e for e in relay["env"]}
    assert env["RELAY_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    config = yaml.safe_load(by_kind("ConfigMap")["data"]["relay.yaml"])
    assert ports["metrics"] == config["http"]["port"]
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert relay["startupProbe"]["httpGet"]["path"] == "/healthz"

    # RELAY_CONFIG_FILE names a key of the ConfigMap, where it is mounted.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}
    config_path = Path(env["RELAY_CONFIG_FILE"]["value"])
    volume = volumes[mounts[str(config_path.parent)]]
    assert volume["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert config_path.name in by_kind("ConfigMap")["data"]
    secret_volume = next(v for v in volumes.values() if "secret" in v)
    assert secret_volume["secret"]["secretName"] == by_kind("Secret")["metadata"]["name"]

    # Service and annotations find the pods' metrics port.
    service = by_kind("Service")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == ports["metrics"]
    for notes in (
        service["metadata"]["annotations"],
        daemonset["spec"]["template"]["metadata"]["annotations"],
    ):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(ports["metrics"])
        assert notes["prometheus.io/path"] == "/metrics"
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]


def test_configmap_config_passes_check_config_with_the_secret_files(tmp_path: Path) -> None:
    """The ConfigMap's config, with the Secret mounted where the DaemonSet mounts it, is valid;
    every *_file it names is a key of the Secret, and no credential is in the ConfigMap."""
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    secret_mount = next(
        m["mountPath"]
        for m in relay["volumeMounts"]
        if m["name"] == next(v["name"] for v in pod["volumes"] if "secret" in v)
    )
    secret = by_kind("Secret")["stringData"]
    text = by_kind("ConfigMap")["data"]["relay.yaml"]
    referenced = set(re.findall(re.escape(secret_mount) + r"/([\w.-]+)", text))
    assert referenced == set(secret), "Secret keys and the config's *_file settings differ"
    for value in secret.values():
        assert value not in text
    mounted = tmp_path / "secrets"
    mounted.mkdir()
    for key, value in secret.items():
        (mounted / key).write_text(value)
    config = tmp_path / "relay.yaml"
    config.write_text(text.replace(secret_mount, str(mounted)))
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert "kafka (kafka), mqtt (mqtt), webhook (webhook)" in result.stdout
    for value in secret.values():
        assert value not in result.stdout + result.stderr
    settings = load_settings(config)
    webhook = next(s for s in settings.sinks if s.type == "webhook")
    assert webhook.bearer_token.get_secret_value() == secret["webhook-token"]  # type: ignore[union-attr]
