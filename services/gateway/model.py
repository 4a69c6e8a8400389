"""The served model as the gateway knows it: its names, tokenizer, chat template and context limit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from splitserve.engine.model_source import resolve_model

from .errors import invalid
from .schema import ChatPrompt, Prompt, TextPrompt, TokenPrompt

# tokenizer.model_max_length is this huge placeholder when the tokenizer config sets no limit.
_NO_LIMIT = 10**12


@dataclass(frozen=True)
class ServedModel:
    """Tokenizes prompts for one model; loads once at start (no weights, only the tokenizer)."""

    name: str  # what clients pass as "model" and what /v1/models lists
    root: str  # the model's own name or path
    tokenizer: Any
    config_max_model_len: int  # context limit from the model's files, until workers report theirs

    @classmethod
    def load(cls, model: str | None, served_model_name: str | None) -> ServedModel:
        from transformers import AutoTokenizer

        source = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        return cls(served_model_name or source.name, source.name, tokenizer,
                   _config_max_model_len(source.path, tokenizer))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of prompt (chat: through the chat template); ApiError when it cannot be."""
        match prompt:
            case TextPrompt(text):
                return list(self.tokenizer(text)["input_ids"])
            case ChatPrompt(messages):
                return self._apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
            case TokenPrompt(token_ids):
                self._check_token_ids(token_ids)
                return list(token_ids)

    def _apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise invalid(f"model {self.name} has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as exc:  # templates raise on e.g. roles they do not support
            raise invalid(f"chat template error: {exc}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_token_ids(self, token_ids: tuple[int, ...]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})", "prompt")


def _config_max_model_len(path: Path, tokenizer: Any) -> int:
    config_file = path / "config.json"
    if config_file.exists():
        length = json.loads(config_file.read_text()).get("max_position_embeddings")
        if isinstance(length, int) and length > 0:
            return length
    if 0 < tokenizer.model_max_length < _NO_LIMIT:
        return int(tokenizer.model_max_length)
    raise ValueError(f"{path}: cannot tell the model's context length (no max_position_embeddings)")
