#!/usr/bin/env python3
"""The HTTP client side of deploy/compose-test.sh: the standard library only, run on the host.

    compose_client.py wait-ready URL TIMEOUT_S        until GET URL/ready answers 200
    compose_client.py model URL                       the served model's id (GET /v1/models)
    compose_client.py chat URL MODEL PROMPT [--max-tokens N] [--timeout S] [--out FILE]
    compose_client.py burst URL MODEL N [--max-tokens N]   N chat requests at once

`chat` sends POST /v1/chat/completions with temperature 0 and checks the answer: HTTP 200, a
chat.completion with non-empty content, a finish_reason, and usage whose numbers add up. It prints one
line and exits 0 when the answer is right, else prints why and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TIMEOUT_S = 600.0  # a request may wait out a Redis restart and a worker's start


def auth_headers() -> dict[str, str]:
    """The gateway's API key (the compose file requires one), from env SPLITSERVE_API_KEY_FILE."""
    path = os.environ.get("SPLITSERVE_API_KEY_FILE")
    if not path:
        return {}
    with open(path) as f:
        return {"Authorization": f"Bearer {f.read().strip()}"}


def get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=auth_headers() if headers is None else headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(base: str, timeout_s: float) -> int:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = get(f"{base}/ready", timeout=3.0)
            if status == 200:
                return 0
            last = f"{status} {body.decode(errors='replace').strip()}"
        except OSError as exc:  # refused while the gateway starts
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    print(f"{base}/ready not 200 after {timeout_s:.0f} s; last: {last}", file=sys.stderr)
    return 1


def model(base: str) -> int:
    status, body = get(f"{base}/v1/models")
    if status != 200:
        print(f"GET /v1/models: {status} {body!r}", file=sys.stderr)
        return 1
    print(json.loads(body)["data"][0]["id"])
    return 0


def check_answer(status: int, body: bytes) -> tuple[str | None, dict | None]:
    """(why the answer is wrong, or None; the parsed body)."""
    if status != 200:
        return f"HTTP {status}: {body.decode(errors='replace')[:500]}", None
    answer = json.loads(body)
    choice, usage = answer["choices"][0], answer.get("usage") or {}
    content = choice["message"].get("content") or ""
    if answer.get("object") != "chat.completion":
        return f"object is {answer.get('object')!r}", answer
    if not content.strip():
        return "empty content", answer
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"finish_reason {choice.get('finish_reason')!r}", answer
    if not (usage.get("prompt_tokens", 0) > 0 and usage.get("completion_tokens", 0) > 0
            and usage.get("total_tokens") == usage["prompt_tokens"] + usage["completion_tokens"]):
        return f"usage {usage}", answer
    return None, answer


def chat_once(base: str, model_id: str, prompt: str, max_tokens: int,
              timeout_s: float = TIMEOUT_S) -> tuple[str | None, dict | None, float]:
    payload = {"model": model_id, "messages": [{"role": "user", "content": prompt}],
               "temperature": 0, "max_tokens": max_tokens}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json", **auth_headers()})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:  # refused, reset (the gateway died), timed out
        return f"{type(exc).__name__}: {exc}", None, time.monotonic() - start
    why, answer = check_answer(status, body)
    return why, answer, time.monotonic() - start


def summary(answer: dict, elapsed: float) -> str:
    choice, usage = answer["choices"][0], answer["usage"]
    return (f"200 in {elapsed:.1f} s, finish_reason={choice['finish_reason']}, usage prompt="
            f"{usage['prompt_tokens']} completion={usage['completion_tokens']}: "
            f"{json.dumps(choice['message']['content'])}")


def chat(base: str, model_id: str, prompt: str, max_tokens: int, timeout_s: float, out: str | None) -> int:
    why, answer, elapsed = chat_once(base, model_id, prompt, max_tokens, timeout_s)
    if out:
        with open(out, "w") as f:
            json.dump({"error": why, "answer": answer, "elapsed_s": elapsed}, f)
    if why is not None:
        print(f"FAILED after {elapsed:.1f} s: {why}")
        return 1
    print(summary(answer, elapsed))
    return 0


def burst(base: str, model_id: str, n: int, max_tokens: int) -> int:
    prompts = [f"Name {k + 2} fruits, one per line." for k in range(n)]
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda p: chat_once(base, model_id, p, max_tokens), prompts))
    failed = 0
    for k, (why, answer, elapsed) in enumerate(results):
        print(f"  request {k + 1}/{n}: " + (f"FAILED after {elapsed:.1f} s: {why}" if why else summary(answer, elapsed)))
        failed += why is not None
    return 1 if failed else 0


def refuses_without_key(base: str) -> int:
    """0 when /v1/models answers 401 to a request without the API key and 200 with it."""
    without, body = get(f"{base}/v1/models", headers={})
    with_key, _ = get(f"{base}/v1/models")
    if without != 401 or with_key != 200:
        print(f"GET /v1/models: {without} without the key ({body[:200]!r}), {with_key} with it", file=sys.stderr)
        return 1
    print("401 without the API key, 200 with it")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait-ready")
    p.add_argument("url")
    p.add_argument("timeout", type=float)
    p = sub.add_parser("model")
    p.add_argument("url")
    p = sub.add_parser("refuses-without-key")
    p.add_argument("url")
    p = sub.add_parser("chat")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for the answer")
    p.add_argument("--out")
    p = sub.add_parser("burst")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("n", type=int)
    p.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return wait_ready(args.url, args.timeout)
    if args.command == "model":
        return model(args.url)
    if args.command == "refuses-without-key":
        return refuses_without_key(args.url)
    if args.command == "chat":
        return chat(args.url, args.model, args.prompt, args.max_tokens, args.timeout, args.out)
    return burst(args.url, args.model, args.n, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
