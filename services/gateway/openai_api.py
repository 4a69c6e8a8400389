"""OpenAI request bodies (/v1/completions, /v1/chat/completions) -> GenerationRequest.

Types are checked strictly (an int field takes a JSON integer, a float field any finite JSON number;
NaN and Infinity are not JSON), and so is the nesting depth; every mistake is an ApiError naming the
field. Unknown top-level fields are ignored, as vLLM does (clients send vendor extensions there);
unknown keys inside stream_options are refused, as OpenAI does. Known fields whose feature we do not
have (best_of, suffix, guided_grammar, use_beam_search, allowed_token_ids, bad_words,
truncate_prompt_tokens, echo on chat, tools on completions) are refused rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from splitserve.engine.request import MAX_LOGIT_BIAS
from splitserve.engine.structured import Grammar, choice_regex

from .errors import invalid
from .limits import INT32_MAX, MAX_JSON_DEPTH, MAX_NAME_CHARS, MAX_PROMPTS, json_depth_exceeds, preview
from .schema import (
    Api,
    ChatMessage,
    ChatPrompt,
    GenerationRequest,
    Prompt,
    SamplingOptions,
    TextPrompt,
    TokenPrompt,
    cache_salt_option,
    grammar_option,
    seed_option,
    top_k_option,
)
from .tools import Tool, ToolChoice, call_grammar, parse_call_history, parse_tools

# Fields we cannot honour, and the values that mean "not used".
_UNSUPPORTED = {
    "best_of": (1,), "suffix": ("",), "guided_grammar": (), "use_beam_search": (False,),
    "allowed_token_ids": ([],), "bad_words": ([],), "truncate_prompt_tokens": (),
}
MAX_CHOICES = 256  # guided_choice: options, each at most MAX_CHOICE_CHARS
MAX_TEMPLATE_KWARGS = 16
MAX_TEMPLATE_NUMBER = 1 << 24  # a template may repeat text that many times ("-" * n): 16 MB at most
_TEMPLATE_KWARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Not template variables a client may set: transformers' apply_chat_template's and render's own
# parameters, the template's messages, and the functions a template calls (jinja's and transformers').
_TEMPLATE_PARAMETERS = frozenset({
    "self", "conversation", "conversations", "messages", "tools", "documents", "chat_template",
    "add_generation_prompt", "continue_final_message", "tokenize", "sanitize_control_tokens", "padding",
    "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "kwargs", "raise_exception", "strftime_now", "range", "dict", "lipsum", "cycler",
    "joiner", "namespace"})
MAX_CHOICE_CHARS = 256


# include_obfuscation (OpenAI's, default true) pads chunks against size side channels; these
# chunks carry none, whatever it says, as vLLM's do.
_STREAM_OPTIONS = {"include_usage", "include_obfuscation"}


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed OpenAI request: what to generate, and how to send it back."""

    generation: GenerationRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk carrying usage


class Fields:
    """Typed access to a JSON object's fields; absent and null both read as the default."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str, kind: type, default: Any = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        if not _is(value, kind):
            raise invalid(f"'{name}' must be {_KIND_NAMES[kind]}, got {preview(value)}", name)
        if kind is float:
            try:
                value = float(value)  # a JSON integer too large for a float overflows
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise invalid(f"'{name}' must be a finite number", name)
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """A string or a list of strings (OpenAI's stop)."""
        value = self.body.get(name)
        if isinstance(value, str):
            return (value,)
        if value is not None and not isinstance(value, list):
            raise invalid(f"'{name}' must be a string or a list of strings", name)
        return tuple(self.list_of(name, str))

    def list_of(self, name: str, kind: type) -> list[Any]:
        value = self.get(name, list, [])
        if not all(_is(v, kind) for v in value):
            raise invalid(f"'{name}' must be a list of {_KIND_NAMES[kind]}s", name)
        return value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
               list: "a list", dict: "an object"}


def _is(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False  # JSON true is not a number
    return isinstance(value, (int, float) if kind is float else kind)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; ApiError for anything else, or nesting deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:  # nested thousands deep: the decoder gives up before we could measure it
        raise invalid(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise invalid(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class TokenizeRequest:
    """vLLM's /tokenize: a prompt (text, or chat messages through the template)."""

    prompt: Prompt
    model: str | None
    add_special_tokens: bool  # text: the tokenizer's BOS and the like (default true)
    return_token_strs: bool  # also the tokens as the vocabulary spells them


def parse_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    fields = Fields(body)
    if "messages" in body:
        prompt: Prompt = _chat_prompt(fields)[0]  # with its tools, as chat renders them (as vLLM's)
    elif isinstance(body.get("prompt"), str) and body["prompt"]:
        prompt = TextPrompt(body["prompt"])
    else:
        raise invalid("give 'prompt' (a non-empty string) or 'messages'", "prompt")
    return TokenizeRequest(prompt, fields.get("model", str), fields.get("add_special_tokens", bool, True),
                           fields.get("return_token_strs", bool, False))


def parse_detokenize(body: dict[str, Any]) -> tuple[str | None, tuple[int, ...]]:
    """vLLM's /detokenize: (model, token ids); the ids are checked against the vocabulary later."""
    fields = Fields(body)
    tokens = fields.list_of("tokens", int)
    if not all(0 <= t <= INT32_MAX for t in tokens):
        raise invalid("tokens must be token ids (>= 0)", "tokens")
    return fields.get("model", str), tuple(tokens)


def parse_completion(body: dict[str, Any]) -> OpenAIRequest:
    """Completions' logprobs is a count: each token's log probability and that many top ones'."""
    fields = Fields(body)
    top_logprobs = fields.get("logprobs", int)
    for name in ("tools", "tool_choice"):
        if body.get(name) not in (None, [], "none"):
            raise invalid(f"'{name}' is for chat completions", name)
    first, *batch = _completion_prompts(body.get("prompt"))
    parsed = _request(fields, Api.COMPLETIONS, first, fields.get("max_tokens", int),
                      (top_logprobs is not None, top_logprobs or 0), echo=fields.get("echo", bool, False))
    return _with_generation(parsed, batch=tuple(batch)) if batch else parsed


def parse_chat(body: dict[str, Any]) -> OpenAIRequest:
    """Chat's logprobs is a flag, and top_logprobs the count."""
    fields = Fields(body)
    max_tokens = fields.get("max_completion_tokens", int, fields.get("max_tokens", int))
    logprobs = (fields.get("logprobs", bool, False), fields.get("top_logprobs", int, 0))
    if fields.get("echo", bool, False):
        raise invalid("'echo' is not supported on chat completions", "echo")
    prompt, tools, choice = _chat_prompt(fields)
    parsed = _request(fields, Api.CHAT, prompt, max_tokens, logprobs)
    try:
        grammar = call_grammar(tools, choice)
    except ValueError as exc:  # the calls' schema past the grammar's size bound
        raise invalid(f"tools: {exc}", "tools") from None
    if grammar is not None:
        if parsed.generation.sampling.grammar is not None:
            raise invalid("a required or named tool_choice cannot be combined with response_format",
                          "tool_choice")
        sampling = dataclasses.replace(parsed.generation.sampling, grammar=grammar)
        parsed = _with_generation(parsed, sampling=sampling)
    return _with_generation(parsed, tool_choice=choice) if choice.active else parsed


def _with_generation(parsed: OpenAIRequest, **changes: Any) -> OpenAIRequest:
    return dataclasses.replace(parsed, generation=dataclasses.replace(parsed.generation, **changes))


def _request(fields: Fields, api: Api, prompt: Prompt, max_tokens: int | None,
             logprobs: tuple[bool, int], echo: bool = False) -> OpenAIRequest:
    _refuse_unsupported(fields)
    generation = GenerationRequest(api, prompt, _sampling(fields, max_tokens, logprobs),
                                   fields.get("model", str),
                                   cache_salt=cache_salt_option(fields.get("cache_salt", str)), echo=echo,
                                   n=fields.get("n", int, 1))
    stream = fields.get("stream", bool, False)
    if stream and generation.sampling.prompt_logprobs is not None:
        raise invalid("prompt_logprobs is not available when stream is true (as vLLM)", "prompt_logprobs")
    options = Fields(fields.get("stream_options", dict, {}))
    if options.body and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    unknown = sorted(set(options.body) - _STREAM_OPTIONS)
    if unknown:
        raise invalid(f"unknown field in stream_options: {preview(unknown[0])}", "stream_options")
    options.get("include_obfuscation", bool)  # checked, never used
    return OpenAIRequest(generation, stream, options.get("include_usage", bool, False))


def _sampling(fields: Fields, max_tokens: int | None, logprobs: tuple[bool, int]) -> SamplingOptions:
    return SamplingOptions(
        temperature=fields.get("temperature", float, 1.0),
        top_p=fields.get("top_p", float, 1.0),
        top_k=top_k_option(fields.get("top_k", int)),
        seed=seed_option(fields.get("seed", int)),
        max_tokens=max_tokens,
        min_tokens=fields.get("min_tokens", int, 0),
        ignore_eos=fields.get("ignore_eos", bool, False),
        stop=fields.strings("stop"),
        stop_token_ids=tuple(fields.list_of("stop_token_ids", int)),
        presence_penalty=fields.get("presence_penalty", float, 0.0),
        frequency_penalty=fields.get("frequency_penalty", float, 0.0),
        repetition_penalty=fields.get("repetition_penalty", float, 1.0),
        min_p=fields.get("min_p", float, 0.0),
        logit_bias=_logit_bias(fields.get("logit_bias", dict, {})),
        logprobs=logprobs[0],
        top_logprobs=logprobs[1],
        prompt_logprobs=fields.get("prompt_logprobs", int),
        grammar=_grammar(fields),
        include_stop_str_in_output=fields.get("include_stop_str_in_output", bool, False),
        skip_special_tokens=fields.get("skip_special_tokens", bool, True),
    )


def _grammar(fields: Fields) -> Grammar | None:
    """OpenAI's response_format (json_object, json_schema) or vLLM's guided_json, guided_regex,
    guided_choice: at most one of them."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
             if fields.body.get(name) is not None]
    if given == ["response_format"] and fields.get("response_format", dict).get("type") == "text":
        return None
    if len(given) > 1:
        raise invalid(f"give at most one of {', '.join(given)}", given[1])
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        return _response_format(Fields(fields.get(name, dict)))
    if name == "guided_json":
        schema = fields.body[name]
        if not isinstance(schema, (dict, str)):
            raise invalid("'guided_json' must be a JSON schema (an object or its JSON text)", name)
        return grammar_option(name, json_schema=schema if isinstance(schema, str) else json.dumps(schema))
    if name == "guided_regex":
        return grammar_option(name, regex=fields.get(name, str))
    choices = fields.list_of(name, str)
    if not choices or len(choices) > MAX_CHOICES or any(not c or len(c) > MAX_CHOICE_CHARS for c in choices):
        raise invalid(f"'guided_choice' must be 1 to {MAX_CHOICES} non-empty strings of at most "
                      f"{MAX_CHOICE_CHARS} characters", name)
    return grammar_option(name, regex=choice_regex(choices))


def _response_format(fields: Fields) -> Grammar:
    kind = fields.get("type", str)
    if kind == "json_object":
        return grammar_option("response_format", json_schema='{"type": "object"}')
    if kind != "json_schema":
        raise invalid("response_format's type must be text, json_object or json_schema", "response_format")
    spec = Fields(fields.get("json_schema", dict, {}))
    schema = spec.get("schema", dict)
    if schema is None:
        raise invalid("response_format.json_schema needs a 'schema' object", "response_format")
    return grammar_option("response_format", json_schema=json.dumps(schema))


def _logit_bias(bias: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as strings) to biases; bounds are SamplingOptions'."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                      "logit_bias")
    entries = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise invalid(f"logit_bias keys must be token ids, got {preview(key)}", "logit_bias")
        if not _is(value, float) or abs(value) > 100:  # bounded before float(): 10**400 overflows it
            raise invalid(f"logit_bias values must be numbers in [-100, 100], got {preview(value)}",
                          "logit_bias")
        entries.append((int(key), float(value)))
    return tuple(entries)


def _refuse_unsupported(fields: Fields) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = fields.body.get(name)
        if value is not None and value not in neutral:
            raise invalid(f"'{name}' is not supported", name)


def _completion_prompts(prompt: Any) -> list[Prompt]:
    """A string or token ids, or a batch: a list of strings and token-id lists (OpenAI's and vLLM's
    prompt arrays), at most MAX_PROMPTS."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise invalid(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
        return [_completion_prompt(p) for p in prompt]
    return [_completion_prompt(prompt)]


def _completion_prompt(prompt: Any) -> Prompt:
    if isinstance(prompt, str) and prompt:
        return TextPrompt(prompt)
    if isinstance(prompt, list) and prompt and all(_is(t, int) for t in prompt):
        return TokenPrompt(tuple(prompt))
    if prompt in ("", []):
        raise invalid("prompt must not be empty", "prompt")
    raise invalid("prompt must be a string, token ids, or a list of strings and token-id lists", "prompt")


def _chat_prompt(fields: Fields) -> tuple[ChatPrompt, tuple[Tool, ...], ToolChoice]:
    """The messages, with the tools when tool_choice is not "none"; vLLM's controls of the chat
    template: add_generation_prompt (default true), continue_final_message (the model continues the
    last message: an assistant turn's start) and chat_template_kwargs (more variables for the
    template, e.g. Qwen 3's enable_thinking); and the tools and tool_choice, parsed."""
    tools, choice = parse_tools(fields.get("tools", list, []), fields.body.get("tool_choice"))
    messages = fields.list_of("messages", dict)
    if not messages:
        raise invalid("messages must be a non-empty list", "messages")
    add_generation_prompt = fields.get("add_generation_prompt", bool, True)
    continue_final_message = fields.get("continue_final_message", bool, False)
    if add_generation_prompt and continue_final_message:
        raise invalid("continue_final_message needs add_generation_prompt set to false (as vLLM)",
                      "continue_final_message")
    prompt = ChatPrompt(tuple(_chat_message(m) for m in messages), tools if choice.active else (),
                        add_generation_prompt, continue_final_message,
                        _template_kwargs(fields.get("chat_template_kwargs", dict, {})))
    return prompt, tools, choice


def _template_kwargs(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """chat_template_kwargs: at most MAX_TEMPLATE_KWARGS variables, named as Python names that are not
    apply_chat_template's own parameters, each a JSON scalar (a string of at most MAX_NAME_CHARS)."""
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise invalid(f"chat_template_kwargs has {len(kwargs)} entries; at most {MAX_TEMPLATE_KWARGS} "
                      "are allowed", "chat_template_kwargs")
    for name, value in kwargs.items():
        if not _TEMPLATE_KWARG.fullmatch(name) or name in _TEMPLATE_PARAMETERS:
            raise invalid(f"chat_template_kwargs cannot set {preview(name)}", "chat_template_kwargs")
        # Compared, never converted: 10**400 is a JSON number too (and NaN is within no range).
        number = isinstance(value, (int, float)) and -MAX_TEMPLATE_NUMBER <= value <= MAX_TEMPLATE_NUMBER
        text = isinstance(value, str) and len(value) <= MAX_NAME_CHARS
        scalar = value is None or isinstance(value, bool) or number or text
        if not scalar:
            raise invalid(f"chat_template_kwargs values must be booleans, null, numbers within "
                          f"±{MAX_TEMPLATE_NUMBER} or strings of at most {MAX_NAME_CHARS} characters; "
                          f"{preview(name)} is not", "chat_template_kwargs")
    return tuple(kwargs.items())


def _chat_message(message: dict[str, Any]) -> ChatMessage:
    role, content, name = message.get("role"), message.get("content"), message.get("name")
    if not isinstance(role, str):
        raise invalid("each message needs a string 'role'", "messages")
    if name is not None and not isinstance(name, str):
        raise invalid("a message's 'name' must be a string", "messages")
    calls = parse_call_history(message["tool_calls"]) if message.get("tool_calls") is not None else ()
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise invalid("'tool_call_id' must be a string", "messages")
    if isinstance(content, list):  # OpenAI content parts: text only, one per line (as vLLM)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid("only text content parts are supported", "messages")
        content = "\n".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise invalid("each message's 'content' must be a string or a list of text parts", "messages")
    return ChatMessage(role, content, calls, call_id, name)
