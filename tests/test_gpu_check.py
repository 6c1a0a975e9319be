"""The one-command GPU check runs on the CPU too (--device cpu --small): every section is in its
JSON, and 8 concurrent requests give the answers they give alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtests.gpu_check import MODES, SECTIONS
from tests.support import REPO_ROOT


def test_cpu_smoke_run_reports_every_section(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.gpu_check", "--device", "cpu", "--small", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for section in SECTIONS:
        assert section in result, section
        assert not (isinstance(result[section], dict) and "error" in result[section]), result[section]
    assert result["syncs_per_step"] == "n/a on cpu"

    invariance = result["batch_invariance"]
    assert invariance["equal"] is True, invariance["checks"]
    judged = [c for c in invariance["checks"] if c["batch_invariant"] == "on"]
    assert {c["mode"] for c in judged} == {"exact", "dual_threshold"}
    assert all(c["equal_answers"] == "8/8" for c in judged), judged
    # the child process ran the same checks with it off
    assert result["batch_invariant_off"]["errors"] is None, result["batch_invariant_off"]
    assert {c["mode"] for c in invariance["checks"] if c["batch_invariant"] == "off"} == set(MODES)

    kernels = result["attention_kernels"]
    assert {"exact_full_forward_1_prompt", "dual_cached_step_1_prompt"} <= set(kernels)
    assert all(kernels[k]["verdict"] != "none seen" for k in kernels if k != "section_wall_s"), kernels

    throughput = result["throughput"]
    runs = [r for r in throughput["runs"] if "tokens_per_s" in r]
    assert {(r["mode"], r["batch"]) for r in runs} >= {("exact", 1), ("dual_threshold", 1)}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in runs), runs
    reference = throughput["reference"]
    assert reference["tokens"] > 0
    assert reference["forward_vs_oracle_max_abs_diff"] < 1e-3  # the plain forward is LLaDA's

    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 3 and all(isinstance(g["met"], bool) for g in goals.values())
