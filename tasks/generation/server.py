"""A small, real OpenAI-compatible HTTP server over any `Generator`, with fault injection.

For tests, benchmarks and offline demos: it speaks the OpenAI wire format, so the `openai` backend
(or the `openai` package, or curl) talks to it exactly as it would to vLLM.

    GET  /v1/models             the one model served
    POST /v1/completions        {"model", "prompt": str | [str], "max_tokens", "temperature", "top_p",
                                 "top_k", "stop", "seed", "presence_penalty", "repetition_penalty", "n"}
    POST /v1/chat/completions   the same with "messages" instead of "prompt"
    GET  /stats                 counters: requests, max requests in flight, injected faults
    GET  /health

From Python:

    url, stop = start_server(LocalGenerator(folder, "tiny"), latency_s=0.05,
                             faults=Faults(schedule=["500", "timeout"], timeout_sleep_s=2))
    ...  # url is "http://127.0.0.1:<port>/v1"
    stop()

From a shell (Ctrl-C stops it):

    python -m tasks.generation.server --model PATH_OR_REF --port 8000 [--latency-s 0.05] [--error-rate 0.1]

Faults: `schedule` lists the fault of each generation request in arrival order ("ok", "500", "429",
"timeout", "malformed"); after it, each request draws from the *_rate fractions with a seeded RNG.
`poison` fails every request holding a given text (a request that always crashes the server).
`max_tokens_limit` answers a request whose max_tokens is above it with the 400 that vLLM sends when
the context length is exceeded. Requests that wait together with the same decoding params are
generated in one batch (`max_batch` inputs at most), as batching servers do; greedy requests batch
whatever their seeds. `latency_s` is added to every request before it queues, so many requests in
flight overlap their latency as they would on a real, latency-bound endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import AlignflowError
from tasks.generation.params import Completion, DecodingParams, Generator, conversation_key

log = logging.getLogger(__name__)

FaultKind = Literal["ok", "500", "429", "timeout", "malformed"]


class Faults(BaseModel):
    """Faults the server injects into generation requests."""

    model_config = ConfigDict(extra="forbid")

    schedule: list[FaultKind] = Field(
        default_factory=list, description="The fault of each generation request in arrival order; then the rates apply."
    )
    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests answered with HTTP 500.")
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="Fraction answered with HTTP 429 (Retry-After: 0).")
    timeout_rate: float = Field(0.0, ge=0, le=1, description="Fraction that sleep timeout_sleep_s before answering.")
    malformed_rate: float = Field(0.0, ge=0, le=1, description="Fraction answered 200 with a body that is not JSON.")
    timeout_sleep_s: float = Field(5.0, ge=0, description="How long a 'timeout' request sleeps (beyond the client's timeout).")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Answer a 400 'maximum context length' error when max_tokens is above this."
    )
    poison: str | None = Field(
        None, description="Answer HTTP 500, every time, to a request whose prompt or messages contain this text."
    )
    seed: int = Field(0, description="Seed of the RNG that draws rate-based faults.")


class _Batcher:
    """Run the generator on one worker thread, merging requests that wait at the same time.

    Requests with equal decoding params (and, for `row_seeds`' sake, no input in common) share one
    generator call, as a batching server (vLLM, TGI) would; each gets back exactly what it would
    have got alone, since seeds are per input. Requests that cannot join wait for the next call.
    """

    def __init__(self, generator: Generator, max_batch: int):
        self.generator = generator
        self.max_batch = max_batch
        self.calls = 0
        self._queue: queue.Queue = queue.Queue()
        self._waiting: deque = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="openai-compat-batcher", daemon=True)
        self._thread.start()

    def submit(self, chat: bool, inputs: list, params: DecodingParams) -> list[Completion]:
        if self._closed:
            raise RuntimeError("the server is stopping")
        job: Future = Future()
        self._queue.put((chat, inputs, params, job))
        return job.result()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)

    def _fail_waiting(self) -> None:
        leftovers = list(self._waiting)
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in leftovers:
            if item is not None:
                item[3].set_exception(RuntimeError("the server stopped"))

    def _next(self, block: bool):
        if self._waiting:
            return self._waiting.popleft()
        return self._queue.get() if block else self._queue.get_nowait()

    def _work(self) -> None:
        while True:
            first = self._next(block=True)
            if first is None:
                self._fail_waiting()
                return
            chat, inputs, params, _ = first
            kind = _params_key(params)
            batch, keys = [first], {_key(chat, x) for x in inputs}
            size, skipped = len(inputs), []
            while size < self.max_batch:
                try:
                    item = self._next(block=False)
                except queue.Empty:
                    break
                if item is None:
                    skipped.append(item)
                    break
                item_keys = {_key(item[0], x) for x in item[1]}
                if item[0] == chat and _params_key(item[2]) == kind and not keys & item_keys and size + len(item[1]) <= self.max_batch:
                    batch.append(item)
                    keys |= item_keys
                    size += len(item[1])
                else:
                    skipped.append(item)
            self._waiting.extendleft(reversed(skipped))
            merged = [x for item in batch for x in item[1]]
            try:
                self.calls += 1
                out = self.generator.chat(merged, params) if chat else self.generator.complete(merged, params)
            except Exception as err:  # every request of the call answers 500
                for item in batch:
                    item[3].set_exception(err)
                continue
            start = 0
            for item in batch:
                item[3].set_result(out[start : start + len(item[1])])
                start += len(item[1])


def _params_key(params: DecodingParams) -> dict[str, Any]:
    """What must match for two requests to share a call: the seed only matters when sampling."""
    sampling = params.strategy == "sample" and not params.is_greedy
    return params.model_dump() if sampling else params.model_dump(exclude={"seed"})


def _key(chat: bool, item: Any) -> str:
    return conversation_key(item) if chat else item


class OpenAICompatServer:
    """The server; `start()` serves in a background thread and returns the base URL (ending in /v1)."""

    def __init__(
        self,
        generator: Generator,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        latency_s: float = 0.0,
        api_key: str | None = None,
        model_name: str | None = None,
        max_batch: int = 16,
    ):
        self.generator = generator
        self.max_batch = max_batch
        self._batcher: _Batcher | None = None
        self.host = host
        self.port = port
        self.faults = faults or Faults()
        self.latency_s = latency_s
        self.api_key = api_key
        self.model_name = model_name or str(generator.identity().get("model", "model"))
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._generation_requests = 0
        self._in_flight = 0
        self._stats: dict[str, Any] = dict(requests=0, max_concurrent=0, unauthorized=0, bad_requests=0, faults=Counter())
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._stats)
            out["faults"] = dict(self._stats["faults"])
            out["in_flight"] = self._in_flight
            out["generator_calls"] = self._batcher.calls if self._batcher else 0
        return out

    @property
    def batcher(self) -> _Batcher:
        if self._batcher is None:
            raise RuntimeError("the server is not started")
        return self._batcher

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> str:
        self._batcher = _Batcher(self.generator, self.max_batch)
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _HTTPServer((self.host, self.port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-compat-server", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    # ---- bookkeeping used by the handler ---------------------------------------------------------

    def enter(self) -> None:
        with self._lock:
            self._stats["requests"] += 1
            self._in_flight += 1
            self._stats["max_concurrent"] = max(self._stats["max_concurrent"], self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self._stats["faults"][kind] += 1

    def next_fault(self) -> FaultKind:
        with self._lock:
            index = self._generation_requests
            self._generation_requests += 1
            if index < len(self.faults.schedule):
                fault = self.faults.schedule[index]
            else:
                draw = self._rng.random()
                fault = "ok"
                edge = 0.0
                for kind, rate in (
                    ("500", self.faults.error_rate),
                    ("429", self.faults.rate_limit_rate),
                    ("timeout", self.faults.timeout_rate),
                    ("malformed", self.faults.malformed_rate),
                ):
                    edge += rate
                    if draw < edge:
                        fault = kind
                        break
            if fault != "ok":
                self._stats["faults"][fault] += 1
            return fault  # type: ignore[return-value]


class RequestError(AlignflowError, ValueError):
    """A request the server refuses with HTTP 400."""


def decoding_params(body: dict[str, Any]) -> DecodingParams:
    """DecodingParams from an OpenAI request body (OpenAI defaults: temperature 1, max_tokens 16)."""
    temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    top_k = body.get("top_k") or 0
    try:
        return DecodingParams(
            strategy="greedy" if temperature == 0 else "sample",
            temperature=temperature,
            max_new_tokens=body.get("max_tokens") or 16,
            top_p=body.get("top_p") if body.get("top_p") is not None else 1.0,
            top_k=max(0, int(top_k)),
            stop=stop,
            seed=body.get("seed") or 0,
            presence_penalty=body.get("presence_penalty") or 0.0,
            repetition_penalty=body.get("repetition_penalty") or 1.0,
        )
    except (ValidationError, TypeError, ValueError) as err:
        raise RequestError(f"invalid sampling parameters: {err}") from None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a request sleeping out a 'timeout' must not block stop()
    request_queue_size = 128  # the stdlib's 5 drops connections when many requests arrive at once


class _Handler(BaseHTTPRequestHandler):
    app: OpenAICompatServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a 'timeout' fault): nothing to answer

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "code": code}})

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        app = self.app
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": app.model_name, "object": "model", "owned_by": "alignflow"}]})
        elif self.path == "/stats":
            self._send_json(200, app.stats)
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {self.path}", code="not_found")

    def do_POST(self) -> None:  # noqa: N802
        app = self.app
        app.enter()
        try:
            self._post(app)
        finally:
            app.leave()

    def _post(self, app: OpenAICompatServer) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if app.latency_s:
            time.sleep(app.latency_s)
        if app.api_key is not None and self.headers.get("Authorization") != f"Bearer {app.api_key}":
            app.count("unauthorized")
            self._error(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")
            return
        path = self.path.rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"no route POST {self.path}", code="not_found")
            return
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            if body.get("stream"):
                raise RequestError("streaming is not supported by this server")
            params = decoding_params(body)
            n = int(body.get("n") or 1)
            if not 1 <= n <= 16:
                raise RequestError("n must be between 1 and 16")
            inputs = _inputs(body, chat=path.endswith("chat/completions"))
        except (ValueError, TypeError) as err:  # RequestError and json.JSONDecodeError are ValueErrors
            app.count("bad_requests")
            self._error(400, str(err))
            return
        limit = app.faults.max_tokens_limit
        if limit is not None and params.max_new_tokens > limit:
            self._error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{params.max_new_tokens} tokens in the completion. Please reduce the length.",
                code="context_length_exceeded",
            )
            return

        if app.faults.poison is not None and app.faults.poison in json.dumps(inputs, ensure_ascii=False):
            app.count_fault("poison")
            self._error(500, "injected internal server error (poisoned request)", kind="server_error")
            return
        fault = app.next_fault()
        if fault == "500":
            self._error(500, "injected internal server error", kind="server_error")
            return
        if fault == "429":
            self._error(429, "injected rate limit", kind="rate_limit_error", code="rate_limit_exceeded")
            return
        if fault == "malformed":
            self._send_raw(200, b'{"id": "cmpl-broken", "choices": [{"text": "half a rep')
            return
        if fault == "timeout":
            time.sleep(app.faults.timeout_sleep_s)  # then answer anyway, to a client that has left

        try:
            chat = path.endswith("chat/completions")
            repeated = [item for item in inputs for _ in range(n)]
            completions = app.batcher.submit(chat, repeated, params)
        except Exception as err:  # a real server answers 500 on a failing model, it does not die
            log.exception("generation failed")
            self._error(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")
            return
        self._send_json(200, _response(app.model_name, completions, chat))


def _inputs(body: dict[str, Any], chat: bool) -> list:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise RequestError("'messages' must be a non-empty list of {'role': str, 'content': str}")
        return [messages]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise RequestError("'prompt' must be a string or a non-empty list of strings")


def _response(model: str, completions: list[Completion], chat: bool) -> dict[str, Any]:
    choices = []
    for index, c in enumerate(completions):
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


def start_server(
    generator: Generator,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults | None = None,
    latency_s: float = 0.0,
    api_key: str | None = None,
) -> tuple[str, Callable[[], None]]:
    """Serve `generator` in a background thread; returns (base URL ending in /v1, a function that stops it)."""
    server = OpenAICompatServer(generator, host=host, port=port, faults=faults, latency_s=latency_s, api_key=api_key)
    return server.start(), server.stop


def main(argv: list[str] | None = None) -> None:
    import os

    from tasks.generation.config import GeneratorConfig, load_generator

    parser = argparse.ArgumentParser(description="Serve a local model over the OpenAI API (with optional faults).")
    parser.add_argument("--model", default=None, help="a local HF model folder or a registry model ref (default: the latest 'base')")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--latency-s", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--api-key-env", default=None, help="require the API key held by this environment variable")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with HTTP 500")
    parser.add_argument("--rate-limit-rate", type=float, default=0.0, help="fraction answered with HTTP 429")
    parser.add_argument("--timeout-rate", type=float, default=0.0, help="fraction that sleep --timeout-sleep-s first")
    parser.add_argument("--malformed-rate", type=float, default=0.0, help="fraction answered with broken JSON")
    parser.add_argument("--timeout-sleep-s", type=float, default=5.0, help="sleep of a 'timeout' request")
    parser.add_argument("--max-tokens-limit", type=int, default=None, help="answer a context-length 400 above this max_tokens")
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of the fault RNG")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    faults = Faults(
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        timeout_rate=args.timeout_rate,
        malformed_rate=args.malformed_rate,
        timeout_sleep_s=args.timeout_sleep_s,
        max_tokens_limit=args.max_tokens_limit,
        seed=args.fault_seed,
    )
    generator = load_generator(GeneratorConfig(backend="local", model=args.model, batch_size=args.batch_size, device=args.device))
    server = OpenAICompatServer(
        generator, args.host, args.port, faults=faults, latency_s=args.latency_s, api_key=api_key, max_batch=args.batch_size
    )
    url = server.start()
    print(f"serving {generator.identity()['model']} at {url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on `kill` as on Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        generator.close()


if __name__ == "__main__":
    main()
