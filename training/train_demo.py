"""Train the built-in demo model: LLaDA's masked-diffusion objective at toy scale, on the
documentation text of Python's standard library (training/corpus.py).

    python -m training.train_demo            # about 24 minutes on 2 CPU cores; writes
                                             # server/engine/demo_weights.safetensors

Pre-training (LLaDA's objective): per sequence a masking ratio t ~ U(eps, 1), each token masked
with probability t, cross-entropy on the masked positions weighted by 1/t, normalised by the
sequence length. Then SFT: a question in LLaDA's chat template and its answer followed by
<|eot_id|> and <|endoftext|> padding; the prompt is never masked and the loss is normalised by the
answer length (padding included, so the model learns to fill unused answer space with EOS).

The model trains on a compact vocabulary: the 262 ids the byte-level tokenizer produces and one
row that stands for every other id of LLaDA's 126464 (never an input or a target, they only need
to be unlikely). Counting that row's probability once per id it stands for (+ log of their number
on its logit) makes the loss exactly that of the full vocabulary with those rows tied, at 1/480
of the LM head's cost; loading expands the row back into equal rows (server/engine/demo.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from server.engine.demo import DEMO_WEIGHTS, SPECIAL_TOKENS, demo_codec, demo_config, save_demo_weights, tokenizer_ids
from server.engine.models.llada import LLaDAModel
from training.corpus import Corpus, chat_pairs, load_corpus

EPS = 1e-3  # smallest masking ratio, as in LLaDA's training code
EOT, EOS, MASK = SPECIAL_TOKENS["<|eot_id|>"], SPECIAL_TOKENS["<|endoftext|>"], SPECIAL_TOKENS["<|mdm_mask|>"]
FULL_VOCAB = demo_config().vocab_size


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
    t = EPS + (1 - EPS) * torch.rand(batch, 1, generator=generator)
    masked = (torch.rand(batch, length, generator=generator) < t) & maskable
    noisy = torch.where(masked, mask_row, ids)
    hidden = model.padded_hidden(noisy, key_mask)
    logits = model.logits(hidden[masked]) + offset
    per_token = F.cross_entropy(logits, ids[masked], reduction="none")
    weight = (1.0 / (t * maskable.sum(1, keepdim=True))).expand(batch, length)[masked]
    return (per_token * weight).sum() / batch


class Batches:
    """Random pre-training windows and SFT batches from one seeded generator."""

    def __init__(self, corpus: Corpus, vocab: CompactVocab, seq_len: int, batch: int, generator: torch.Generator):
        self.lookup = vocab.lookup()
        self.seq_len, self.batch, self.generator = seq_len, batch, generator
        self.stream = self._bytes("\n\n".join(doc.text for doc in corpus.train))
        self.held_out = self._bytes("\n\n".join(doc.text for doc in corpus.held_out))
        codec = demo_codec()
        self.pairs = [
            (codec.encode_chat([{"role": "user", "content": question}]), [*answer.encode(), EOT])
            for question, answer in chat_pairs(corpus.train)
        ]

    def _bytes(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def windows(self, stream: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(stream) - self.seq_len, (self.batch,), generator=generator)
        return torch.stack([stream[s : s + self.seq_len] for s in starts.tolist()])

    def pretrain(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        ids = self.lookup[self.windows(self.stream, self.generator)]
        return ids, torch.ones_like(ids, dtype=torch.bool), None

    def sft(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts of any length, each followed by its answer and 0-64 EOS (answer canvases of every
        length, so the model learns to stop wherever the canvas ends), right-padded with a key mask."""
        chosen = torch.randint(0, len(self.pairs), (self.batch,), generator=self.generator).tolist()
        extra = torch.randint(0, 65, (self.batch,), generator=self.generator).tolist()
        rows = [(*self.pairs[i], len(self.pairs[i][1]) + e) for i, e in zip(chosen, extra)]
        width = max(len(prompt) + canvas for prompt, _, canvas in rows)
        ids = torch.full((self.batch, width), EOS, dtype=torch.long)
        maskable = torch.zeros(self.batch, width, dtype=torch.bool)
        key_mask = torch.zeros(self.batch, width, dtype=torch.bool)
        for row, (prompt, answer, canvas) in enumerate(rows):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            ids[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
            maskable[row, len(prompt) : len(prompt) + canvas] = True
            key_mask[row, : len(prompt) + canvas] = True
        return self.lookup[ids], maskable, key_mask


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, flat to 60 % of the run, then a linear decay to a tenth."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_from = int(0.6 * steps)
    if step < decay_from:
        return peak
    return peak * (1 - 0.9 * (step - decay_from) / max(1, steps - decay_from))


def init_weights(model: LLaDAModel, n_layers: int, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.fill_(1.0)
        else:
            # GPT-2's scaling of the projections that write into the residual stream.
            residual = ".attn_out." in name or (".blocks." in name and name.endswith(".ff_out.weight"))
            std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
            param.data.normal_(0.0, std, generator=generator)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2200, help="optimizer steps in all (default 2200)")
    parser.add_argument("--sft-steps", type=int, default=400, help="of which the last ones are SFT (default 400)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=192, help="pre-training window in bytes")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--mlp-hidden", type=int, default=512)
    parser.add_argument("--docs", type=int, default=None, help="train on the first N documents only (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default=str(DEMO_WEIGHTS), help=f"weights file (default {DEMO_WEIGHTS})")
    args = parser.parse_args(argv)
    if not 0 <= args.sft_steps <= args.steps:
        parser.error("--sft-steps must be between 0 and --steps")

    generator = torch.Generator().manual_seed(args.seed)
    corpus = load_corpus()
    if args.docs is not None:
        corpus = Corpus(train=corpus.train[: args.docs], held_out=corpus.held_out[: max(1, args.docs // 20)])
    vocab = CompactVocab()
    lookup = vocab.lookup()
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
    batches = Batches(corpus, vocab, args.seq_len, args.batch, generator)
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
    start = time.monotonic()
    model.train()
    for step in range(args.steps):
        phase = "sft" if step >= args.steps - args.sft_steps else "pretrain"
        ids, maskable, key_mask = batches.sft() if phase == "sft" else batches.pretrain()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
        loss = diffusion_loss(model, ids, maskable, key_mask, mask_row, offset, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history[phase].append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = history[phase][-args.log_every :]
            print(
                f"step {step + 1}/{args.steps} {phase} loss {sum(recent) / len(recent):.4f} "
                f"({time.monotonic() - start:.0f} s)",
                flush=True,
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
