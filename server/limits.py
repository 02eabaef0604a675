"""BodyLimitMiddleware: refuses oversized and deeply nested request bodies before any parsing.

A body over ``max_bytes`` gets 413 (from its Content-Length when declared, else as soon as the
stream passes the limit); a JSON body nested deeper than ``max_depth`` gets 400 instead of
reaching ``json.loads`` (whose recursion a hostile body could exhaust). Both answer with the same
``{"detail": ...}`` JSON as every other error. The depth check runs at C speed: strings are cut
out by one regex, then innermost ``[]``/``{}`` pairs are peeled ``max_depth`` times and what is
left is searched for a run of unclosed openers.
"""

from __future__ import annotations

import functools
import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


@functools.lru_cache(maxsize=8)
def _open_run(n: int) -> re.Pattern[bytes]:
    return re.compile(rb"[\[{]{%d}" % n)


def too_deep(body: bytes, max_depth: int) -> bool:
    """True when the JSON in ``body`` nests arrays/objects deeper than ``max_depth``, including
    unterminated nesting (``[[[[...``) that never closes; other malformed JSON answers False and is
    left to the parser, whose message says where it broke."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    s = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(max_depth):
        s, n = _PAIR.subn(b"", s)
        if not s or not n:
            break
    else:  # max_depth rounds all peeled something: any pair left sits deeper
        if _PAIR.search(s):
            return True
    # consecutive openers left after peeling complete pairs are nested in one another
    return bool(_open_run(max_depth + 1).search(s))


async def _send_error(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        limit = f"the limit is {self.max_bytes} bytes (max_body_bytes)"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, f"request body too large: {int(declared)} bytes; {limit}")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, f"request body too large: over {size} bytes; {limit}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if (ctype == b"application/json" or ctype.endswith(b"+json")) and too_deep(body, self.max_depth):
            await _send_error(send, 400, f"JSON body nested deeper than {self.max_depth} levels "
                                         "(max_json_depth)")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
