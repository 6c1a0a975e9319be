"""The lm-eval model `llada-server`: evaluates the model a running server serves.

- `loglikelihood` asks /v1/loglikelihood, one (context, continuation) per call, so a pair's
  number depends only on the settings (mc_num, mc_batch_size, cfg_scale, seed), never on which
  other pairs share a call; the same call made by hand gives the same number.
- `generate_until` asks /v1/generate: `max_gen_toks` is gen_length, `until` are stop strings
  applied to the text (server/api/stop_strings.py), `temperature` (or `do_sample: false`, which
  means 0) is used; every other /v1/generate setting comes from model_args.
- `loglikelihood_rolling` (perplexity tasks) is not supported.

Requests go `num_concurrent` at a time; the server batches them. lm-eval passes its own
`--batch_size` to every backend, so the Monte-Carlo batch is `mc_batch_size`, and `--batch_size`
itself does not apply (the server decides what shares a forward).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from server.api.schemas import GenerateRequest
from server.api.stop_strings import cut_at_stop
from server.clients.server_api import GENERATION_SETTINGS, auth_headers, check

MODEL_NAME = "llada-server"
QUEUE_FULL_RETRIES = 10
log = logging.getLogger(__name__)
T = TypeVar("T")


@register_model(MODEL_NAME)
class LladaServerLM(LM):
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        num_concurrent: int = 8,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        greedy: bool = True,
        seed: int = 0,
        timeout: float = 600.0,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **settings: object,
    ):
        """model_args: the names above, and any /v1/generate setting (steps, block_length,
        cfg_scale, remasking, gen_length, temperature, ...). cfg_scale also applies to scoring;
        greedy=False skips the greedy check and reports every is_greedy as False. batch_size,
        max_batch_size and device are lm-eval's own flags and do not apply."""
        super().__init__()
        unknown = sorted(set(settings) - set(GENERATION_SETTINGS))
        if unknown:
            raise ValueError(
                f"{MODEL_NAME}: unknown model_args {', '.join(unknown)}; the generation settings are "
                f"{', '.join(GENERATION_SETTINGS)}"
            )
        GenerateRequest.model_validate({**settings, "prompt": "x"})  # bad values fail here, not mid-run
        if batch_size not in (None, 1, "1"):
            log.warning("%s: --batch_size does not apply (the server batches); use num_concurrent", MODEL_NAME)
        self.client = httpx.Client(base_url=base_url, headers=auth_headers(api_key), timeout=timeout)
        self.num_concurrent = int(num_concurrent)
        self.scoring = {
            "mc_num": mc_num,
            "batch_size": mc_batch_size,
            "cfg_scale": settings.get("cfg_scale", 0.0),
            "greedy": greedy,
            "seed": seed,
        }
        self.settings = {"seed": seed, **settings}
        self._warned: set[str] = set()

    def _post(self, path: str, body: dict) -> dict:
        """The answer's JSON; a full queue (429) is retried after its Retry-After."""
        retries = 0
        while True:
            response = self.client.post(path, json=body)
            if response.status_code != 429 or retries == QUEUE_FULL_RETRIES:
                return check(response).json()
            retries += 1
            time.sleep(float(response.headers.get("Retry-After", "1")))

    def _each(self, work: Callable[[tuple], T], requests: list[Instance], what: str, quiet: bool) -> list[T]:
        """work(request.args) for every request, num_concurrent at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.num_concurrent) as pool:
            answers = pool.map(work, [request.args for request in requests])
            return list(tqdm(answers, total=len(requests), desc=f"{MODEL_NAME} {what}", disable=quiet))

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._each(self._score, requests, "loglikelihood", disable_tqdm)

    def _score(self, args: tuple[str, str]) -> tuple[float, bool]:
        context, continuation = args
        body = {"requests": [{"context": context, "continuation": continuation}], **self.scoring}
        (result,) = self._post("/v1/loglikelihood", body)["results"]
        answer = (result["loglikelihood"], bool(result["is_greedy"]))
        self.cache_hook.add_partial("loglikelihood", args, answer)
        return answer

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._each(self._generate, requests, "generate_until", disable_tqdm)

    def _generate(self, args: tuple[str, dict]) -> str:
        context, gen_kwargs = args
        body = {**self.settings, "prompt": context}
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        if "max_gen_toks" in kwargs:
            body["gen_length"] = int(kwargs.pop("max_gen_toks"))
        if kwargs.pop("do_sample", None) is False:
            kwargs.pop("temperature", None)
            body["temperature"] = 0.0
        elif "temperature" in kwargs:
            body["temperature"] = float(kwargs.pop("temperature"))
        for name in sorted(set(kwargs) - self._warned):
            self._warned.add(name)
            log.warning("%s: generation_kwargs %s does not apply and is ignored", MODEL_NAME, name)
        text = self._post("/v1/generate", body)["text"]
        text, _ = cut_at_stop(text, tuple([until] if isinstance(until, str) else until))
        self.cache_hook.add_partial("generate_until", args, text)
        return text

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            f"{MODEL_NAME} does not support loglikelihood_rolling (perplexity tasks such as wikitext): the server "
            "scores a continuation given a context (loglikelihood) with LLaDA's estimator; use loglikelihood "
            "(multiple-choice) or generate_until tasks"
        )
