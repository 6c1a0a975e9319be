"""The real lm-eval, run as `llada-server eval`, offline, on two small tasks from local files
(tests/e2e/lm_eval_tasks: multiple choice scored by log-likelihood, and generate_until) against
the real server with an API key: every per-sample number it logs is the one a direct call to the
server gives, and its metrics follow from them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.api.stop_strings import cut_at_stop
from server.clients.lm_eval_backend import LladaServerLM
from tests.support import REPO_ROOT

from . import HTTP_TIMEOUT

TASKS = Path(__file__).parent / "lm_eval_tasks"
KEY = "eval-key"
MODEL_ARGS = {"mc_num": 4, "steps": 8, "block_length": 8, "num_concurrent": 4}
SCORING = {"mc_num": 4, "batch_size": 32, "cfg_scale": 0.0, "greedy": True, "seed": 0}


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_eval(url: str, tasks: list[str], model_args: dict, tmp_path: Path, key: str | None = None) -> tuple[Path, dict]:
    """`llada-server eval` (the real lm-eval, offline) on the local tasks: its output folder and results."""
    shutil.copytree(TASKS, tmp_path / "tasks")
    out = tmp_path / "out"
    args = ",".join([f"base_url={url}", *(f"{k}={v}" for k, v in model_args.items())])
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "server", "eval", "--include_path", ".", "--tasks", *tasks]
        + ["--model_args", args, "--log_samples", "--output_path", str(out)],
        cwd=tmp_path / "tasks",
        env={**os.environ, **offline, "PYTHONPATH": str(REPO_ROOT), **({"LLADA_API_KEY": key} if key else {})},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    return out, json.loads(results_file.read_text())["results"]


def test_lm_eval_numbers_are_the_servers(start_server, tiny_checkpoint, tmp_path):
    server = start_server("--model", str(tiny_checkpoint), "--api-key", KEY, "--shutdown-grace", "5")
    out, results = run_eval(server.url, ["llada_mc", "llada_gen"], MODEL_ARGS, tmp_path, KEY)

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=HTTP_TIMEOUT) as client:
        correct = []
        for sample in samples(out, "llada_mc"):
            scores = []
            for args, resp in zip(sample["arguments"].values(), sample["resps"]):
                pair = {"context": args["arg_0"], "continuation": args["arg_1"]}
                direct = client.post("/v1/loglikelihood", json={"requests": [pair], **SCORING})
                assert direct.status_code == 200, direct.text
                (expected,) = direct.json()["results"]
                logged, is_greedy = resp[0]
                # Equal but for float32 rounding: lm-eval's calls shared forwards with each other.
                assert float(logged) == pytest.approx(expected["loglikelihood"], rel=1e-6), (pair, logged, expected)
                assert is_greedy == str(expected["is_greedy"])
                scores.append(expected["loglikelihood"])
            correct.append(float(scores.index(max(scores)) == sample["doc"]["answer"]))
            assert sample["acc"] == correct[-1]
        assert results["llada_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

        cut = 0
        for sample in samples(out, "llada_gen"):
            (args,) = sample["arguments"].values()
            gen_kwargs = args["arg_1"]
            body = {"prompt": args["arg_0"], "gen_length": gen_kwargs["max_gen_toks"], "temperature": 0.0, "seed": 0}
            direct = client.post("/v1/generate", json={**body, "steps": 8, "block_length": 8})
            assert direct.status_code == 200, direct.text
            text, stopped = cut_at_stop(direct.json()["text"], tuple(gen_kwargs["until"]))
            assert sample["resps"] == [[text]], sample
            cut += stopped
        assert cut, "no answer met an until string: the stop path went untested"


def test_unknown_model_args_and_perplexity_tasks_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown model_args stepz"):
        LladaServerLM(stepz=8)
    with pytest.raises(ValueError):
        LladaServerLM(remasking="sideways")
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        LladaServerLM().loglikelihood_rolling([])
