"""Static checks of the deployment files (no Docker engine needed).

compose.yaml, the Prometheus and Grafana provisioning, the dashboard (every metric it queries
must be one the server exports) and the Dockerfile.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from server.api.ui import PAGE_FILES
from server.metrics import Metrics

from .dashboard_names import (
    dashboard_exprs,
    dashboard_metric_names,
    exported_sample_names,
    iter_panels,
    load_dashboard,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra installs tomli on Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "llada.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

GRAFANA_DASHBOARDS_DIR = "/var/lib/grafana/dashboards"


def _yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _yaml(COMPOSE)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, container target) of each short-syntax volume."""
    out = []
    for vol in service.get("volumes") or []:
        parts = vol.split(":")
        if len(parts) >= 2 and parts[-1] in ("ro", "rw", "z", "Z") and len(parts) >= 3:
            parts = parts[:-1]
        out.append((":".join(parts[:-1]), parts[-1]))
    return out


# ---- compose -------------------------------------------------------------------------------


def test_compose_services(compose):
    assert {"llada", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_llada_service(compose):
    llada = compose["services"]["llada"]
    build = llada["build"]
    assert build["context"] == ".."
    assert build["dockerfile"] == "Dockerfile"
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    env = _env(llada)
    assert env["LLADA_HOST"] == "0.0.0.0"
    assert env["LLADA_PORT"] == "8000"
    assert "LLADA_MODEL" not in env, "the default compose stack runs the built-in demo model"
    assert any(
        target == "/models" and vol.endswith(":ro") for (_, target), vol in zip(_mounts(llada), llada["volumes"])
    ), llada["volumes"]
    assert any(str(p).split(":")[-1] == "8000" for p in llada["ports"])


def test_compose_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for source, _ in _mounts(service):
            if source.startswith(("./", "../")):
                assert (DOCKER / source).exists(), f"{name}: {source} missing"


def test_compose_prometheus_and_grafana(compose):
    prom = compose["services"]["prometheus"]
    assert prom["image"].split(":")[0] == "prom/prometheus"
    assert ("./prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml") in _mounts(prom)
    graf = compose["services"]["grafana"]
    assert graf["image"].split(":")[0] == "grafana/grafana"
    assert any(str(p).split(":")[-1] == "3000" for p in graf["ports"])
    mounts = {t: s for s, t in _mounts(graf)}
    assert (DOCKER / mounts["/etc/grafana/provisioning/datasources"] / DATASOURCES.name).resolve() == DATASOURCES
    assert (
        DOCKER / mounts["/etc/grafana/provisioning/dashboards"] / DASHBOARD_PROVIDERS.name
    ).resolve() == DASHBOARD_PROVIDERS
    assert (DOCKER / mounts[GRAFANA_DASHBOARDS_DIR] / DASHBOARD.name).resolve() == DASHBOARD


# ---- prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_llada(compose):
    cfg = _yaml(PROMETHEUS_YML)
    jobs = [
        j
        for j in cfg["scrape_configs"]
        if any("llada:8000" in sc.get("targets", []) for sc in j.get("static_configs", []))
    ]
    assert len(jobs) == 1, cfg["scrape_configs"]
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    assert job.get("scrape_interval", cfg.get("global", {}).get("scrape_interval")) == "5s"
    assert "llada" in compose["services"]
    assert _env(compose["services"]["llada"])["LLADA_PORT"] == "8000"


# ---- grafana provisioning ------------------------------------------------------------------


def test_grafana_datasource():
    cfg = _yaml(DATASOURCES)
    assert cfg["apiVersion"] == 1
    (ds,) = cfg["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True


def test_grafana_dashboard_provider():
    cfg = _yaml(DASHBOARD_PROVIDERS)
    assert cfg["apiVersion"] == 1
    (provider,) = cfg["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == GRAFANA_DASHBOARDS_DIR


# ---- dashboard -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard(DASHBOARD)


def test_dashboard_is_grafana_json(dashboard):
    assert dashboard["uid"] == "llada-server"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = list(iter_panels(dashboard["panels"]))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    provisioned_uid = _yaml(DATASOURCES)["datasources"][0]["uid"]
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "row", "gauge", "bargauge", "table", "text"}
        pos = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(pos)
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if p["type"] == "row":
            continue
        assert p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": provisioned_uid}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"])["uid"] == provisioned_uid


def test_dashboard_panels_do_not_overlap(dashboard):
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            overlap = (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            )
            assert not overlap, f"{ta!r} overlaps {tb!r}"


def test_dashboard_exprs_are_balanced():
    for expr in dashboard_exprs(DASHBOARD):
        for open_, close in ("()", "{}", "[]"):
            depth = 0
            for ch in re.sub(r'"[^"]*"', '""', expr):
                depth += (ch == open_) - (ch == close)
                assert depth >= 0, expr
            assert depth == 0, expr
        assert expr.count('"') % 2 == 0, expr


def test_dashboard_queries_only_exported_metrics():
    body, _ = Metrics().render()
    exported = exported_sample_names(body.decode("utf-8"))
    used = dashboard_metric_names(DASHBOARD)
    assert used, "the dashboard queries no llada_ metric"
    assert used <= exported, f"not exported by server.metrics: {sorted(used - exported)}"


def test_dashboard_covers_the_key_metrics():
    used = dashboard_metric_names(DASHBOARD)
    for name in (
        "llada_requests_total",
        "llada_request_duration_seconds_bucket",
        "llada_time_to_first_step_seconds_bucket",
        "llada_queue_depth",
        "llada_running_jobs",
        "llada_batch_rows_sum",
        "llada_batch_rows_count",
        "llada_batch_rows_bucket",
        "llada_forward_duration_seconds_bucket",
        "llada_denoise_steps_total",
        "llada_generated_tokens_total",
        "llada_rejected_total",
        "llada_device_memory_bytes",
        "llada_kv_cache_bytes",
    ):
        assert name in used, name


def test_exported_sample_names_includes_unused_labelled_families():
    names = exported_sample_names(Metrics().render()[0].decode("utf-8"))
    # Labelled families with no children yet still export their TYPE line.
    assert "llada_requests_total" in names
    assert {
        "llada_request_duration_seconds_bucket",
        "llada_request_duration_seconds_sum",
        "llada_request_duration_seconds_count",
    } <= names
    assert "llada_requests" not in names


# ---- Dockerfile ----------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def _stages(instrs: list[tuple[str, str]]) -> list[dict]:
    stages: list[dict] = []
    for instr, args in instrs:
        if instr == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"base": words[0], "name": name, "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((instr, args))
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE)


def _dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.exists():
        return []
    return [
        ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]


def _ignored(rel: str) -> bool:
    ignored = False
    for pat in _dockerignore_patterns():
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.lstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")):
            ignored = not neg
    return ignored


def test_dockerfile_variant_selects_the_base(dockerfile):
    first_from = next(i for i, (instr, _) in enumerate(dockerfile) if instr == "FROM")
    args = [a for instr, a in dockerfile[:first_from] if instr == "ARG"]
    assert "VARIANT=cpu" in args
    stages = {s["name"]: s for s in _stages(dockerfile)}
    assert stages["runtime-cpu"]["base"].startswith("python:3.11-slim")
    assert stages["runtime-cuda"]["base"] == "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    assert stages["runtime"]["base"] == "runtime-${VARIANT}"
    assert _stages(dockerfile)[-1]["name"] == "runtime", "the final stage is the runtime"
    cpu_runs = " ".join(a for i, a in stages["runtime-cpu"]["instrs"] if i == "RUN")
    cuda_runs = " ".join(a for i, a in stages["runtime-cuda"]["instrs"] if i == "RUN")
    assert "torch" in cpu_runs and "https://download.pytorch.org/whl/cpu" in cpu_runs
    assert "torch" in cuda_runs and "https://download.pytorch.org/whl/cu124" in cuda_runs
    assert "python3" in cuda_runs


def test_dockerfile_builds_and_installs_the_wheel(dockerfile):
    stages = {s["name"]: s for s in _stages(dockerfile)}
    builder_runs = " ".join(a for i, a in stages["builder"]["instrs"] if i == "RUN")
    assert "pip wheel" in builder_runs and "--no-deps" in builder_runs
    runtime = stages["runtime"]["instrs"]
    assert any(i == "COPY" and "--from=builder" in a for i, a in runtime)
    assert any(i == "RUN" and "pip install" in a and ".whl" in a for i, a in runtime)


def test_the_wheel_the_image_installs_carries_the_page_and_the_demo_model(tmp_path):
    """The Dockerfile's own build command: a non-editable install serves GET / from these files and
    the built-in demo model from its shipped weights."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name, _ in PAGE_FILES.values():
        assert f"server/api/static/{name}" in names, name
    assert "server/engine/demo_weights.safetensors" in names


def test_dockerfile_copy_sources_exist(dockerfile):
    for instr, args in dockerfile:
        if instr not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"


def test_dockerfile_context_keeps_what_the_wheel_needs():
    assert PYPROJECT.exists()
    needed = ["pyproject.toml", "server", "server/__init__.py", "server/engine/demo_weights.safetensors"]
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    readme = project.get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if readme:
        assert (ROOT / readme).exists(), f"pyproject readme {readme} missing: the wheel build fails"
        needed.append(readme)
    for rel in needed:
        assert not _ignored(rel), f".dockerignore excludes {rel}"
    for rel in (".venv", ".git", "models", "server/__pycache__", ".pytest_cache"):
        assert _ignored(rel), f".dockerignore should exclude {rel}"


def test_pyproject_matches_the_image():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == "llada-server"
    assert "llada-server" in project["scripts"]
    # The CUDA image runs Ubuntu 22.04's python3 (3.10).
    m = re.search(r">=\s*3\.(\d+)", project.get("requires-python", ""))
    assert m is None or int(m.group(1)) <= 10, project["requires-python"]


def test_dockerfile_runtime_settings(dockerfile):
    runtime = _stages(dockerfile)[-1]["instrs"]
    users = [a for i, a in runtime if i == "USER"]
    assert users, "no USER in the runtime stage"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(i == "RUN" and "useradd" in a and "10001" in a for i, a in runtime)
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "LLADA_HOST=0.0.0.0" in env and "LLADA_PORT=8000" in env
    assert any(i == "EXPOSE" and "8000" in a.split() for i, a in runtime)
    assert any(i == "VOLUME" and "/models" in a for i, a in runtime)
    (health,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/health" in health and "urllib" in health and "127.0.0.1" in health
    (entry,) = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert json.loads(entry) == ["llada-server"]
