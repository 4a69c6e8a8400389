"""Server-sent events of OpenAI-compatible streams, parsed without I/O.

`SseDecoder` takes the body's bytes in whatever pieces the network delivers and returns each
complete `data:` payload; `parse_chunk` reads one OpenAI chunk (completions or chat) into the parts a
load generator needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


class SseDecoder:
    """Splits a byte stream into `data:` payloads; comments, other fields and blank lines are skipped."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        payloads = []
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                payloads.append(line[5:].strip().decode())
        return payloads


@dataclass(frozen=True)
class StreamChunk:
    """One parsed chunk: its output text (empty for none), finish reason, usage and error."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server says

    @property
    def has_content(self) -> bool:
        return bool(self.text)

    @property
    def has_usage(self) -> bool:
        return self.completion_tokens is not None


def parse_chunk(payload: str) -> StreamChunk:
    """A `data:` payload (not [DONE]) -> StreamChunk; ValueError (bad JSON) or TypeError (not an
    object) when it is not a chunk."""
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise TypeError(f"a stream chunk is not a JSON object: {payload[:200]}")
    if data.get("error"):
        return StreamChunk(error=error_message(data))
    usage = data.get("usage") or {}
    choice = (data.get("choices") or [{}])[0]
    details = usage.get("prompt_tokens_details") or {}
    return StreamChunk(_choice_text(choice), choice.get("finish_reason"), usage.get("prompt_tokens"),
                       usage.get("completion_tokens"), cached_tokens=details.get("cached_tokens"))


def _choice_text(choice: dict[str, Any]) -> str:
    """`text` on /v1/completions, `delta.content` on /v1/chat/completions."""
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


def error_message(body: Any) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body itself."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(error if error is not None else body)[:500]
