"""The served model as the gateway knows it: its names, tokenizer, chat template and context limit."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from splitserve.engine.model_source import eos_token_ids, resolve_model

from .errors import ApiError, invalid
from .limits import MAX_NAME_CHARS, max_prompt_chars
from .schema import ChatMessage, ChatPrompt, Prompt, TextPrompt, TokenPrompt
from .tools import Tool, call_text, json_or_text, system_prompt

# tokenizer.model_max_length is this huge placeholder when the tokenizer config sets no limit.
_NO_LIMIT = 10**12
# A prompt within these is tokenized on the event loop (at most ~0.5 ms on this project's VM: 512 CJK
# characters 0.34 ms, 16 chat messages 0.45, 4,096 token ids 0.08): it skips the tokenizer threads'
# hop, and never waits behind huge prompts holding both threads. A chat with tools or tool calls
# always goes to the threads (their rendering alone took 0.9 ms for a few).
INLINE_PROMPT_CHARS = 512
INLINE_PROMPT_TOKEN_IDS = 4096
INLINE_CHAT_MESSAGES = 16  # a template renders each, however short


@dataclass(frozen=True)
class ServedModel:
    """Tokenizes prompts for one model; loads once at start (no weights, only the tokenizer)."""

    name: str  # what clients pass as "model" and what /v1/models lists
    root: str  # the model's own name or path
    tokenizer: Any
    config_max_model_len: int  # context limit from the model's files, until workers report theirs
    # Characters in the longest vocabulary entry: no token covers more of a prompt's text.
    max_token_chars: int
    eos_token_ids: frozenset[int] = frozenset()  # what the workers' engines stop on (the model's EOS set)

    @classmethod
    def load(cls, model: str | None, served_model_name: str | None) -> ServedModel:
        from transformers import AutoTokenizer

        source = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        return cls(served_model_name or source.name, source.name, tokenizer,
                   _config_max_model_len(source.path, tokenizer), _max_token_chars(tokenizer),
                   eos_token_ids(source, tokenizer))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_prompt_size(self, prompt: Prompt, max_model_len: int) -> None:
        """Refuses, without tokenizing it, a prompt that cannot fit max_model_len tokens."""
        limit = max_prompt_chars(max_model_len, self.max_token_chars)
        _check_encodable(prompt)
        match prompt:
            case TextPrompt(text) if len(text) > limit:
                raise _too_long("prompt", f"{len(text)} characters", max_model_len, limit)
            case TokenPrompt(token_ids) if len(token_ids) >= max_model_len:
                raise _too_long("prompt", f"{len(token_ids)} tokens", max_model_len)
            case ChatPrompt(messages, tools):
                if len(messages) >= max_model_len:  # every message is at least one token
                    raise _too_long("messages", f"{len(messages)} messages", max_model_len)
                if any(len(m.role) > MAX_NAME_CHARS or len(m.name or "") > MAX_NAME_CHARS for m in messages):
                    raise invalid(f"a message's role and name must be at most {MAX_NAME_CHARS} characters",
                                  "messages")
                num_chars = sum(map(len, _chat_strings(messages, tools)))
                if num_chars > limit:
                    raise _too_long("messages", f"{num_chars} characters", max_model_len, limit)

    def check_token_ids(self, token_ids: tuple[int, ...], param: str) -> None:
        vocab_size = self.vocab_size
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
            bad = next(t for t in token_ids if not 0 <= t < vocab_size)
            raise invalid(f"token id {bad} is out of the vocabulary (size {vocab_size})", param)

    @staticmethod
    def encodes_quickly(prompt: Prompt) -> bool:
        """Whether prompt is short enough to tokenize on the event loop (checked by size first)."""
        match prompt:
            case TextPrompt(text):
                return len(text) <= INLINE_PROMPT_CHARS
            case TokenPrompt(token_ids):
                return len(token_ids) <= INLINE_PROMPT_TOKEN_IDS
            case ChatPrompt(messages, tools):
                return (len(messages) <= INLINE_CHAT_MESSAGES and not tools
                        and not any(m.tool_calls for m in messages)
                        and sum(map(len, _chat_strings(messages, tools))) <= INLINE_PROMPT_CHARS)
        return False

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of prompt (chat: through the chat template); ApiError when it cannot be."""
        match prompt:
            case TextPrompt(text):
                return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
            case ChatPrompt(messages, tools):
                return self._apply_chat_template(prompt, *self._chat(messages, tools))
            case TokenPrompt(token_ids):
                self.check_token_ids(token_ids, "prompt")
                return list(token_ids)

    @functools.cached_property
    def template_variables(self) -> frozenset[str] | None:
        """The variables the chat template reads that it does not set itself (None: not known, a
        template jinja cannot parse alone): chat_template_kwargs reach it only under these names,
        as vLLM's do (a name it does not read would change nothing)."""
        template = self.tokenizer.chat_template
        if not isinstance(template, str):
            return None
        try:
            parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
            return frozenset(jinja2.meta.find_undeclared_variables(parsed))
        except jinja2.TemplateError:  # transformers' own tags ({% generation %}), filters it adds
            return None

    @property
    def template_renders_tools(self) -> bool:
        return "tools" in (self.tokenizer.chat_template or "")

    def _chat(self, messages: tuple[ChatMessage, ...],
              tools: tuple[Tool, ...]) -> tuple[list[dict], list | None]:
        """The messages and tools as the chat template takes them. A template that does not render
        tools gets them as a Hermes-format system message, and earlier calls as their text."""
        native = self.template_renders_tools
        rendered = []
        for m in messages:
            message: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_calls and native:
                message["tool_calls"] = [{"type": "function", "id": c.id,
                                          "function": {"name": c.name, "arguments": json_or_text(c.arguments)}}
                                         for c in m.tool_calls]
            elif m.tool_calls:
                message["content"] = "\n".join(filter(None, [m.content, call_text(m.tool_calls)]))
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            rendered.append(message)
        if not tools or native:
            return rendered, [t.json() for t in tools] or None
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + system_prompt(tools)}
        else:
            rendered.insert(0, {"role": "system", "content": system_prompt(tools)})
        return rendered, None

    def _apply_chat_template(self, prompt: ChatPrompt, messages: list[dict[str, Any]],
                             tools: list | None = None) -> list[int]:
        if not self.tokenizer.chat_template:
            raise invalid(f"model {self.name} has no chat template; use /v1/completions", "messages")
        known = self.template_variables
        kwargs = {name: value for name, value in prompt.template_kwargs if known is None or name in known}
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, add_generation_prompt=prompt.add_generation_prompt,
                continue_final_message=prompt.continue_final_message, **kwargs)
        except jinja2.TemplateError as exc:  # templates raise on e.g. roles they do not support
            raise invalid(f"chat template error: {exc}", "messages") from None
        except (ValueError, TypeError, ArithmeticError) as exc:  # continue_final_message with the last
            # message not in the rendering; a chat_template_kwargs value the template cannot use (the
            # sandbox's range() refuses over 100,000 with OverflowError)
            raise invalid(f"chat template: {exc}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _check_encodable(prompt: Prompt) -> None:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    match prompt:
        case TextPrompt(text) if not _is_utf8(text):
            raise invalid("prompt is not valid Unicode (a lone surrogate)", "prompt")
        case ChatPrompt(messages, tools, template_kwargs=kwargs) if not all(
                map(_is_utf8, _chat_strings(messages, tools, kwargs))):
            raise invalid("a message or tool is not valid Unicode (a lone surrogate)", "messages")


def _chat_strings(messages: tuple[ChatMessage, ...], tools: tuple[Tool, ...],
                  template_kwargs: tuple[tuple[str, Any], ...] = ()) -> Iterator[str]:
    """Every client string a chat prompt's template may render (call ids included)."""
    yield from (value for _, value in template_kwargs if isinstance(value, str))
    for m in messages:
        yield from (m.role, m.content, m.tool_call_id or "", m.name or "")
        for call in m.tool_calls:
            yield from (call.id, call.name, call.arguments)
    for t in tools:
        yield from (t.name, t.description, t.parameters)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_long(param: str, size: str, max_model_len: int, max_chars: int | None = None) -> ApiError:
    bound = f" (at most {max_chars} characters can fit it)" if max_chars is not None else ""
    return invalid(f"This model's maximum context length is {max_model_len} tokens{bound}. However, "
                   f"your {param} has {size}. Please reduce the length of the {param}.", param,
                   "context_length_exceeded")


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters. Entries are stored encoded (byte-level BPE's 'Ġ',
    SentencePiece's '▁', byte fallback's '<0x41>'), never shorter than the text they cover."""
    return max(len(token) for token in tokenizer.get_vocab())


def _config_max_model_len(path: Path, tokenizer: Any) -> int:
    config_file = path / "config.json"
    if config_file.exists():
        length = json.loads(config_file.read_text()).get("max_position_embeddings")
        if isinstance(length, int) and length > 0:
            return length
    if 0 < tokenizer.model_max_length < _NO_LIMIT:
        return int(tokenizer.model_max_length)
    raise ValueError(f"{path}: cannot tell the model's context length (no max_position_embeddings)")
