"""The container files: docker-compose.yml is valid for both profiles, the Dockerfile is sane.

`docker-compose config` (the distribution's docker-compose, installed by `make test`)
validates the compose file with and without the postgres profile. Without docker-compose
the test is skipped, except under CI=true, where that is a failure. The image's entrypoint
script runs for real against the project's CLI: it migrates, then hands over, and gives
up with the database's error when the database never answers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study_query_llm.db import migrate

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|AUTH_USERS|DATABASE_URL", re.I)


@pytest.fixture(scope="module")
def compose_bin() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true: the compose file must be validated")
        pytest.skip(message)
    return found


def compose_config(compose_bin: str, tmp_path: Path, *args: str, env: dict | None = None) -> dict:
    """`docker-compose config` of the project's file, with an empty .env beside it."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / ".env").write_text("")
    shutil.copy(ROOT / "docker-compose.yml", project / "docker-compose.yml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PANEL_", "POSTGRES_"))}
    done = subprocess.run(
        [compose_bin, *args, "config"],
        cwd=project,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_without_profile_runs_the_app_on_sqlite(compose_bin: str, tmp_path: Path) -> None:
    config = compose_config(compose_bin, tmp_path)
    app = config["services"]["app"]
    assert app["restart"] == "unless-stopped"
    assert app["ports"] == ["127.0.0.1:5006:5006/tcp"]
    assert "panel_app.health" in app["healthcheck"]["test"]
    assert "app-data:/app/data:rw" in app["volumes"]
    assert "DATABASE_URL" not in app.get("environment", {}), "the database comes from .env"
    assert set(config["volumes"]) >= {"app-data", "postgres-data"}


def test_compose_postgres_profile_has_pgvector_with_a_health_check(
    compose_bin: str, tmp_path: Path
) -> None:
    config = compose_config(compose_bin, tmp_path, "--profile", "postgres")
    postgres = config["services"]["postgres"]
    assert postgres["profiles"] == ["postgres"]
    assert "pgvector" in postgres["image"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "postgres-data:/var/lib/postgresql/data:rw" in postgres["volumes"]
    app = config["services"]["app"]
    assert "profiles" not in app, "the app runs in both setups"


def test_compose_takes_port_password_and_publish_address_from_the_environment(
    compose_bin: str, tmp_path: Path
) -> None:
    env = {
        "PANEL_PORT": "8080",
        "PANEL_PUBLISH_ADDRESS": "0.0.0.0",
        "POSTGRES_PASSWORD": "from-the-env-file",
    }
    config = compose_config(compose_bin, tmp_path, "--profile", "postgres", env=env)
    app, postgres = config["services"]["app"], config["services"]["postgres"]
    assert app["ports"] == ["0.0.0.0:8080:8080/tcp"]
    assert app["environment"]["PANEL_PORT"] == "8080"
    assert app["environment"]["PGPASSWORD"] == "from-the-env-file"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "from-the-env-file"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_dockerfile_is_multi_stage_non_root_with_health_check_and_no_secrets() -> None:
    rows = _instructions()
    stages = [rest for word, rest in rows if word == "FROM"]
    assert len(stages) >= 2 and any(" AS build" in s for s in stages), "build and runtime stages"
    users = [rest for word, rest in rows if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert ("EXPOSE", "5006") in rows
    assert any(w == "HEALTHCHECK" and "panel_app.health" in r for w, r in rows)
    assert ("VOLUME", '["/app/data"]') in rows
    assert any(w == "ENTRYPOINT" and "docker-entrypoint" in r for w, r in rows)
    for word, rest in rows:
        if word in ("ENV", "ARG"):
            assert not SECRET_NAME.search(rest), f"a setting baked into the image: {rest}"
        if word in ("COPY", "ADD"):
            assert ".env" not in rest.split(), f"copies .env: {rest}"
    assert "study-query-llm db upgrade" in ENTRYPOINT.read_text(), "migrates at start"


def test_dockerignore_keeps_env_files_and_data_out_of_the_build() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded unless listed"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src/", "docker/entrypoint.sh"}


def _entrypoint(tmp_path: Path, env: dict[str, str], *command: str):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG"))}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command],
        cwd=tmp_path,
        env={**clean, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_entrypoint_migrates_then_runs_the_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'app.db'}"
    done = _entrypoint(tmp_path, {"DATABASE_URL": url}, "sh", "-c", "echo handed over")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "handed over"
    assert migrate.current(url) == migrate.head()


def test_entrypoint_gives_up_when_the_database_never_answers(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": "postgresql+psycopg://study@127.0.0.1:1/none",
        "DATABASE_WAIT_S": "0",
    }
    done = _entrypoint(tmp_path, env, "sh", "-c", "echo should not run")
    assert done.returncode == 1
    assert "should not run" not in done.stdout
    assert "database problem" in done.stderr and "giving up" in done.stderr
