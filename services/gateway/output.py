"""From TokenEvents to client output: replay dedup, detokenization, stop strings. No I/O here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import structlog

from splitserve.common.detokenize import IncrementalDetokenizer
from splitserve.engine.request import LOGPROB_FLOOR
from splitserve.v1 import common_pb2 as pb

from .errors import GenerationError
from .schema import FINISH_FROM_PROTO, Finish, Output, PositionLogprobs, PromptScores, TokenLogprob, Usage

log = structlog.get_logger(__name__)


class StopMatcher:
    """Finds the first occurrence of any stop string in streamed text.

    Holds back the longest tail that could still grow into a stop string, so text the client has
    seen never contains the start of a stop string that later completes. Text fed unchecked (the
    output before min_tokens, as vLLM) is never searched; a stop string only ends the output where
    it ends in checked text, though it may begin before it.
    """

    def __init__(self, stop: tuple[str, ...], include: bool = False) -> None:
        self.stop = stop
        self.include = include  # the stop string hit is emitted too (vLLM's include_stop_str_in_output)
        self.hit: str | None = None  # the stop string that ended the text
        self._held = ""

    def feed(self, delta: str, check: bool = True) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit); on a hit the text ends before it (or
        with it, under include); the earliest hit wins, then the first of the list."""
        text = self._held + delta
        checked_from = len(text) - len(delta) if check else len(text)
        found = (text.find(s, max(checked_from - len(s) + 1, 0)) for s in self.stop)
        hits = [(i, n) for n, i in enumerate(found) if i >= 0]
        if hits:
            self._held = ""
            start, n = min(hits)
            self.hit = self.stop[n]
            return text[: start + len(self.hit) if self.include else start], True
        keep = self._held_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _held_length(self, text: str) -> int:
        longest = min(len(text), max((len(s) for s in self.stop), default=1) - 1)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


def _logprob(value: float) -> float:
    """A worker's log probability as JSON can carry it: in [LOGPROB_FLOOR, 0] (NaN: the floor)."""
    return LOGPROB_FLOOR if math.isnan(value) else min(max(value, LOGPROB_FLOOR), 0.0)


@dataclass(frozen=True)
class PromptWanted:
    """What a request gets of its prompt back: scores (top logprobs per position; None: none) and
    an echo of its text (None: the prompt's token ids decoded)."""

    token_ids: tuple[int, ...]
    top: int | None
    text: str | None
    echo: bool


@dataclass
class OutputProcessor:
    """Turns one request's TokenEvents into Outputs (vLLM's output processor, for one request)."""

    tokenizer: object
    stop: tuple[str, ...]
    num_prompt_tokens: int
    min_tokens: int = 0  # stop strings end the output only after this many tokens (vLLM's rule)
    prompt_tail: tuple[int, ...] = ()  # the prompt's last token ids, which start the detokenizer's window
    include_stop_str: bool = False  # the stop string that ends the output stays in its text
    skip_special_tokens: bool = True
    stop_token_ids: tuple[int, ...] = ()  # the request's own: which one ended it is its stop_reason
    eos_token_ids: frozenset[int] = frozenset()  # the model's, which the engines stop on
    logprobs: bool = False  # the request asked for each token's log probability ...
    top_logprobs: int = 0  # ... and at most this many most likely tokens' at each position
    prompt: PromptWanted | None = None
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # of the prompt's, from the first token's event
    finish: Finish | None = None
    upstream_finished: bool = False  # the cluster sent its last event (no cancel needed)

    def __post_init__(self) -> None:
        self._detokenizer = IncrementalDetokenizer(self.tokenizer, self.skip_special_tokens, self.prompt_tail)
        self._stop = StopMatcher(self.stop, self.include_stop_str)
        self._token_texts: dict[int, str] = {}
        self._logprob_offset = 0  # characters of the chosen tokens' texts so far (text_offset)

    @property
    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, len(self.token_ids), self.num_cached_tokens)

    def process(self, event: pb.TokenEvent) -> Output | None:
        """The client-visible output of event; None when it adds nothing (a replay, held text).
        Raises GenerationError when the cluster failed the request."""
        if self.finish is not None:
            return None  # ended by a stop string; the rest was cancelled
        self.upstream_finished = event.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        if event.finish_reason == pb.FINISH_REASON_ERROR:
            raise GenerationError(event.error or "the cluster failed the request")
        first = event.index == 0 and not self.token_ids and event.token_ids
        new, logprobs = self._new_tokens(event)
        prompt = self._prompt_scores(event) if first and self.prompt is not None else None
        by_token = event.finish_reason == pb.FINISH_REASON_STOP and bool(new) and self._is_stop_token(new[-1])
        new_ids, text = self._accept(new, silent_last=by_token and not self.include_stop_str)
        logprobs = tuple(self._position(token, lp) for token, lp in zip(new_ids, logprobs))
        if self.finish is None and self.upstream_finished:
            self.finish = FINISH_FROM_PROTO[event.finish_reason]
            text += self._stop.flush()
        if self.finish is None:
            return Output(text, new_ids, logprobs=logprobs, prompt=prompt) if text or new_ids else None
        timeline = event.timeline if event.HasField("timeline") else None
        return Output(text, new_ids, self.finish, self.usage, timeline, logprobs, prompt, self.stop_reason)

    @property
    def stop_reason(self) -> str | int | None:
        """The stop string, or the stop token id (of the request's stop_token_ids), that ended it;
        None for EOS, a length, an abort (as vLLM)."""
        if self._stop.hit is not None:
            return self._stop.hit
        if self.finish is Finish.STOP and self.token_ids and self.token_ids[-1] in self.stop_token_ids:
            return self.token_ids[-1]
        return None

    def abort(self) -> Output:
        """The last output of a request the gateway ends itself (shutdown); the cluster is still
        running it, so the caller cancels it there."""
        self.finish = self.finish or Finish.ABORT
        return Output(self._stop.flush(), (), self.finish, self.usage)

    def _new_tokens(self, event: pb.TokenEvent) -> tuple[list[int], list[pb.TokenLogprobs]]:
        """The event's tokens not received yet, and their log probabilities when asked for.

        Drops positions already received: a request replayed after a worker failure resends them.
        A position past the next one expected means tokens were lost on the way: the request fails
        rather than return text with a hole in it, and so does an event without the log
        probabilities asked for, or with more of them than asked."""
        skip = len(self.token_ids) - event.index
        if event.index == 0 and skip == 0:  # the first copy of the first token (a worker's count, bounded)
            self.num_cached_tokens = min(max(event.num_cached_tokens, 0), self.num_prompt_tokens)
        if skip < 0 and event.token_ids:
            log.error("token event skips positions", expected=len(self.token_ids), index=event.index)
            raise GenerationError(f"output tokens {len(self.token_ids)} to {event.index - 1} were lost on "
                                  "their way from the cluster (Redis lost data?); the request was cancelled")
        if self.logprobs and (len(event.logprobs) != len(event.token_ids)
                              or not all(self._bounded(lp, self.top_logprobs) for lp in event.logprobs)):
            log.error("token event without the logprobs asked for", tokens=len(event.token_ids),
                      logprobs=len(event.logprobs))
            raise GenerationError("the cluster sent tokens without the log probabilities asked for")
        logprobs = list(event.logprobs[max(skip, 0):]) if self.logprobs else []
        return list(event.token_ids[max(skip, 0):]), logprobs

    def _prompt_scores(self, event: pb.TokenEvent) -> PromptScores:
        """The echo's text and the prompt's per-token records, from the first token's event."""
        wanted = self.prompt
        ids = wanted.token_ids
        text = wanted.text if wanted.text is not None else ""
        if wanted.echo and wanted.text is None:
            text = self.tokenizer.decode(list(ids))
        if wanted.top is None:
            return PromptScores(text, ())
        scores = event.prompt_logprobs
        if len(scores) != len(ids) - 1 or not all(self._bounded(lp, wanted.top) for lp in scores):
            log.error("first token without the prompt logprobs asked for", prompt_tokens=len(ids),
                      prompt_logprobs=len(scores))
            raise GenerationError("the cluster sent the first token without the prompt's log probabilities")
        positions = [PositionLogprobs(TokenLogprob(ids[0], self._text(ids[0]), None), (), 0)]
        offset = len(positions[0].chosen.text)
        for token_id, lp in zip(ids[1:], scores):
            position = self._record(token_id, lp, offset)
            positions.append(position)
            offset += len(position.chosen.text)
        if wanted.echo:
            self._logprob_offset = offset  # the output's text_offset counts on from the prompt's
        return PromptScores(text, tuple(positions))

    def _bounded(self, lp: pb.TokenLogprobs, top: int) -> bool:
        return (len(lp.top_token_ids) == len(lp.top_logprobs) <= top
                and all(0 <= t < self.vocab_size for t in lp.top_token_ids))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _position(self, token_id: int, logprobs: pb.TokenLogprobs) -> PositionLogprobs:
        position = self._record(token_id, logprobs, self._logprob_offset)
        self._logprob_offset += len(position.chosen.text)
        return position

    def _record(self, token_id: int, logprobs: pb.TokenLogprobs, offset: int) -> PositionLogprobs:
        chosen = TokenLogprob(token_id, self._text(token_id), _logprob(logprobs.logprob),
                              max(logprobs.rank, 1))
        top = tuple(TokenLogprob(t, self._text(t), _logprob(lp), rank)
                    for rank, (t, lp) in enumerate(zip(logprobs.top_token_ids, logprobs.top_logprobs), 1))
        return PositionLogprobs(chosen, top, offset)

    def _is_stop_token(self, token_id: int) -> bool:
        """The model's EOS or one of the request's stop_token_ids (what else ends a request with
        "stop", a grammar, ends it on text)."""
        return token_id in self.stop_token_ids or token_id in self.eos_token_ids

    def _accept(self, new_ids: list[int], silent_last: bool = False) -> tuple[tuple[int, ...], str]:
        """Detokenizes token by token so a stop string ends generation at the token completing it;
        silent_last: the last token is the stop token that ended the request, counted but, as vLLM,
        not in the text (skip_special_tokens: false would show EOS, a stop token id its own text)."""
        accepted, text = [], ""
        for n, token_id in enumerate(new_ids):
            accepted.append(token_id)
            self.token_ids.append(token_id)
            if silent_last and n == len(new_ids) - 1:
                break
            checked = len(self.token_ids) > self.min_tokens
            emitted, stopped = self._stop.feed(self._detokenizer.add(token_id), checked)
            text += emitted
            if stopped:
                self.finish = Finish.STOP
                break
        return tuple(accepted), text
