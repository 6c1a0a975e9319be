"""Tokenizer wrapper: LLaDA's special ids, the chat template and answer decoding.

The tokenizer is built straight from `tokenizer.json` and the fields of `tokenizer_config.json`,
never through AutoTokenizer, so a checkpoint's `auto_map` cannot make transformers import the
checkpoint's Python or ask on stdin whether to trust it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from server.engine.errors import CheckpointError, read_json_object

# The family's token strings, for checkpoints whose tokenizer_config.json does not name them:
# LLaDA's and LLaDA-MoE / LLaDA2's (FAMILY.md).
EOT_TOKENS = ("<|eot_id|>", "<|role_end|>")
BOS_TOKEN = "<|startoftext|>"
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")
SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    eos: int
    eot: int | None
    bos: int | None

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(i for i in (self.eos, self.eot) if i is not None)


class TextCodec:
    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> TextCodec:
        tokenizer_file = folder / "tokenizer.json"
        config_file = folder / "tokenizer_config.json"
        for path in (tokenizer_file, config_file):
            if not path.is_file():
                raise CheckpointError(f"{folder} has no {path.name}: the tokenizer cannot be loaded")
        settings = read_json_object(config_file)
        kwargs = {}
        for name in SPECIAL_TOKEN_FIELDS:
            value = settings.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                kwargs[name] = value
        template = settings.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        if isinstance(template, list):  # [{name, template}, ...]: the default one serves chat
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)
        except Exception as exc:  # the tokenizers library raises bare Exceptions on bad files
            raise CheckpointError(f"{tokenizer_file} cannot be read as a tokenizer: {exc}") from exc
        if template:
            tokenizer.chat_template = template
        return cls(tokenizer)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def mask_token(self) -> tuple[str | None, int | None]:
        """The tokenizer's mask token and its id: its `mask_token`, else a family mask string."""
        if self.tokenizer.mask_token is not None:
            return self.tokenizer.mask_token, self.tokenizer.mask_token_id
        for token in MASK_TOKENS:
            if self.token_id(token) is not None:
                return token, self.token_id(token)
        return None, None

    def end_of_turn(self) -> int | None:
        """The end-of-turn token that closes a chat answer: the special token the chat template
        writes right after a message's content, else one of the family's known strings."""
        if self.has_chat_template:
            content = "end-of-turn probe"
            after = self.chat_text([{"role": "user", "content": content}]).split(content, 1)[-1]
            added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
            token = next((t for t in added if after.startswith(t)), None)
            if token is not None:
                return self.token_id(token)
        return next((self.token_id(t) for t in EOT_TOKENS if self.token_id(t) is not None), None)

    @property
    def max_token_id(self) -> int:
        return max(self.tokenizer.get_vocab().values())

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The templated prompt, ending with the assistant header the model answers after."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template already writes BOS; adding special tokens again would double it.
        return self.encode(self.chat_text(messages), add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def answer_text(self, answer_ids: list[int], stops: tuple[int, ...]) -> tuple[str, bool]:
        """Text up to the first stop token, and whether a stop token was there."""
        for i, token in enumerate(answer_ids):
            if token in stops:
                return self.decode(answer_ids[:i]), True
        return self.decode(answer_ids), False

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation, and the
        continuation is the tail of the encoded whole, so merges across the seam count."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_ids = self.tokenizer(context)["input_ids"]
        return context_ids, whole[len(context_ids) :]
