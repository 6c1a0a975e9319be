"""Quality figures of the demo model (docs/BENCHMARKS.md "The demo model"): the ELBO of held-out
text in bits per byte (the estimator of /v1/loglikelihood); how it answers 100 questions about
documented names it was trained on and 100 held-out ones (exact first sentence, mean word-overlap
F1 with the docstring's summary, distinct answers); sample answers; and for each fast decoding
mode its agreement with the exact answer and the ELBO of its answers.

    python -m training.quality --json demo_quality.json
    python -m training.quality --weights old.safetensors --no-modes   # another weights file
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from server.engine.demo import DEMO_WEIGHTS, VOCAB_TENSORS, build_demo, load_demo, tokenizer_ids
from server.engine.denoiser import run_jobs
from server.engine.likelihood import score_pairs
from server.engine.loader import LoadedModel
from server.engine.sampling_params import SamplingParams, ScoreParams
from training.corpus import chat_pairs, load_corpus

ASKED = 100  # train and held-out questions asked
# The sampler the answer figures are measured with: the server's defaults (LLaDA's README), and
# the same with the dual cache and a confidence threshold.
ANSWER_SETTINGS = {
    "exact": SamplingParams(gen_length=128, steps=128, block_length=32, early_stop=True),
    "dual + threshold 0.9": SamplingParams(
        gen_length=128, steps=128, block_length=32, cache="dual", threshold=0.9, early_stop=True
    ),
}
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


def spread(items: list, count: int) -> list:
    """count items evenly spaced through the list (all of them if it is shorter)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def question_sets(count: int = ASKED) -> dict[str, list[tuple[str, str]]]:
    """(question, docstring summary) pairs: `count` of the SFT pairs the model was trained on and
    `count` about held-out documents, each evenly spaced through its list."""
    corpus = load_corpus()
    return {"train": spread(chat_pairs(corpus.train), count), "held_out": spread(chat_pairs(corpus.held_out), count)}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1 on lower-cased words."""
    a, r = words(answer), words(reference)
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r or not common:
        return float(a == r)
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def opening_sentence(text: str) -> str:
    paragraph = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


@dataclass
class AnswerFigures:
    questions: int
    exact_first_sentence: int  # answers whose first sentence is the summary, character for character
    word_f1: float  # mean word-overlap F1 of the answer with the summary
    distinct: int  # different answers among the questions (all questions differ)
    nfe: float  # mean forwards per answer


def answer_figures(
    loaded: LoadedModel, pairs: list[tuple[str, str]], params: SamplingParams
) -> tuple[AnswerFigures, list[str]]:
    """The figures of the model's answers to the pairs' questions, and the answers."""
    answered = chat_answers(loaded, [q for q, _ in pairs], params)
    answers = [text.strip() for _, text, _ in answered]
    figures = AnswerFigures(
        questions=len(pairs),
        exact_first_sentence=sum(opening_sentence(a) == summary for a, (_, summary) in zip(answers, pairs)),
        word_f1=sum(word_f1(a, summary) for a, (_, summary) in zip(answers, pairs)) / len(pairs),
        distinct=len(set(answers)),
        nfe=sum(n for _, _, n in answered) / len(answered),
    )
    return figures, answers


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="held-out passages scored (0: no ELBO)")
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--asked", type=int, default=ASKED, help="train and held-out questions asked")
    parser.add_argument("--weights", default=str(DEMO_WEIGHTS), help="demo weights file (default: the shipped one)")
    parser.add_argument(
        "--settings", nargs="*", default=list(ANSWER_SETTINGS), choices=list(ANSWER_SETTINGS), help="answer samplers"
    )
    parser.add_argument("--no-modes", action="store_true", help="skip the fast decoding table")
    parser.add_argument("--no-random", action="store_true", help="skip the random-weight model's ELBO")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    trained = load_demo(path=Path(args.weights))
    pairs = held_out_pairs(args.pairs) if args.pairs else []
    report: dict = {
        "weights": args.weights,
        "parameters": sum(p.numel() for p in trained.model.parameters())
        - (trained.config.vocab_size - len(tokenizer_ids()) - 1) * trained.config.d_model * len(VOCAB_TENSORS),
        "held_out_pairs": len(pairs),
        "mc_num": args.mc_num,
        "bits_per_byte": {"trained": bits_per_byte(trained, pairs, args.mc_num)} if pairs else {},
    }
    if pairs and not args.no_random:
        report["bits_per_byte"]["random"] = bits_per_byte(build_demo(), pairs, args.mc_num)
    print(json.dumps(report, indent=2), flush=True)
    asked = question_sets(args.asked)
    report["answers"] = {}
    for name in args.settings:
        report["answers"][name] = {}
        for split, chosen in asked.items():
            figures, answers = answer_figures(trained, chosen, ANSWER_SETTINGS[name])
            report["answers"][name][split] = {
                **asdict(figures),
                "answers": [{"question": q, "summary": a, "answer": t} for (q, a), t in zip(chosen, answers)],
            }
            print(name, split, json.dumps(asdict(figures)), flush=True)
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
    if not args.no_modes:
        held_questions = [q for q, _ in chat_pairs(load_corpus().held_out)][:16]
        report["modes"] = [asdict(f) for f in mode_figures(trained, held_questions, base, args.mc_num)]
    report["seconds"] = time.monotonic() - start
    summary = {k: v for k, v in report.items() if k != "answers"}
    summary["answers"] = {
        name: {split: {k: v for k, v in f.items() if k != "answers"} for split, f in splits.items()}
        for name, splits in report["answers"].items()
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return report


if __name__ == "__main__":
    main()
