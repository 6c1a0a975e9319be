"""Train the built-in demo model: LLaDA's masked-diffusion objective at toy scale, on the
documentation text of Python's standard library (training/corpus.py).

    python -m training.train_demo            # about 95 min on 2 CPU cores; writes
                                             # server/engine/demo_weights.safetensors
    python -m training.train_demo --checkpoint /tmp/demo.pt --resume   # the same, restartable

Pre-training (LLaDA's objective): per sequence a masking ratio t ~ U(eps, 1) (stratified over the
batch), each token masked with probability t, cross-entropy on the masked positions weighted by
1/t, normalised by the sequence length. The text is each document as a page: its documented name,
a blank line, its text; half the windows start at the beginning of a page or of its text. Then
SFT: a question in LLaDA's chat template and its answer followed by <|eot_id|> and <|endoftext|>
padding; the prompt is never masked and the loss is normalised by the answer length (padding
included, so the model learns to fill unused answer space with EOS).

The model trains on a compact vocabulary: the 262 ids the byte-level tokenizer produces and one
row that stands for every other id of LLaDA's 126464 (never an input or a target, they only need
to be unlikely). Counting that row's probability once per id it stands for (+ log of their number
on its logit) makes the loss exactly that of the full vocabulary with those rows tied, at 1/480
of the LM head's cost; loading expands the row back into equal rows (server/engine/demo.py).

A checkpoint (--checkpoint) holds the model, optimizer and generator state: a run resumed from
it continues as if it had not stopped, so the first 100 steps (the warm-up) and the whole
pre-training (SFT's length changes nothing before it) are the same whatever --steps says later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from server.engine.demo import DEMO_WEIGHTS, SPECIAL_TOKENS, demo_codec, demo_config, save_demo_weights, tokenizer_ids
from server.engine.model_config import ModelConfig
from server.engine.models.llada import LLaDAModel
from training.corpus import Corpus, Doc, chat_pairs, load_corpus

EPS = 1e-3  # smallest masking ratio, as in LLaDA's training code
EOT, EOS, MASK = SPECIAL_TOKENS["<|eot_id|>"], SPECIAL_TOKENS["<|endoftext|>"], SPECIAL_TOKENS["<|mdm_mask|>"]
FULL_VOCAB = demo_config().vocab_size
STEPS, SFT_STEPS, SFT_MIX = 2600, 1200, 3
# The demo model this one grows from: the shipped weights at that commit of this repository.
PREVIOUS = "git:67b0ec7"
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class CompactVocab:
    """Full LLaDA ids <-> rows of the compact model (the last row is every untrained id)."""

    ids: tuple[int, ...] = tuple(tokenizer_ids())

    @property
    def rows(self) -> int:
        return len(self.ids) + 1

    def lookup(self) -> torch.Tensor:
        table = torch.full((FULL_VOCAB,), len(self.ids), dtype=torch.long)
        table[list(self.ids)] = torch.arange(len(self.ids))
        return table

    def logit_offset(self) -> torch.Tensor:
        """Added to the compact logits: the shared row counts once per id it stands for."""
        offset = torch.zeros(self.rows)
        offset[-1] = math.log(FULL_VOCAB - len(self.ids))
        return offset


def diffusion_loss(
    model: LLaDAModel,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    key_mask: torch.Tensor | None,
    mask_row: int,
    offset: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """LLaDA's loss for a batch of compact ids; `maskable` marks the positions that may be masked
    (every real token in pre-training, the answer in SFT)."""
    batch, length = ids.shape
    # One ratio per sequence, stratified over the batch (one in each of `batch` equal strata of
    # [0, 1), in a random order): still t ~ U(eps, 1) for each sequence, a lower-variance loss.
    strata = (torch.randperm(batch, generator=generator) + torch.rand(batch, generator=generator)) / batch
    t = (EPS + (1 - EPS) * strata)[:, None]
    masked = (torch.rand(batch, length, generator=generator) < t) & maskable
    noisy = torch.where(masked, mask_row, ids)
    hidden = model.padded_hidden(noisy, key_mask)
    logits = model.logits(hidden[masked]) + offset
    per_token = F.cross_entropy(logits, ids[masked], reduction="none")
    weight = (1.0 / (t * maskable.sum(1, keepdim=True))).expand(batch, length)[masked]
    return (per_token * weight).sum() / batch


def with_title(doc: Doc) -> str:
    """A document as a documentation page shows it: the documented name, then its text."""
    return f"{doc.name.removeprefix('topic:')}\n\n{doc.text}"


class Batches:
    """Pre-training windows and SFT batches from one seeded generator.

    A pre-training window starts at a random byte of the training text (half of them), at the
    start of a document's page (its name, a quarter) or at the start of its text (a quarter): the
    openings of docstrings, which SFT answers and the held-out figures are made of, are seen far
    more often than their share of the bytes. SFT rows are drawn in groups of 8 batches and batched
    by length, so a batch is padded to rows of about its own length."""

    def __init__(
        self, corpus: Corpus, vocab: CompactVocab, seq_len: int, batch: int, sft_batch: int, generator: torch.Generator
    ):
        self.lookup = vocab.lookup()
        self.seq_len, self.batch, self.sft_batch, self.generator = seq_len, batch, sft_batch, generator
        pages, page_starts, text_starts, offset = [], [], [], 0
        for doc in corpus.train:
            page = with_title(doc).encode("utf-8")
            page_starts.append(offset)
            text_starts.append(offset + len(page) - len(doc.text.encode("utf-8")))
            pages.append(page)
            offset += len(page) + 2
        self.stream = torch.tensor(list(b"\n\n".join(pages)), dtype=torch.long)
        # Starts past the end of the stream are moved back so every window is whole.
        last = len(self.stream) - seq_len
        self.starts = torch.tensor([min(s, last) for s in page_starts + text_starts])
        self.held_out = self._bytes("\n\n".join(doc.text for doc in corpus.held_out))
        codec = demo_codec()
        self.pairs = [
            (codec.encode_chat([{"role": "user", "content": question}]), [*answer.encode(), EOT])
            for question, answer in chat_pairs(corpus.train)
        ]
        self.queue: list[list[tuple[int, int]]] = []

    def _bytes(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def windows(self, stream: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(stream) - self.seq_len, (self.batch,), generator=generator)
        return torch.stack([stream[s : s + self.seq_len] for s in starts.tolist()])

    def pretrain(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch,), generator=self.generator)
        aligned = torch.rand(self.batch, generator=self.generator) < 0.5
        picked = self.starts[torch.randint(0, len(self.starts), (self.batch,), generator=self.generator)]
        starts = torch.where(aligned, picked, starts)
        ids = self.lookup[torch.stack([self.stream[s : s + self.seq_len] for s in starts.tolist()])]
        return ids, torch.ones_like(ids, dtype=torch.bool), None

    def sft(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts of any length, each followed by its answer and 0-64 EOS (answer canvases of every
        length, so the model learns to stop wherever the canvas ends), right-padded with a key mask."""
        if not self.queue:
            group = 8 * self.sft_batch
            chosen = torch.randint(0, len(self.pairs), (group,), generator=self.generator).tolist()
            extra = torch.randint(0, 65, (group,), generator=self.generator).tolist()
            drawn = sorted(zip(chosen, extra), key=lambda r: len(self.pairs[r[0]][0]) + len(self.pairs[r[0]][1]) + r[1])
            batches = [drawn[i : i + self.sft_batch] for i in range(0, group, self.sft_batch)]
            order = torch.randperm(len(batches), generator=self.generator).tolist()
            self.queue = [batches[i] for i in order]
        rows = [(*self.pairs[i], len(self.pairs[i][1]) + e) for i, e in self.queue.pop()]
        width = max(len(prompt) + canvas for prompt, _, canvas in rows)
        ids = torch.full((len(rows), width), EOS, dtype=torch.long)
        maskable = torch.zeros(len(rows), width, dtype=torch.bool)
        key_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for row, (prompt, answer, canvas) in enumerate(rows):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            ids[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
            maskable[row, len(prompt) : len(prompt) + canvas] = True
            key_mask[row, : len(prompt) + canvas] = True
        return self.lookup[ids], maskable, key_mask


def learning_rate(step: int, steps: int, sft_steps: int, peak: float, sft_peak: float, warmup: int) -> float:
    """Pre-training: linear warm-up, then a cosine decay to a tenth by its last step. SFT: its own
    short warm-up to sft_peak, flat for half of it, then a linear decay to a tenth."""
    pretrain_steps = steps - sft_steps
    if step < pretrain_steps:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, pretrain_steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    step -= pretrain_steps
    sft_warmup = min(20, sft_steps // 10 + 1)
    if step < sft_warmup:
        return sft_peak * (step + 1) / sft_warmup
    if step < sft_steps // 2:
        return sft_peak
    return sft_peak * (1 - 0.9 * (step - sft_steps // 2) / max(1, sft_steps - sft_steps // 2))


def init_weights(model: LLaDAModel, n_layers: int, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.fill_(1.0)
        else:
            # GPT-2's scaling of the projections that write into the residual stream.
            residual = ".attn_out." in name or (".blocks." in name and name.endswith(".ff_out.weight"))
            std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
            param.data.normal_(0.0, std, generator=generator)


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A demo weights file (compact rows, server/engine/demo.py), or `git:<commit>` for the file
    shipped at that commit of this repository."""
    with tempfile.TemporaryDirectory() as tmp:
        path = source
        if source.startswith("git:"):
            path = os.path.join(tmp, "weights.safetensors")
            shipped = f"{source[4:]}:server/engine/demo_weights.safetensors"
            Path(path).write_bytes(
                subprocess.run(["git", "show", shipped], cwd=REPO, capture_output=True, check=True).stdout
            )
        with safe_open(path, framework="pt") as weights:
            config = ModelConfig(**json.loads(weights.metadata()["config"]))
            return {name: weights.get_tensor(name) for name in weights.keys()}, config


def grow(model: LLaDAModel, state: dict[str, torch.Tensor], trained_layers: int, layers: int) -> None:
    """Load a trained model of `trained_layers` blocks into `model` (`layers` blocks): its blocks
    first, then new blocks that start as the identity (their output projections zero, so the grown
    model computes exactly what the trained one did) and learn from there."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(f"model.transformer.blocks.{i}." for i in range(trained_layers, layers))
    if unexpected or not all(name.startswith(prefixes) for name in missing):
        raise ValueError(f"cannot grow: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    with torch.no_grad():
        for i in range(trained_layers, layers):
            block = model.model.transformer.blocks[i]
            block.attn_out.weight.zero_()
            block.ff_out.weight.zero_()


def save_state(path: str, step: int, model, optimizer, generator, batches, history, elapsed: float) -> None:
    torch.save(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "sft_queue": batches.queue,
            "history": history,
            "elapsed": elapsed,
        },
        path + ".tmp",
    )
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps in all (default {STEPS})")
    parser.add_argument(
        "--sft-steps", type=int, default=SFT_STEPS, help=f"of which the last ones are SFT (default {SFT_STEPS})"
    )
    parser.add_argument(
        "--sft-mix",
        type=int,
        default=SFT_MIX,
        help=f"in the SFT phase, every N-th step is pre-training (0: none; default {SFT_MIX})",
    )
    parser.add_argument("--batch", type=int, default=32, help="pre-training sequences per step")
    parser.add_argument("--sft-batch", type=int, default=32, help="SFT conversations per step")
    parser.add_argument("--seq-len", type=int, default=128, help="pre-training window in bytes")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="pre-training peak learning rate")
    parser.add_argument("--sft-lr", type=float, default=1e-3, help="SFT peak learning rate")
    parser.add_argument(
        "--init",
        default=PREVIOUS,
        help=f"trained demo weights to grow from: a file, git:<commit> or none (random weights; default {PREVIOUS})",
    )
    parser.add_argument("--layers", type=int, default=7, help="blocks (at least those of --init)")
    parser.add_argument("--d-model", type=int, default=256, help="with --init none")
    parser.add_argument("--heads", type=int, default=8, help="with --init none")
    parser.add_argument("--mlp-hidden", type=int, default=704, help="with --init none")
    parser.add_argument("--docs", type=int, default=None, help="train on the first N documents only (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the shipped run; 0: leave torch's setting)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--checkpoint", default=None, help="save the training state here every --checkpoint-every steps"
    )
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--out", default=str(DEMO_WEIGHTS), help=f"weights file (default {DEMO_WEIGHTS})")
    args = parser.parse_args(argv)
    if not 0 <= args.sft_steps <= args.steps:
        parser.error("--sft-steps must be between 0 and --steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    corpus = load_corpus()
    if args.docs is not None:
        corpus = Corpus(train=corpus.train[: args.docs], held_out=corpus.held_out[: max(1, args.docs // 20)])
    vocab = CompactVocab()
    lookup = vocab.lookup()
    init_state, init_config = read_weights(args.init) if args.init != "none" else (None, None)
    if init_config is not None:
        if args.layers < init_config.n_layers:
            parser.error(f"--layers must be at least the {init_config.n_layers} of --init")
        full_config = dataclasses.replace(init_config, n_layers=args.layers)
    else:
        shape = dict(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads)
        full_config = demo_config(**shape, mlp_hidden_size=args.mlp_hidden)
    compact = dataclasses.replace(
        full_config,
        vocab_size=vocab.rows,
        mask_token_id=int(lookup[MASK]),
        eos_token_id=int(lookup[EOS]),
        pad_token_id=int(lookup[EOS]),
    )
    model = LLaDAModel(compact)
    init_weights(model, args.layers, generator)
    if init_state is not None:
        grow(model, init_state, init_config.n_layers, args.layers)
    batches = Batches(corpus, vocab, args.seq_len, args.batch, args.sft_batch, generator)
    decay = [p for p in model.parameters() if p.dim() > 1]
    keep = [p for p in model.parameters() if p.dim() == 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    offset = vocab.logit_offset()
    mask_row = compact.mask_token_id
    params = sum(p.numel() for p in model.parameters())
    print(
        f"train: {len(corpus.train)} documents, {len(batches.stream)} bytes, {len(batches.pairs)} chat pairs; "
        f"held out: {len(corpus.held_out)} documents, {len(batches.held_out)} bytes; "
        f"{params / 1e6:.2f} M parameters (compact vocabulary of {vocab.rows} rows)",
        flush=True,
    )
    history: dict[str, list[float]] = {"pretrain": [], "sft": []}
    first_step, elapsed = 0, 0.0
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        batches.queue = state.get("sft_queue", [])
        history, first_step, elapsed = state["history"], state["step"], state["elapsed"]
        print(f"resumed at step {first_step} from {args.checkpoint}", flush=True)
    start = time.monotonic() - elapsed
    model.train()
    for step in range(first_step, args.steps):
        sft_step = step - (args.steps - args.sft_steps)
        # Every --sft-mix-th step of the SFT phase stays pre-training: SFT alone undoes the
        # held-out ELBO (3.47 bits/byte after it, against 2.92 before, in issue 23's second run).
        sft = sft_step >= 0 and not (args.sft_mix and sft_step % args.sft_mix == args.sft_mix - 1)
        phase = "sft" if sft else "pretrain"
        ids, maskable, key_mask = batches.sft() if phase == "sft" else batches.pretrain()
        lr = learning_rate(
            step,
            args.steps,
            args.sft_steps,
            args.lr,
            args.sft_lr,
            warmup=min(100, (args.steps - args.sft_steps) // 10 + 1),
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(model, ids, maskable, key_mask, mask_row, offset, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history[phase].append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = history[phase][-args.log_every :]
            print(
                f"step {step + 1}/{args.steps} {phase} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                f"({time.monotonic() - start:.0f} s)",
                flush=True,
            )
        if args.checkpoint and (step + 1) % args.checkpoint_every == 0:
            save_state(
                args.checkpoint, step + 1, model, optimizer, generator, batches, history, time.monotonic() - start
            )
    model.eval()
    with torch.no_grad():
        held_generator = torch.Generator().manual_seed(args.seed + 1)
        everything = torch.ones(args.batch, args.seq_len, dtype=torch.bool)
        held = [
            diffusion_loss(
                model,
                lookup[batches.windows(batches.held_out, held_generator)],
                everything,
                None,
                mask_row,
                offset,
                held_generator,
            ).item()
            for _ in range(8)
        ]
    summary = {
        "seconds": time.monotonic() - start,
        "parameters": params,
        "history": history,
        "held_out_loss": sum(held) / len(held),
    }
    save_demo_weights(model.state_dict(), full_config, args.out)
    print(f"held-out loss {summary['held_out_loss']:.4f}; {summary['seconds']:.0f} s; wrote {args.out}", flush=True)
    return summary


if __name__ == "__main__":
    main()
