"""docker-compose.yml, the Dockerfile and the deploy scripts, checked against the code.

No Docker engine runs here, so this keeps the deployment files honest another way: the
compose file is loaded (with .env.example's values interpolated as compose would) and
compared with the settings, the entry point script, the search attributes, the docs and
the files it mounts. The scripts that can run here do run: the entry point and health
check in a copy of the image's layout, the search-attribute job against the test's Temporal
dev server, the PostgreSQL init script against a local server.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from atelier import migrate
from atelier.messages import SEARCH_ATTRIBUTES
from atelier.settings import Settings
from atelier.settings_doc import all_env_names
from tests.postgres_db import requires_postgres, server_url

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "docker-entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
ENV_EXAMPLE = REPO / ".env.example"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

APP_SERVICES = ("migrate", "api", "worker")
PUBLISHED = {"api": 8000, "temporal-ui": 8080, "temporal": 7233}
# Settings whose defaults suit one machine, not a container: compose must set them.
SET_FOR_CONTAINERS = {
    "migrate": {"ATELIER_DATABASE_URL"},
    "api": {"ATELIER_DATABASE_URL", "ATELIER_TEMPORAL_ADDRESS", "ATELIER_TEMPORAL_NAMESPACE", "ATELIER_BLOB_DIR",
            "ATELIER_API_HOST", "ATELIER_PUBLIC_BASE_URL"},
    "worker": {"ATELIER_DATABASE_URL", "ATELIER_TEMPORAL_ADDRESS", "ATELIER_TEMPORAL_NAMESPACE", "ATELIER_BLOB_DIR",
               "ATELIER_PUBLIC_BASE_URL"},
}

# ---- reading the files as compose and docker would ------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def variables_used(text: str) -> set[str]:
    return {m.group("name") for m in _VARIABLE.finditer(text.replace("$$", ""))}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ is a literal $."""

    def value(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            if not current if op == ":?" else current is None:
                raise KeyError(f"compose would refuse to start: {name}: {arg}")
            return current
        return current or ""

    return _VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def interpolate_tree(node, env: dict[str, str]):
    """Compose interpolates the strings of the parsed file (so `KEY: ${X:-}` is "" not null)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def secrets_for_test() -> dict[str, str]:
    """.env.example with its placeholders filled in, as an operator would."""
    env = env_example()
    for key, value in env.items():
        if value == "change-me":
            env[key] = f"test-{key.lower()}-{uuid.uuid4().hex[:8]}"
    env["ATELIER_WEBHOOK_SECRET"] = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    return env


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate_tree(yaml.safe_load(raw), secrets_for_test())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def entrypoint_commands() -> set[str]:
    text = ENTRYPOINT.read_text()
    case = text[text.index('case "$cmd" in'):text.index("esac")]
    return {label for line in case.splitlines() if (m := re.match(r"\s*([a-z|-]+)\)\s*$", line))
            for label in m.group(1).split("|")}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def port_mappings(service: dict) -> list[tuple[int, int]]:
    """(host port, container port) of each published port."""
    out = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        out.append((int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


# ---- the application services -----------------------------------------------------------


def test_project_services_run_commands_the_entry_point_knows(services):
    known = entrypoint_commands()
    assert {"api", "worker", "migrate", "healthcheck"} <= known
    for name in APP_SERVICES:
        service = services[name]
        assert "entrypoint" not in service, f"{name} must keep the image's entry point"
        assert service["command"][0] in known, f"{name}: {service['command']}"
        assert service["build"]["context"] == "."
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["command"] == ["api"]
    assert services["worker"]["command"] == ["worker"]


def test_the_entry_point_runs_the_real_modules():
    text = ENTRYPOINT.read_text()
    assert "exec python -m starter.api" in text
    assert "exec python -m worker" in text
    assert "exec python -m atelier.migrate upgrade" in text
    assert (REPO / "starter" / "api" / "__main__.py").is_file()
    assert (REPO / "worker.py").is_file()


def test_every_variable_passed_to_the_application_is_a_setting(services):
    known = set(all_env_names())
    for name in APP_SERVICES:
        ours = {k for k in environment(services[name]) if k.startswith(("ATELIER_", "GEMINI_"))}
        assert ours - known == set(), f"{name} passes variables no setting reads"


def test_settings_that_need_a_container_value_are_set(services):
    for name, required in SET_FOR_CONTAINERS.items():
        assert required <= set(environment(services[name])), name


def test_the_application_settings_load_from_the_compose_environment(services, monkeypatch):
    """What api and worker receive parses, and points at the services of this file."""
    for name in ("api", "worker"):
        for var in list(os.environ):
            if var.startswith(("ATELIER_", "GEMINI_")):
                monkeypatch.delenv(var)
        for key, value in environment(services[name]).items():
            monkeypatch.setenv(key, value)
        s = Settings()

        db = make_url(s.database_url)
        assert db.drivername == "postgresql+asyncpg" and db.host in services
        assert db.database == env_example()["APP_DB_NAME"]
        host, port = s.temporal_address.rsplit(":", 1)
        assert host in services and (int(port), int(port)) in port_mappings(services["temporal"])
        assert s.temporal_namespace == environment(services["temporal-register"])["NAMESPACE"]
        mounts = {m.split(":")[0]: m.split(":")[1] for m in services[name]["volumes"]}
        assert mounts["blobs"] == str(s.blob_dir)
        if name == "api":
            assert s.api_host == "0.0.0.0"
            assert port_mappings(services["api"]) == [(8000, s.api_port)]


def test_api_and_workers_share_one_blob_volume(compose, services):
    assert "blobs" in compose["volumes"]
    api = [v for v in services["api"]["volumes"] if v.startswith("blobs:")]
    worker = [v for v in services["worker"]["volumes"] if v.startswith("blobs:")]
    assert api == worker == [f"blobs:{environment(services['api'])['ATELIER_BLOB_DIR']}"]
    # The image creates that folder for its user, so a new named volume inherits the owner.
    assert f"mkdir -p {environment(services['api'])['ATELIER_BLOB_DIR']}" in DOCKERFILE.read_text()


def test_workers_scale_by_replicas(raw, services):
    worker = services["worker"]
    assert "${WORKER_REPLICAS:-2}" in raw
    assert int(worker["deploy"]["replicas"]) == int(env_example()["WORKER_REPLICAS"])
    assert "container_name" not in worker and "ports" not in worker  # replicas must not collide
    assert int(str(worker["stop_grace_period"]).rstrip("s")) >= 10  # worker.py drains for 10 s


# ---- secrets and .env --------------------------------------------------------------------


def test_every_compose_variable_is_in_env_example_and_none_is_stale(raw):
    used, listed = variables_used(raw), set(env_example())
    assert used - listed == set(), "used in docker-compose.yml, missing from .env.example"
    assert listed - used == set(), "listed in .env.example, used nowhere"


def test_secrets_come_from_env_never_from_the_file(raw):
    compose_raw = yaml.safe_load(raw)
    secretish = re.compile(r"PASSWORD|PWD|SECRET|TOKEN|API_KEY")
    for name, service in compose_raw["services"].items():
        for key, value in environment(service).items():
            if secretish.search(key):
                assert "${" in value, f"{name}.{key} is written in the file"
    for name in APP_SERVICES:
        assert "${APP_DB_PASSWORD" in environment(compose_raw["services"][name])["ATELIER_DATABASE_URL"]


def test_env_is_ignored_and_its_example_is_not():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0
    example = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO)
    assert example.returncode == 1


def test_compose_refuses_to_start_without_the_secrets(raw):
    env = secrets_for_test()
    for required in ("POSTGRES_PASSWORD", "APP_DB_PASSWORD", "TEMPORAL_DB_PASSWORD", "ATELIER_ADMIN_TOKEN",
                     "ATELIER_WEBHOOK_SECRET"):
        with pytest.raises(KeyError, match=required):
            interpolate_tree(yaml.safe_load(raw), {**env, required: ""})


def test_versions_are_pinned(raw):
    env = env_example()
    for var in ("POSTGRES_VERSION", "TEMPORAL_VERSION", "TEMPORAL_ADMINTOOLS_VERSION", "TEMPORAL_UI_VERSION"):
        assert re.fullmatch(r"\d+(\.\d+)*", env[var]), var
        assert "${" + var + ":?" in raw, f"{var} has no default: a missing pin must stop compose"
    assert env["TEMPORAL_VERSION"] == env["TEMPORAL_ADMINTOOLS_VERSION"]


# ---- ports and docs ----------------------------------------------------------------------


def test_published_ports_agree_with_settings_and_docs(services):
    published = {name: [host for host, _ in port_mappings(s)] for name, s in services.items() if s.get("ports")}
    assert published == {name: [port] for name, port in PUBLISHED.items()}
    assert Settings.model_fields["api_port"].default == PUBLISHED["api"]
    doc = DEPLOYMENT_DOC.read_text()
    for port in PUBLISHED.values():
        assert re.search(rf"\b{port}\b", doc), f"docs/deployment.md does not mention port {port}"


def test_the_deployment_guide_covers_its_topics():
    doc = DEPLOYMENT_DOC.read_text().lower()
    for topic in ("order of start", "scale", "--scale worker=", "--only ai", "workflow.patched", "replay",
                  "rollback", "drain", "sigterm", "back up", "pg_dump", "blobs", ":8080", "atelier.migrate"):
        assert topic in doc, topic


# ---- Temporal -------------------------------------------------------------------------------


def test_registered_search_attributes_are_the_workflows(services):
    register = services["temporal-register"]
    pairs = environment(register)["SEARCH_ATTRIBUTES"].split()
    assert dict(p.split("=", 1) for p in pairs) == SEARCH_ATTRIBUTES
    assert register["command"] == ["/scripts/register.sh"]


def test_dynamic_config_file_exists_and_parses(services):
    temporal = services["temporal"]
    path = "/etc/temporal/" + environment(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    for volume in temporal["volumes"]:
        source, target = volume.split(":")[:2]
        if path.startswith(target + "/"):
            host_file = REPO / source / path[len(target) + 1:]
            break
    else:
        pytest.fail(f"no volume holds {path}")
    assert host_file == REPO / "deploy" / "temporal" / "dynamicconfig" / "development-sql.yaml"
    config = yaml.safe_load(host_file.read_text())
    assert config, "empty dynamic config"
    for key, values in config.items():
        assert isinstance(values, list) and all("value" in v for v in values), key


def test_every_mounted_file_exists(services):
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_temporal_runs_on_postgresql_with_its_schema_job(services):
    temporal, schema = services["temporal"], services["temporal-schema"]
    assert temporal["image"].startswith("temporalio/server:")
    assert schema["image"].startswith("temporalio/admin-tools:")
    assert environment(temporal)["DB"] == "postgres12"
    assert environment(temporal)["POSTGRES_SEEDS"] == environment(schema)["POSTGRES_SEEDS"] == "postgresql"
    assert environment(temporal)["POSTGRES_USER"] == environment(schema)["SQL_USER"]
    assert environment(temporal)["POSTGRES_PWD"] == environment(schema)["SQL_PASSWORD"]
    script = (REPO / "deploy" / "temporal" / "setup-postgres.sh").read_text()
    # update-schema must be given the versioned/ folder itself (its parent silently does nothing).
    assert 'update-schema -d "$SCHEMA_ROOT/$schema/versioned"' in script
    assert re.search(r"^set_up \S+ temporal$", script, re.M) and re.search(r"^set_up \S+ visibility$", script, re.M)


# ---- start order ----------------------------------------------------------------------------


def _order(services: dict) -> list[str]:
    """A start order that honours every depends_on, or an AssertionError on a cycle."""
    done: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in visiting, f"depends_on cycle: {' -> '.join(path + (name,))}"
        if name in done:
            return
        visiting.add(name)
        for dep in depends_on(services[name]):
            visit(dep, path + (name,))
        visiting.discard(name)
        done.append(name)

    for name in services:
        visit(name, ())
    return done


def _waits_for(services: dict, name: str) -> dict[str, str]:
    """Everything `name` waits for, directly or not, with the condition of the direct edge."""
    seen: dict[str, str] = {}
    stack = [name]
    while stack:
        for dep, condition in depends_on(services[stack.pop()]).items():
            if dep not in seen:
                seen[dep] = condition
                stack.append(dep)
    return seen


def test_depends_on_is_health_gated_and_acyclic(services):
    dockerfile_has_healthcheck = any(word == "HEALTHCHECK" for word, _ in dockerfile_instructions())
    order = _order(services)
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            assert dep in services, f"{name} waits for unknown {dep}"
            assert condition in ("service_healthy", "service_completed_successfully"), f"{name} -> {dep}"
            if condition == "service_healthy":
                has_check = "healthcheck" in services[dep] or (dep in APP_SERVICES and dockerfile_has_healthcheck)
                assert has_check, f"{name} waits for {dep} to be healthy, but it has no health check"
            else:
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} is a one-shot job"
            assert order.index(dep) < order.index(name)


def test_the_documented_chain(services):
    direct = {name: depends_on(s) for name, s in services.items()}
    assert direct["temporal-schema"] == {"postgresql": "service_healthy"}
    assert direct["temporal"] == {"temporal-schema": "service_completed_successfully"}
    assert direct["temporal-register"] == {"temporal": "service_healthy"}
    assert direct["migrate"] == {"postgresql": "service_healthy"}
    for name in ("api", "worker"):
        waits = _waits_for(services, name)
        assert waits["migrate"] == "service_completed_successfully"
        assert waits["temporal-register"] == "service_completed_successfully"
        assert {"postgresql", "temporal", "temporal-schema"} <= set(waits)
    assert "healthcheck" in services["postgresql"] and "pg_isready" in str(services["postgresql"]["healthcheck"])


# ---- the Dockerfile -----------------------------------------------------------------------


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(word == "HEALTHCHECK" for word, _ in instructions)
    assert ("ENTRYPOINT", '["docker-entrypoint"]') in instructions
    assert "pip wheel --wheel-dir /wheels ." in text and "pip install" in text


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    assert ".env" in ignored and ".git" in ignored
    for word, args in dockerfile_instructions():
        if word != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            parts = Path(source).parts
            for pattern in ignored:
                for i in range(1, len(parts) + 1):
                    assert not fnmatch.fnmatch("/".join(parts[:i]), pattern), f"{source} is .dockerignored"


def test_the_image_installs_every_package_the_processes_import():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for root in ("atelier", "activities", "workflows", "starter"):
        for init in (REPO / root).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(REPO).parts)
            assert package in listed, f"{package} is not in [tool.setuptools].packages: the image would lack it"
    assert "worker" in config["py-modules"]


def test_the_image_puts_migrations_where_atelier_migrate_looks():
    text = DOCKERFILE.read_text()
    assert "COPY migrations /opt/atelier/share/atelier/migrations" in text
    assert "python -m venv /opt/atelier" in text
    # atelier.migrate's second place to look, for a prefix of /opt/atelier:
    assert migrate._CANDIDATES[1].relative_to(sys.prefix) == Path("share/atelier/migrations")


# ---- the image's scripts, run in a copy of its layout ----------------------------------------


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory) -> dict[str, str]:
    """A virtualenv laid out as the image's /opt/atelier: the installed packages (copied as a
    wheel would install them), the migrations under share/, the two scripts on PATH.
    Dependencies come from this interpreter's site-packages."""
    root = tmp_path_factory.mktemp("image")
    prefix = root / "opt-atelier"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
    python = prefix / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in config["packages"]:
        target = site / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in (REPO / Path(*package.split("."))).glob("*.py"):
            shutil.copy(module, target / module.name)
    for module in config["py-modules"]:
        shutil.copy(REPO / f"{module}.py", site / f"{module}.py")
    shutil.copytree(REPO / "migrations", prefix / "share" / "atelier" / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = prefix / "bin"
    shutil.copy(ENTRYPOINT, bin_dir / "docker-entrypoint")
    shutil.copy(HEALTHCHECK, bin_dir / "atelier-healthcheck")
    for script in ("docker-entrypoint", "atelier-healthcheck"):
        (bin_dir / script).chmod(0o755)
    work = root / "srv"
    work.mkdir()
    tmp = root / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATELIER_", "GEMINI_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", TMPDIR=str(tmp), HOME=str(root))
    return {"cwd": str(work), "tmp": str(tmp), "prefix": str(prefix), **{f"env:{k}": v for k, v in env.items()}}


def _run_in_image(layout: dict[str, str], *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k[4:]: v for k, v in layout.items() if k.startswith("env:")}
    return subprocess.run(["docker-entrypoint", *args], cwd=layout["cwd"], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_image_migrate_finds_its_scripts_and_upgrades(image_layout, tmp_path):
    url = f"sqlite:///{tmp_path}/image.db"
    run = _run_in_image(image_layout, "migrate", ATELIER_DATABASE_URL=url)
    assert run.returncode == 0, run.stderr
    # The head: the revision of the newest migration (files are numbered in order).
    newest = max((REPO / "migrations" / "versions").glob("[0-9]*.py"))
    head = re.search(r'^revision: str = "([^"]+)"', newest.read_text(), re.M).group(1)
    assert f"is at revision {head}" in run.stdout, run.stdout
    where = _run_in_image(image_layout, "python", "-c",
                          "import atelier.migrate as m; print(m.script_location(), m.__file__)")
    location, module = where.stdout.split()
    assert Path(location) == Path(image_layout["prefix"]) / "share" / "atelier" / "migrations"
    assert not module.startswith(str(REPO)), "the test must use the copied package, not the checkout"
    healthy = _run_in_image(image_layout, "healthcheck")
    assert healthy.returncode == 0 and "healthy (migrate)" in healthy.stdout


def test_image_worker_and_api_modules_import(image_layout):
    worker = _run_in_image(image_layout, "worker", "--help")
    assert worker.returncode == 0, worker.stderr
    assert "--only" in worker.stdout
    api = _run_in_image(image_layout, "python", "-c", "import starter.api.app; print('ok')")
    assert api.returncode == 0 and api.stdout.strip() == "ok", api.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_role(layout: dict[str, str], role: str) -> None:
    (Path(layout["tmp"]) / "atelier-role").write_text(role + "\n")


def test_image_healthcheck_of_a_worker_follows_temporal(image_layout):
    _set_role(image_layout, "worker")
    closed = _free_port()
    down = _run_in_image(image_layout, "healthcheck", ATELIER_TEMPORAL_ADDRESS=f"127.0.0.1:{closed}")
    assert down.returncode == 1 and "unhealthy (worker)" in down.stdout
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        up = _run_in_image(image_layout, "healthcheck", ATELIER_TEMPORAL_ADDRESS=f"127.0.0.1:{port}")
    assert up.returncode == 0, up.stdout


def test_image_healthcheck_of_the_api_asks_healthz(image_layout):
    _set_role(image_layout, "api")
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        up = _run_in_image(image_layout, "healthcheck", ATELIER_API_HOST="0.0.0.0",
                           ATELIER_API_PORT=str(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
    assert up.returncode == 0, up.stdout
    assert asked == ["/healthz"]
    down = _run_in_image(image_layout, "healthcheck", ATELIER_API_PORT=str(_free_port()))
    assert down.returncode == 1 and "unhealthy (api)" in down.stdout


def test_image_entry_point_passes_other_commands_through(image_layout):
    run = _run_in_image(image_layout, "sh", "-c", "echo through")
    assert run.returncode == 0 and run.stdout.strip() == "through"


# ---- the Temporal and PostgreSQL set-up scripts, for real --------------------------------------


async def test_register_script_creates_namespace_and_search_attributes(temporal_address, client):
    """deploy/temporal/register.sh against the test's Temporal dev server (the same `temporal`
    CLI the admin-tools image ships), twice: the second run changes nothing."""
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

    namespace = f"atelier-register-{uuid.uuid4().hex[:8]}"
    temporal_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{temporal_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "TEMPORAL_ADDRESS": temporal_address, "NAMESPACE": namespace, "NAMESPACE_RETENTION": "24h",
           "SEARCH_ATTRIBUTES": " ".join(f"{k}={v}" for k, v in SEARCH_ATTRIBUTES.items()), "TRIES": "20"}
    outputs = []
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            "sh", str(REPO / "deploy" / "temporal" / "register.sh"), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=180)
        assert proc.returncode == 0, out.decode()
        outputs.append(out.decode())
    assert f"creating namespace {namespace}" in outputs[0]
    assert all(f"registering search attribute {name}" in outputs[0] for name in SEARCH_ATTRIBUTES)
    assert "registering" not in outputs[1] and "creating" not in outputs[1]

    listed = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    custom = {name: kind for name, kind in listed.custom_attributes.items()}
    from temporalio.api.enums.v1 import IndexedValueType

    assert {name: IndexedValueType.Name(custom[name]) for name in SEARCH_ATTRIBUTES} == {
        name: f"INDEXED_VALUE_TYPE_{kind.upper()}" for name, kind in SEARCH_ATTRIBUTES.items()}


def _psql_major() -> int:
    if shutil.which("psql") is None:
        return 0
    version = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(\d+)\.", version)
    return int(match.group(1)) if match else 0


@requires_postgres
@pytest.mark.skipif(_psql_major() < 15, reason="needs psql 15 or newer (\\getenv), as in the postgres image")
def test_postgres_init_script_creates_owned_databases_the_app_can_migrate(tmp_path):
    """deploy/postgres/init-databases.sh, as the postgres image runs it on a new volume (and
    again: it is idempotent); then the app's own non-superuser role runs the migrations."""
    server = server_url()
    suffix = uuid.uuid4().hex[:8]
    names = {"TEMPORAL_DB_USER": f"temporal_{suffix}", "TEMPORAL_DB_PASSWORD": "t'pw",
             "APP_DB_USER": f"atelier_{suffix}", "APP_DB_PASSWORD": "app-pw", "APP_DB_NAME": f"atelier_{suffix}",
             "TEMPORAL_DB_NAME": f"temporal_{suffix}", "TEMPORAL_VISIBILITY_DB_NAME": f"temporal_vis_{suffix}"}
    env = {**os.environ, **names, "POSTGRES_USER": server.username or "postgres",
           "PGHOST": server.host or "127.0.0.1", "PGPORT": str(server.port or 5432)}
    if server.password:
        env["PGPASSWORD"] = server.password

    def psql(sql: str) -> str:
        return subprocess.run(["psql", "-X", "-At", "-U", env["POSTGRES_USER"], "-d", "postgres", "-c", sql],
                              env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    try:
        for _ in range(2):
            run = subprocess.run(["sh", str(REPO / "deploy" / "postgres" / "init-databases.sh")], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
        owners = psql(f"SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database "
                      f"WHERE datname LIKE '%{suffix}' ORDER BY datname").splitlines()
        assert owners == sorted([f"atelier_{suffix}=atelier_{suffix}", f"temporal_{suffix}=temporal_{suffix}",
                                 f"temporal_vis_{suffix}=temporal_{suffix}"])
        assert psql(f"SELECT rolsuper FROM pg_roles WHERE rolname = 'atelier_{suffix}'") == "f"
        app_url = server.set(username=f"atelier_{suffix}", password="app-pw", database=f"atelier_{suffix}")
        url = app_url.render_as_string(hide_password=False)
        migrate.upgrade(url)
        assert migrate.current(url) == migrate.head()
    finally:
        for db in (f"atelier_{suffix}", f"temporal_{suffix}", f"temporal_vis_{suffix}"):
            psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for role in (f"atelier_{suffix}", f"temporal_{suffix}"):
            psql(f'DROP ROLE IF EXISTS "{role}"')
