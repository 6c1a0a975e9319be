"""Quality figures of the demo model on held-out text (docs/BENCHMARKS.md "The demo model"):
the ELBO in bits per byte (the estimator of /v1/loglikelihood), sample answers, and for each
fast decoding mode its agreement with the exact answer and the ELBO of its answers.

    python -m training.quality --json demo_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

from server.engine.demo import build_demo, load_demo
from server.engine.denoiser import run_jobs
from server.engine.likelihood import score_pairs
from server.engine.loader import LoadedModel
from server.engine.sampling_params import SamplingParams, ScoreParams
from training.corpus import chat_pairs, load_corpus

CONTEXT_BYTES = 64
CONTINUATION_BYTES = 64
QUESTIONS = (
    "What does json.dumps do?",
    "Explain os.path.join.",
    "What is the if topic?",
    "Tell me about collections.",
    "What does str.split do?",
    "Explain the module re.",
    "What does math.sqrt do?",
    "Tell me about sorted.",
)
MODES = {
    "exact": {},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "threshold 0.9": {"threshold": 0.9},
    "prefix + threshold 0.9": {"cache": "prefix", "threshold": 0.9},
    "dual + threshold 0.9": {"cache": "dual", "threshold": 0.9},
    "dual + factor 1.0": {"cache": "dual", "factor": 1.0},
}


def held_out_pairs(count: int) -> list[tuple[str, str]]:
    """(context, continuation): the first bytes of held-out documents long enough for both."""
    texts = [
        d.text.encode() for d in load_corpus().held_out if len(d.text.encode()) >= CONTEXT_BYTES + CONTINUATION_BYTES
    ]
    cut = [(t[:CONTEXT_BYTES], t[CONTEXT_BYTES : CONTEXT_BYTES + CONTINUATION_BYTES]) for t in texts[:count]]
    return [(c.decode(errors="ignore"), x.decode(errors="ignore")) for c, x in cut]


def bits_per_byte(loaded: LoadedModel, pairs: list[tuple[str, str]], mc_num: int, seed: int = 0) -> float:
    """-ELBO of each continuation given its context, in bits per continuation byte, over all pairs."""
    encoded = [loaded.codec.encode_pair(context, continuation) for context, continuation in pairs]
    results = score_pairs(loaded, encoded, ScoreParams(mc_num=mc_num, batch_size=min(mc_num, 32), seed=seed))
    n_bytes = sum(len(continuation.encode()) for _, continuation in pairs)
    return -sum(r.loglikelihood for r in results) / (n_bytes * math.log(2))


def chat_answers(loaded: LoadedModel, questions: list[str], params: SamplingParams) -> list[tuple[list[int], str, int]]:
    """(answer tokens, text, nfe) for each question asked as a one-turn chat, all in one batch."""
    prompts = [loaded.codec.encode_chat([{"role": "user", "content": q}]) for q in questions]
    jobs = run_jobs(loaded, prompts, [params] * len(prompts))
    return [(job.answer, loaded.codec.answer_text(job.answer, loaded.special.stops)[0], job.steps_done) for job in jobs]


@dataclass
class ModeFigures:
    mode: str
    identical: int  # answers equal to the exact one, token for token
    nfe: float  # mean forwards per answer
    bits_per_byte: float  # ELBO of the answers given their questions, by the model itself


def mode_figures(loaded: LoadedModel, questions: list[str], base: SamplingParams, mc_num: int) -> list[ModeFigures]:
    exact = chat_answers(loaded, questions, base)
    figures = []
    for mode, fields in MODES.items():
        answers = exact if not fields else chat_answers(loaded, questions, SamplingParams(**{**asdict(base), **fields}))
        chats = [loaded.codec.chat_text([{"role": "user", "content": q}]) for q in questions]
        scored = [(c, text) for c, (_, text, _) in zip(chats, answers) if text]
        figures.append(
            ModeFigures(
                mode=mode,
                identical=sum(a[0] == e[0] for a, e in zip(answers, exact)),
                nfe=sum(a[2] for a in answers) / len(answers),
                bits_per_byte=bits_per_byte(loaded, scored, mc_num) if scored else float("nan"),
            )
        )
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="held-out passages scored")
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    trained, random_weights = load_demo(), build_demo()
    pairs = held_out_pairs(args.pairs)
    report: dict = {
        "held_out_pairs": len(pairs),
        "mc_num": args.mc_num,
        "bits_per_byte": {
            "trained": bits_per_byte(trained, pairs, args.mc_num),
            "random": bits_per_byte(random_weights, pairs, args.mc_num),
        },
    }
    base = SamplingParams(gen_length=64, steps=64, block_length=32)
    # The exact sampler's greedy answers, and the authors' setting for short Instruct answers
    # (random remasking), seeded.
    report["samples"] = {
        name: [
            {"prompt": q, "text": text, "nfe": nfe}
            for q, (_, text, nfe) in zip(QUESTIONS, chat_answers(trained, list(QUESTIONS), params))
        ]
        for name, params in (
            ("temperature 0, low_confidence", base),
            (
                "temperature 0, random remasking, seed 0",
                SamplingParams(**{**asdict(base), "remasking": "random", "seed": 0}),
            ),
        )
    }
    held_questions = [q for q, _ in chat_pairs(load_corpus().held_out)][:16]
    report["modes"] = [asdict(f) for f in mode_figures(trained, held_questions, base, args.mc_num)]
    report["seconds"] = time.monotonic() - start
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
