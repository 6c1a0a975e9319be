"""The one-command GPU check runs on the CPU too (--device cpu --small): every section is in its
JSON, and 8 concurrent requests give the answers they give alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dataclasses

import torch

from loadtests.gpu_check import MODES, MOE_7B_SHAPE, SECTIONS
from server.engine.loader import load_checkpoint
from server.engine.models import build_model
from tests.family import write_llada_moe_checkpoint
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

    moe = result["llada_moe"]
    assert moe["expert_kernels"] == ["OneDNNExperts"]  # the loader's CPU swap ran on the MoE model
    assert {r["batch"] for r in moe["runs"]} == {1, 4}
    assert all(r["tokens"] > 0 and r["finished_jobs"] == r["jobs"] for r in moe["runs"]), moe["runs"]

    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 3 and all(isinstance(g["met"], bool) for g in goals.values())


def test_the_moe_section_builds_llada_moe_7b_a1b_shape(tmp_path: Path):
    """What the GPU run builds, on the meta device: LLaDA-MoE-7B-A1B's 7B parameters, 1B active."""
    template = load_checkpoint(write_llada_moe_checkpoint(tmp_path / "moe"), device="cpu", dtype="float32")
    config = dataclasses.replace(template.config, moe_layer_freq=(), **MOE_7B_SHAPE)
    with torch.device("meta"):
        model = build_model(config)
    total = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < total < 7.5e9, total
