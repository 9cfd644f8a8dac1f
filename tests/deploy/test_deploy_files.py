"""docker-compose.yml and docker/Dockerfile checked against the code, without a Docker engine.

Each service's flags are parsed the way the service parses them, from the environment the
compose file gives it (interpolations resolved to their defaults), so a renamed env var, a
port that the health check does not probe, or a COPY of a folder that moved fails here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.kvstore.config import ExecutorGeometry, parse_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# ${NAME:-default} and ${NAME-default}: compose's interpolation with a default.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")
ADDRESS = re.compile(r"^(?:[a-z]+://)?(?P<host>[a-z][a-z0-9-]*):(?P<port>\d+)(?:/.*)?$")


class RecordingEnv(dict[str, str]):
    """An environment that remembers which variables the code asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def interpolate(value: object) -> str:
    return INTERPOLATION.sub(lambda m: m.group("default") or "", str(value))


def app_services() -> Iterator[tuple[str, dict[str, Any]]]:
    """The services that run this repository's image (`python -m <module>`)."""
    for name, service in SERVICES.items():
        if service.get("command", [])[:2] == ["python", "-m"]:
            yield name, service


def module_of(service: dict[str, Any]) -> str:
    return service["command"][2]


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: interpolate(value) for key, value in service.get("environment", {}).items()}


def parse_flags(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], set[str]]:
    """The service's settings as its own parser reads them from the compose environment,
    and the environment variables that parser asked for."""
    service = SERVICES[name]
    env = RecordingEnv(environment(service))
    module = module_of(service)
    if module == "services.kvstore":  # takes its environment as an argument
        def describe(address: str, timeout_s: float) -> ExecutorGeometry:
            return ExecutorGeometry(block_bytes=4096, block_size=16, fingerprint="fp")

        config = parse_config([], env, describe=describe)
        settings = {f: getattr(config, f) for f in config.__dataclass_fields__}
        settings["from_executor"] = env.get("FASTSWITCH_KVSTORE_FROM_EXECUTOR")
        return settings, env.read
    main = importlib.import_module(f"{module}.__main__")
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)
        args = main.parse_args([])
    return vars(args), env.read


def env_names_in_source(module: str) -> set[str]:
    """FASTSWITCH_* names written out as string literals in the service's entry point."""
    spec = importlib.util.find_spec(f"{module}.__main__")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    return {
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and re.fullmatch(r"FASTSWITCH_[A-Z0-9_]+", node.value)
    }


def health_target(service: dict[str, Any]) -> tuple[str, int]:
    test = service["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "common.health_probe"], test
    host, port = test[4].rsplit(":", 1)
    return host, int(port)


APP_NAMES = [name for name, _ in app_services()]
KVSTORES = [n for n in APP_NAMES if module_of(SERVICES[n]) == "services.kvstore"]


def test_compose_has_the_four_services_and_a_gpu_profile() -> None:
    assert {"redis", "executor", "kvstore", "scheduler"} <= SERVICES.keys()
    assert {module_of(SERVICES[n]) for n in ("executor", "kvstore", "scheduler")} == {
        "services.executor", "services.kvstore", "services.scheduler"}
    gpu = [s for s in SERVICES.values() if "gpu" in s.get("profiles", [])]
    reserved = [
        device for s in gpu
        for device in s.get("deploy", {}).get("resources", {}).get("reservations", {})
        .get("devices", [])
    ]
    assert reserved and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"]
                            for d in reserved)


@pytest.mark.parametrize("name", APP_NAMES)
def test_command_is_an_entry_point(name: str) -> None:
    module = module_of(SERVICES[name])
    assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    probe = importlib.import_module("common.health_probe")
    assert callable(probe.main)


@pytest.mark.parametrize("name", APP_NAMES)
def test_every_env_var_is_one_the_service_reads(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, read = parse_flags(name, monkeypatch)
    known = read | env_names_in_source(module_of(SERVICES[name]))
    unknown = set(environment(SERVICES[name])) - known
    assert not unknown, f"{name} sets env vars its code never reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", APP_NAMES)
def test_ports_health_check_and_metrics_agree_with_the_flags(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    settings, _ = parse_flags(name, monkeypatch)
    host, port = health_target(service)
    service_port, metrics_port = int(settings["port"]), int(settings["metrics_port"])
    assert host == "127.0.0.1" and port == service_port
    assert metrics_port > 0, f"{name}: metrics are off in compose"
    exposed = {int(p) for p in service["expose"]}
    assert exposed == {service_port, metrics_port}
    published = {int(str(p).rsplit(":", 1)[1]) for p in service.get("ports", [])}
    assert published <= exposed


@pytest.mark.parametrize("name", APP_NAMES)
def test_addresses_name_compose_services_on_their_ports(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = parse_flags(name, monkeypatch)
    addresses = [(k, m) for k, v in settings.items() if isinstance(v, str)
                 for part in v.split(",") if (m := ADDRESS.match(part))]  # lists: a,b
    reached = {match["host"] for _, match in addresses}
    depends = set(SERVICES[name].get("depends_on", {}))
    # The stores a service finds in a Redis registry it watches (--kvstore redis://...).
    registries = {v for v in settings.values() if isinstance(v, str) and v.startswith("redis")}
    discovered = {d for d in depends - reached if d in KVSTORES
                  and parse_flags(d, monkeypatch)[0]["redis_url"] in registries}
    assert reached | discovered == depends, "waits for what it calls"
    for key, match in addresses:
        target = match["host"]
        assert target in SERVICES, f"{name}.{key} names no service: {match.string}"
        if target in APP_NAMES:
            target_settings, _ = parse_flags(target, monkeypatch)
            assert int(match["port"]) == int(target_settings["port"]), f"{name}.{key}"


@pytest.mark.parametrize("name", [*APP_NAMES, "redis"])
def test_dependencies_wait_for_health(name: str) -> None:
    for dependency, spec in SERVICES[name].get("depends_on", {}).items():
        assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
        assert "healthcheck" in SERVICES[dependency], dependency
        assert set(SERVICES[dependency].get("profiles", [])) <= set(
            SERVICES[name].get("profiles", [])), f"{name} needs {dependency} in its profiles"




def shm_volume(service: dict[str, Any]) -> str | None:
    """The named volume a service mounts at /dev/shm, if any."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume["target"] == "/dev/shm":
            assert volume["type"] == "volume" and volume["volume"]["nocopy"]
            return str(volume["source"])
    return None


@pytest.mark.parametrize("name", KVSTORES)
def test_kvstore_shares_a_tmpfs_dev_shm_with_the_executor_it_reads_geometry_from(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an IPC namespace: a volume outlives a restart of either container."""
    service = SERVICES[name]
    settings, _ = parse_flags(name, monkeypatch)
    owner = settings["from_executor"].split(":")[0]
    assert module_of(SERVICES[owner]) == "services.executor"
    volume = shm_volume(service)
    assert volume is not None and volume == shm_volume(SERVICES[owner])
    assert "ipc" not in service and "ipc" not in SERVICES[owner]
    options = COMPOSE["volumes"][volume]["driver_opts"]
    assert options["type"] == "tmpfs" and "size=" in interpolate(options["o"])
    assert settings["redis_url"], "scaled-out stores share a Redis index"


@pytest.mark.parametrize("name", KVSTORES)
def test_kvstore_scales_out(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--scale kvstore=N`: no host port, container name or hostname of its own, and no
    instance id or arena name shared by the replicas: the id is each one's hostname's."""
    service = SERVICES[name]
    assert not {"ports", "container_name", "hostname"} & service.keys()
    settings, _ = parse_flags(name, monkeypatch)
    assert settings["instance_id"] == f"{socket.gethostname()}-{settings['port']}"
    assert settings["instance_id"] in settings["arena_name"]


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_service_restarts_by_itself(name: str) -> None:
    assert SERVICES[name].get("restart") in ("unless-stopped", "on-failure", "always")


def test_the_scheduler_health_check_means_ready() -> None:
    """It probes the Scheduler service, which is NOT_SERVING while the executor is away."""
    main = importlib.import_module("services.scheduler.__main__")
    for name in [n for n in APP_NAMES if module_of(SERVICES[n]) == "services.scheduler"]:
        assert SERVICES[name]["healthcheck"]["test"][5:] == [main.SERVICE]


def test_images_are_overridable_with_official_defaults() -> None:
    assert re.fullmatch(r"\$\{FASTSWITCH_REDIS_IMAGE:-redis:[^}]+\}", SERVICES["redis"]["image"])
    args = SERVICES["executor"]["build"]["args"]
    assert args["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim-bookworm}"
    assert interpolate(args["TORCH_INDEX_CPU"]) == "https://download.pytorch.org/whl/cpu"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert not dockerfile.startswith("# syntax="), "the classic builder needs no registry"


def test_checkpoint_folder_is_a_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in app_services():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else \
                interpolate(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"
    mounts = {interpolate(v).split(":")[1] for v in SERVICES["executor"]["volumes"]
              if isinstance(v, str)}
    assert "/models" in mounts
    checkpoint = "/models/some-model"
    monkeypatch.setitem(SERVICES["executor"]["environment"], "FASTSWITCH_EXECUTOR_CHECKPOINT",
                        checkpoint)
    settings, _ = parse_flags("executor", monkeypatch)
    assert str(settings["checkpoint"]) == checkpoint
    monkeypatch.setitem(SERVICES["executor"]["environment"], "FASTSWITCH_EXECUTOR_CHECKPOINT",
                        "")
    assert parse_flags("executor", monkeypatch)[0]["checkpoint"] is None  # the tiny model


def dockerfile_instructions(path: Path) -> list[tuple[str, list[str]]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            out.append((word.upper(), args))
    return out


def test_dockerfile_copy_sources_exist() -> None:
    build = SERVICES["executor"]["build"]
    context = REPO / build["context"]
    dockerfile = context / build["dockerfile"]
    ignored = {line.strip() for line in
               (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()}
    copies = [args for word, args in dockerfile_instructions(dockerfile) if word == "COPY"]
    assert copies
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        for source in [a for a in args if not a.startswith("--")][:-1]:
            assert (context / source).exists(), f"COPY {source}: no such file"
            assert source not in ignored, f"COPY {source} is excluded by the .dockerignore"


def test_dockerfile_final_stage_is_unprivileged_and_runs_a_service() -> None:
    instructions = dockerfile_instructions(REPO / "docker" / "Dockerfile")
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    final = instructions[last_from:]
    users = [args[0] for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(" ".join(args) for word, args in final if word == "RUN")
    assert not re.search(r"apt-get install|build-essential|gcc|pip install", runs)
    cmd = next(args for word, args in reversed(final) if word == "CMD")
    assert cmd[:2] == ["python", "-m"]
    assert importlib.util.find_spec(f"{cmd[2]}.__main__") is not None
