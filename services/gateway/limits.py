"""What a client may send the gateway: every bound on a request, in one place (docs/security.md).

Each limit is checked before the value is used: sizes before parsing or tokenizing, numbers before
they reach a proto field or the sampler. Past a limit the request gets HTTP 400 (413 for the body)
or gRPC INVALID_ARGUMENT, naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import invalid

INT32_MAX = 2**31 - 1  # max_tokens, min_tokens, top_k and token ids travel as int32
FLOAT32_MAX = 3.4028234663852886e38  # temperature and top_p travel as float32

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 128k-token prompt is ~1 MB as token ids, ~3 MB as escaped text
MAX_JSON_DEPTH = 32  # OpenAI bodies nest about 6 deep (messages -> content parts -> text)
MAX_N = 128  # OpenAI's most samples per request (each also takes a --max-pending slot)
MAX_PROMPTS = 1024  # prompts in one completions request (a batch; each choice takes a --max-pending slot)
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_NAME_CHARS = 256  # chat message roles and names, chat_template_kwargs' strings
# Logprob records (a token's own and its top ones) one response may hold: ~17 MB of JSON and ~1.5 s
# of the event loop's time here, one full 8k-token context at top_logprobs 20 (172k).
MAX_RESPONSE_LOGPROBS = 1 << 18
MAX_CLIENT_REQUEST_ID_CHARS = 128
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]+")  # printable, no spaces or quotes

# A value echoed in an error message is cut to this many characters.
PREVIEW_CHARS = 40


def preview(value: Any) -> str:
    """A short, bounded rendering of a client's value for an error message (never the whole value)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether value nests deeper than limit (iterative: a hostile body cannot exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


def max_prompt_chars(max_model_len: int, max_token_chars: int) -> int:
    """The longest prompt text that can still fit the context: each token covers at most
    max_token_chars characters (the tokenizer's longest vocabulary entry), so a longer text has more
    than max_model_len tokens whatever it says, and is refused without tokenizing it."""
    return max_model_len * max_token_chars


def client_request_id(value: str) -> str | None:
    """The client's own name for its request (gRPC request_id, HTTP X-Request-Id), bounded in length
    and characters since it reaches logs and responses; None when it gave none."""
    if not value:
        return None
    if len(value) > MAX_CLIENT_REQUEST_ID_CHARS or not CLIENT_REQUEST_ID.fullmatch(value):
        raise invalid(f"request_id must be 1-{MAX_CLIENT_REQUEST_ID_CHARS} characters of letters, digits "
                      "and ._:/@+=-", "request_id")
    return value
