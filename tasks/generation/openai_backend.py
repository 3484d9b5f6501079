"""A generator over any OpenAI-compatible HTTP endpoint (vLLM, SGLang, Ollama, TGI, OpenAI, ...).

    gen = OpenAIGenerator("http://127.0.0.1:8000/v1", model="my-model", api_key=None)
    gen.complete(["Name a fruit:"], DecodingParams(max_new_tokens=16))

- One request per input (n=1), at most `max_concurrency` in flight (an asyncio semaphore over an
  httpx.AsyncClient). The sync methods run the event loop themselves; called from inside a running
  loop (a notebook, an async Prefect task) they run it in a worker thread instead.
- Retries with exponential backoff and jitter (Retry-After is honoured) on 429, 5xx, timeouts,
  connection errors and unparseable replies. A 400 saying the context length is exceeded halves
  max_tokens and tries again (not counted as a retry).
- A request that still fails becomes `Completion(text="", finish_reason="error")` with the reason,
  so one bad request never kills a run; only a call whose requests ALL fail raises GenerationError.
  Everything is counted in `stats`.
- Each request carries a seed derived from (params.seed, its text, its occurrence), as the local
  backend does, so a seeded server (vLLM) gives the same text however calls are batched.
- greedy is temperature 0; beam search is not part of the OpenAI API and is refused. top_k and
  repetition_penalty are sent only when set (vLLM and SGLang accept them; OpenAI does not).
- The API key (explicit, else the Prefect Secret block `api_key_secret`, else OPENAI_API_KEY) goes
  only into the Authorization header: never into identity(), repr(), logs or exception messages.
- `check_endpoint()` asks the server once (GET /models) whether it is an OpenAI-compatible API that
  takes the key and serves the model; flows call it before they write anything, so a wrong URL, key
  or model name fails at once with one clear message instead of after a batch of failed requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

from tasks.generation.params import (
    Completion,
    DecodingParams,
    GenerationError,
    Generator,
    conversation_key,
    row_seeds,
    truncate_at_stop,
)

log = logging.getLogger(__name__)

RETRYABLE = frozenset({"rate_limit", "server_error", "timeout", "connection", "malformed"})
# vLLM: "This model's maximum context length is 2048 tokens. However, you requested ...";
# OpenAI: "maximum context length"; TGI: "`inputs` tokens + `max_new_tokens` must be <= 2048";
# others: "context window", "too many tokens".
CONTEXT_LENGTH = re.compile(
    r"context length|maximum context|context window|too many tokens|max_new_tokens.{0,20}must be|context_length_exceeded",
    re.IGNORECASE,
)


def resolve_api_key(explicit: SecretStr | str | None, secret_name: str | None) -> SecretStr | None:
    """The API key: the explicit one, else the Prefect Secret block `secret_name`, else $OPENAI_API_KEY."""
    if explicit:
        return explicit if isinstance(explicit, SecretStr) else SecretStr(explicit)
    if secret_name:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(secret_name).get()
        except Exception as err:  # the block's value is not in these messages: it was never read
            raise GenerationError(
                f"could not load the Prefect Secret block {secret_name!r} holding the API key: {err}"
            ) from None
        if not isinstance(value, str) or not value:
            raise GenerationError(f"the Prefect Secret block {secret_name!r} does not hold a non-empty string")
        return SecretStr(value)
    env = os.environ.get("OPENAI_API_KEY")
    return SecretStr(env) if env else None


def normalize_base_url(base_url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both become `http://host:8000/v1`."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GenerationError(f"base_url {base_url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return url if parts.path.endswith("/v1") else url + "/v1"


def public_url(url: str) -> str:
    """The URL without user info, query or fragment (they can carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIGenerator(Generator):
    """Completions or chat completions from an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: SecretStr | None = None,
        api_style: Literal["completions", "chat"] = "completions",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        api_key_secret: str | None = None,
    ):
        if not model:
            raise GenerationError("OpenAIGenerator needs a model name")
        if api_style not in ("completions", "chat"):
            raise GenerationError(f"api_style must be 'completions' or 'chat', got {api_style!r}")
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0:
            raise GenerationError("max_concurrency must be >= 1, timeout_s > 0 and max_retries >= 0")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.api_style = api_style
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._api_key = resolve_api_key(api_key, api_key_secret)
        self._jitter = random.Random()
        self._stats: dict[str, Any] = dict(requests=0, completions=0, retries=0, shrinks=0, failed=0, errors=Counter())

    # ---- the interface ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": public_url(self.base_url), "model": self.model, "api_style": self.api_style}

    def __repr__(self) -> str:
        return f"OpenAIGenerator(base_url={public_url(self.base_url)!r}, model={self.model!r}, api_style={self.api_style!r})"

    @property
    def stats(self) -> dict[str, Any]:
        """requests (HTTP attempts), completions (successful inputs), retries, shrinks, failed, errors by kind."""
        out = dict(self._stats)
        out["errors"] = dict(self._stats["errors"])
        return out

    def complete(self, prompts: Sequence[str], params: DecodingParams) -> list[Completion]:
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise GenerationError(f"prompts[{i}] is {type(prompt).__name__}, expected str")
        seeds = row_seeds(params.seed, prompts)
        if self.api_style == "chat":
            bodies = [self._body(params, seed, messages=[{"role": "user", "content": p}]) for p, seed in zip(prompts, seeds)]
            return self._run("/chat/completions", bodies, params)
        bodies = [self._body(params, seed, prompt=p) for p, seed in zip(prompts, seeds)]
        return self._run("/completions", bodies, params)

    def chat(self, conversations: Sequence[list[dict]], params: DecodingParams) -> list[Completion]:
        conversations = list(conversations)
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conversation
            ):
                raise GenerationError(f"conversations[{i}] must be a list of {{'role', 'content'}} dicts")
        seeds = row_seeds(params.seed, [conversation_key(c) for c in conversations])
        bodies = [self._body(params, seed, messages=c) for c, seed in zip(conversations, seeds)]
        return self._run("/chat/completions", bodies, params)

    def close(self) -> None:
        """Nothing is held between calls: each call opens and closes its own connection pool."""

    def check_endpoint(self) -> None:
        """Raise GenerationError unless GET {base_url}/models answers an OpenAI model list that holds the model.

        The message names the URL and the option to fix: an unreachable server, a refused key (401/403),
        a reply that is not the API (an HTML page, truncated or other non-JSON), or a model the server does
        not serve. A server without a /models route (404/405) passes: its first request will tell.
        """
        url = f"{public_url(self.base_url)}/models"
        try:
            response = httpx.get(self.base_url + "/models", headers=self._headers(), timeout=min(self.timeout_s, 30.0))
        except httpx.TimeoutException:
            raise GenerationError(f"--base-url: {url} gave no answer within {min(self.timeout_s, 30.0):g}s") from None
        except httpx.TransportError as err:
            raise GenerationError(f"--base-url: cannot reach {url} ({type(err).__name__}: {self._redact(str(err))[:200]})") from None
        status = response.status_code
        if status in (401, 403):
            raise GenerationError(
                f"--api-key-secret: {url} refused the API key with HTTP {status} ({self._redact(_error_message(response))[:200]}); "
                "give the key in the OPENAI_API_KEY environment variable or a Prefect Secret block (--api-key-secret)"
            )
        if status in (404, 405):
            return
        text = self._redact(response.text)
        if status != 200:
            raise GenerationError(f"--base-url: {url} answered HTTP {status}: {self._redact(_error_message(response))[:200]}")
        try:
            data = response.json()
        except ValueError:
            if "html" in response.headers.get("content-type", "") or text.lstrip()[:1] == "<":
                raise GenerationError(
                    f"--base-url: {url} answered an HTML page, not the OpenAI API; give the API's root, such as http://host:8000/v1"
                ) from None
            raise GenerationError(f"--base-url: {url} answered something that is not JSON (truncated?): {text[:80]!r}") from None
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise GenerationError(f"--base-url: {url} answered JSON that is not an OpenAI model list: {text[:80]!r}")
        served = [str(m.get("id")) for m in models if isinstance(m, dict) and m.get("id")]
        # Ollama lists "name:latest" and answers to "name".
        if served and self.model not in served and f"{self.model}:latest" not in served:
            shown = ", ".join(served[:10]) + (f" and {len(served) - 10} more" if len(served) > 10 else "")
            raise GenerationError(f"--model: {public_url(self.base_url)} does not serve {self.model!r}; it serves {shown}")

    # ---- requests --------------------------------------------------------------------------------

    def _body(self, params: DecodingParams, seed: int, **content: Any) -> dict[str, Any]:
        if params.strategy == "beam":
            raise GenerationError(
                "beam search is not part of the OpenAI API: use strategy 'greedy' or 'sample' with the "
                "openai backend, or the local backend for beam search"
            )
        body: dict[str, Any] = {"model": self.model, **content, "max_tokens": params.max_new_tokens, "n": 1, "seed": seed}
        if params.is_greedy:
            body["temperature"] = 0.0
        else:
            body["temperature"] = params.temperature
            if params.top_p < 1.0:
                body["top_p"] = params.top_p
            if params.top_k > 0:
                body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        return headers

    def _redact(self, text: str) -> str:
        if self._api_key is not None:
            secret = self._api_key.get_secret_value()
            if secret:
                text = text.replace(secret, "***")
        return text

    def _run(self, path: str, bodies: list[dict[str, Any]], params: DecodingParams) -> list[Completion]:
        if not bodies:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results = asyncio.run(self._run_async(path, bodies, params))
        else:
            # asyncio.run cannot nest in a running loop: give it a thread of its own.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-generator") as pool:
                results = pool.submit(lambda: asyncio.run(self._run_async(path, bodies, params))).result()
        failures = [c for c in results if c.finish_reason == "error"]
        if len(failures) == len(results):
            kinds = Counter((c.error or "").split(":", 1)[0] for c in failures)
            raise GenerationError(
                f"all {len(results)} requests to {public_url(self.base_url)}{path} failed "
                f"({dict(kinds)}); last error: {failures[-1].error}"
            )
        return results

    async def _run_async(self, path: str, bodies: list[dict[str, Any]], params: DecodingParams) -> list[Completion]:
        in_flight = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        timeout = httpx.Timeout(self.timeout_s, pool=None)  # waiting for a pool slot is not a server timeout
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers(), timeout=timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self._request(client, in_flight, path, body, params) for body in bodies)))

    async def _request(
        self,
        client: httpx.AsyncClient,
        in_flight: asyncio.Semaphore,
        path: str,
        body: dict[str, Any],
        params: DecodingParams,
    ) -> Completion:
        body = dict(body)
        retries = 0
        while True:
            retry_after: float | None = None
            async with in_flight:  # held for the request only, not during the backoff sleep
                self._stats["requests"] += 1
                try:
                    response = await client.post(path, json=body)
                except httpx.TimeoutException as err:
                    kind, detail = "timeout", f"no answer within {self.timeout_s}s ({type(err).__name__})"
                except httpx.TransportError as err:
                    kind, detail = "connection", f"{type(err).__name__}: {err}"
                else:
                    kind, detail, completion = self._read(response, path, params)
                    if completion is not None:
                        self._stats["completions"] += 1
                        return completion
                    retry_after = _retry_after(response)
            self._stats["errors"][kind] += 1
            detail = self._redact(detail)[:300]
            if kind == "context_length" and body["max_tokens"] > 1:
                body["max_tokens"] //= 2
                self._stats["shrinks"] += 1
                log.info("context length exceeded at %s; retrying with max_tokens=%d", path, body["max_tokens"])
                continue
            if kind in RETRYABLE and retries < self.max_retries:
                retries += 1
                self._stats["retries"] += 1
                delay = self._backoff(retries, retry_after)
                log.info("%s from %s (%s); retry %d/%d in %.2fs", kind, path, detail, retries, self.max_retries, delay)
                await asyncio.sleep(delay)
                continue
            self._stats["failed"] += 1
            log.warning("request to %s failed after %d retries: %s: %s", path, retries, kind, detail)
            return Completion(text="", finish_reason="error", completion_tokens=0, error=f"{kind}: {detail}")

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        delay = delay / 2 + self._jitter.uniform(0, delay / 2)  # "equal jitter": spread out, never zero
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _read(self, response: httpx.Response, path: str, params: DecodingParams) -> tuple[str, str, Completion | None]:
        """(error kind, detail, None) or ("ok", "", the completion)."""
        status = response.status_code
        if status == 200:
            try:
                return "ok", "", self._parse(response.json(), path, params)
            except (ValueError, KeyError, IndexError, TypeError) as err:
                return "malformed", f"unreadable reply ({type(err).__name__}: {err}): {response.text[:120]!r}", None
        message = _error_message(response)
        if status == 429:
            return "rate_limit", f"HTTP 429: {message}", None
        if status >= 500 or status == 408:
            return "server_error" if status >= 500 else "timeout", f"HTTP {status}: {message}", None
        if status in (400, 413, 422) and CONTEXT_LENGTH.search(message):
            return "context_length", f"HTTP {status}: {message}", None
        return "client_error", f"HTTP {status}: {message}", None

    def _parse(self, data: Any, path: str, params: DecodingParams) -> Completion:
        choice = data["choices"][0]
        if path == "/completions":
            text = choice["text"]
        else:
            text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError(f"the completion text is {type(text).__name__}, not a string")
        # Servers cut at stop sequences themselves; cutting again guards against those that keep them.
        text, stopped = truncate_at_stop(text, params.stop)
        reason = "length" if choice.get("finish_reason") == "length" and not stopped else "stop"
        usage = data.get("usage") or {}
        completion_tokens = usage.get("completion_tokens") or 0
        prompt_tokens = usage.get("prompt_tokens") or 0
        return Completion(
            text=text,
            finish_reason=reason,
            completion_tokens=int(completion_tokens),
            prompt_tokens=int(prompt_tokens),
        )


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(data)[:300]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
