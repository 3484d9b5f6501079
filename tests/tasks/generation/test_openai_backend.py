"""OpenAIGenerator against the real HTTP server of server.py (tiny local model) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import SecretStr

from tasks.generation.config import GeneratorConfig, load_generator
from tasks.generation.openai_backend import OpenAIGenerator
from tasks.generation.params import DecodingParams, GenerationError, Generator
from tasks.generation.server import Faults, start_server

PROMPTS = ["The quick brown fox", "Write", "Summarize the paragraph in one sentence.", "A function computes the sum"]
KEY = "sk-test-4f1c9a7e-not-a-real-key"


def client(url: str, **options) -> OpenAIGenerator:
    options.setdefault("backoff_base_s", 0.01)
    options.setdefault("timeout_s", 10.0)
    return OpenAIGenerator(url, model="tiny", **options)


def greedy(n: int, **kw) -> DecodingParams:
    return DecodingParams(strategy="greedy", max_new_tokens=n, **kw)


def test_completions_through_the_server_equal_local_generation(serve, tiny_generator):
    server = serve()
    gen = client(server.url)
    params = greedy(8, stop=["e"])
    assert gen.complete(PROMPTS, params) == tiny_generator.complete(PROMPTS, params)
    assert gen.stats["requests"] == len(PROMPTS) and gen.stats["retries"] == 0


def test_chat_through_the_server_and_the_chat_api_style(serve, tiny_generator):
    server = serve()
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = tiny_generator.chat(conversations, greedy(6))
    assert client(server.url).chat(conversations, greedy(6)) == expected
    # api_style "chat" sends complete()'s prompts as single user messages
    assert client(server.url, api_style="chat").complete(PROMPTS, greedy(6)) == expected


def test_seeded_sampling_through_the_server_is_reproducible(serve):
    server = serve()
    params = DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=8, seed=5)
    gen = client(server.url, max_concurrency=4)
    first = gen.complete(PROMPTS, params)
    assert gen.complete(PROMPTS[::-1], params)[::-1] == first
    assert [c.text for c in gen.complete(PROMPTS, params.model_copy(update={"seed": 6}))] != [c.text for c in first]


def test_500s_timeouts_malformed_json_and_429s_are_retried_and_counted(serve):
    faults = Faults(schedule=["500", "timeout", "malformed", "429"], timeout_sleep_s=2.0)
    server = serve(faults=faults)
    gen = client(server.url, timeout_s=0.5, max_concurrency=2)
    out = gen.complete(PROMPTS, greedy(4))
    assert all(c.finish_reason != "error" for c in out)
    assert [c.completion_tokens for c in out] == [4, 4, 4, 4]
    stats = gen.stats
    assert stats["errors"] == {"server_error": 1, "timeout": 1, "malformed": 1, "rate_limit": 1}
    assert stats["retries"] == 4 and stats["failed"] == 0
    assert stats["requests"] == len(PROMPTS) + 4
    assert server.stats["faults"] == {"500": 1, "timeout": 1, "malformed": 1, "429": 1}


def test_a_request_that_keeps_failing_becomes_an_error_completion_and_the_run_goes_on(serve):
    server = serve(faults=Faults(poison="Write"))
    gen = client(server.url, max_retries=2)
    out = gen.complete(PROMPTS, greedy(4))
    assert out[1].finish_reason == "error" and out[1].text == "" and "server_error" in out[1].error
    assert [c.finish_reason for c in out[:1] + out[2:]] == ["length"] * 3
    assert gen.stats["failed"] == 1 and gen.stats["retries"] == 2
    assert server.stats["faults"] == {"poison": 3}


def test_a_call_whose_requests_all_fail_raises(serve):
    server = serve(faults=Faults(error_rate=1.0))
    gen = client(server.url, max_retries=1)
    with pytest.raises(GenerationError, match="all 2 requests"):
        gen.complete(PROMPTS[:2], greedy(4))
    assert gen.stats["failed"] == 2 and gen.stats["errors"]["server_error"] == 4


def test_a_dead_endpoint_is_a_counted_connection_error(serve):
    server = serve()
    url = server.url
    server.stop()
    gen = client(url, max_retries=1)
    with pytest.raises(GenerationError):
        gen.complete(PROMPTS[:1], greedy(4))
    assert gen.stats["errors"] == {"connection": 2}


def test_context_length_errors_halve_max_tokens(serve):
    server = serve(faults=Faults(max_tokens_limit=5))
    gen = client(server.url)
    out = gen.complete(PROMPTS, greedy(20))  # 20 -> 10 -> 5
    assert [c.completion_tokens for c in out] == [5] * len(PROMPTS)
    assert all(c.finish_reason == "length" for c in out)
    assert gen.stats["shrinks"] == 2 * len(PROMPTS)
    assert gen.stats["retries"] == 0


@pytest.mark.parametrize("bound", [1, 3])
def test_requests_in_flight_never_exceed_max_concurrency(serve, bound):
    server = serve(latency_s=0.2)
    gen = client(server.url, max_concurrency=bound)
    gen.complete(PROMPTS * 2, greedy(2))
    assert server.stats["requests"] == 8
    assert server.stats["max_concurrent"] == bound


def test_the_api_key_reaches_the_server_and_nothing_else(serve, caplog):
    caplog.set_level(logging.DEBUG)
    server = serve(api_key=KEY, faults=Faults(schedule=["500"]))
    gen = client(server.url, api_key=SecretStr(KEY))
    out = gen.complete(PROMPTS[:2], greedy(3))
    assert all(c.finish_reason == "length" for c in out)  # the server answers 401 without the key
    assert server.stats["unauthorized"] == 0

    wrong = client(server.url, api_key=SecretStr("sk-wrong"), max_retries=0)
    with pytest.raises(GenerationError) as raised:
        wrong.complete(PROMPTS[:1], greedy(3))
    assert "401" in str(raised.value) and server.stats["unauthorized"] == 1

    seen = [repr(gen), str(gen.identity()), str(gen.stats), str(raised.value), caplog.text]
    assert "retry" in caplog.text  # the logs were captured
    assert not any(KEY in text for text in seen)


def test_the_api_key_from_the_environment_and_from_a_prefect_secret(serve, monkeypatch):
    from prefect.blocks.system import Secret

    server = serve(api_key=KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    from_env = load_generator(GeneratorConfig(backend="openai", base_url=server.url, model="tiny"))
    assert from_env.complete(PROMPTS[:1], greedy(2))[0].finish_reason == "length"

    monkeypatch.delenv("OPENAI_API_KEY")
    Secret(value=KEY).save("generation-test-key", overwrite=True)
    config = GeneratorConfig(backend="openai", base_url=server.url, model="tiny", api_key_secret="generation-test-key")
    from_block = load_generator(config)
    assert from_block.complete(PROMPTS[:1], greedy(2))[0].finish_reason == "length"
    assert KEY not in config.model_dump_json() and KEY not in str(from_block.identity())

    no_key = load_generator(GeneratorConfig(backend="openai", base_url=server.url, model="tiny", max_retries=0))
    with pytest.raises(GenerationError, match="401"):
        no_key.complete(PROMPTS[:1], greedy(2))
    with pytest.raises(GenerationError, match="no-such-block"):
        load_generator(GeneratorConfig(backend="openai", base_url=server.url, model="tiny", api_key_secret="no-such-block"))


def test_works_when_called_inside_a_running_event_loop(serve, tiny_generator):
    server = serve()
    gen = client(server.url)

    async def inside() -> list:
        return gen.complete(PROMPTS[:2], greedy(4))

    assert asyncio.run(inside()) == tiny_generator.complete(PROMPTS[:2], greedy(4))


def test_beam_search_is_refused_clearly():
    gen = OpenAIGenerator("http://127.0.0.1:9", model="tiny")
    with pytest.raises(GenerationError, match="beam search is not part of the OpenAI API"):
        gen.complete(["x"], DecodingParams(strategy="beam", max_new_tokens=4))


def test_the_request_body_maps_decoding_params():
    gen = OpenAIGenerator("http://127.0.0.1:9", model="m")
    body = gen._body(greedy(7, stop=["\n"]), seed=3, prompt="p")
    assert body == {"model": "m", "prompt": "p", "max_tokens": 7, "n": 1, "seed": 3, "temperature": 0.0, "stop": ["\n"]}
    sample = DecodingParams(temperature=0.9, top_p=0.8, top_k=20, presence_penalty=0.5, repetition_penalty=1.2, max_new_tokens=4)
    body = gen._body(sample, seed=1, messages=[{"role": "user", "content": "hi"}])
    assert body["temperature"] == 0.9 and body["top_p"] == 0.8 and body["top_k"] == 20
    assert body["presence_penalty"] == 0.5 and body["repetition_penalty"] == 1.2
    assert gen.identity() == {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_style": "completions"}


def test_the_server_speaks_the_openai_wire_format(serve):
    server = serve()
    models = httpx.get(server.url + "/models").json()
    assert models["data"][0]["id"] == "tiny"
    reply = httpx.post(server.url + "/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 3, "temperature": 0})
    data = reply.json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["completion_tokens"] == 6
    bad = httpx.post(server.url + "/chat/completions", json={"model": "tiny", "messages": "hello"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]


def test_start_server_returns_a_url_and_a_stop_function(tiny_generator):
    url, stop = start_server(tiny_generator, latency_s=0.0)
    try:
        assert client(url).complete(["x"], greedy(2))[0].completion_tokens == 2
        assert httpx.get(url.removesuffix("/v1") + "/stats").json()["requests"] == 1
    finally:
        stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models")


class GatedGenerator(Generator):
    """The tiny generator, but its first call waits until `ready()` says the others are queued."""

    def __init__(self, inner, ready):
        self.inner, self.ready, self.calls = inner, ready, []
        self.entered = threading.Event()

    def identity(self):
        return self.inner.identity()

    def complete(self, prompts, params):
        if not self.calls:
            self.entered.set()
            deadline = time.monotonic() + 30
            while not self.ready() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.calls.append(list(prompts))
        return self.inner.complete(prompts, params)

    def chat(self, conversations, params):
        return self.inner.chat(conversations, params)


def test_the_server_batches_waiting_requests_and_answers_each_as_if_alone(tiny_generator):
    from tasks.generation.server import _Batcher

    batcher: _Batcher | None = None
    gated = GatedGenerator(tiny_generator, ready=lambda: batcher is not None and batcher._queue.qsize() == 4)
    batcher = _Batcher(gated, max_batch=16)
    try:
        with ThreadPoolExecutor(max_workers=5) as pool:
            first = pool.submit(batcher.submit, False, [PROMPTS[0]], greedy(5))
            assert gated.entered.wait(30)  # the worker is inside the first call, alone
            # greedy requests with different seeds may share a call; a repeated prompt may not
            rest = [pool.submit(batcher.submit, False, [p], greedy(5, seed=i)) for i, p in enumerate(PROMPTS[1:] + PROMPTS[1:2])]
            results = [first.result()] + [job.result() for job in rest]
    finally:
        batcher.close()
    assert [r[0] for r in results] == tiny_generator.complete(PROMPTS + PROMPTS[1:2], greedy(5))
    assert sorted(len(call) for call in gated.calls) == [1, 1, 3]


def test_check_endpoint_passes_a_server_that_serves_the_model_and_names_a_wrong_model(serve):
    server = serve()
    client(server.url).check_endpoint()
    with pytest.raises(GenerationError) as info:
        OpenAIGenerator(server.url, model="gpt-4o").check_endpoint()
    assert str(info.value) == f"--model: {server.url} does not serve 'gpt-4o'; it serves tiny"
    assert server.stats["generator_calls"] == 0  # the check generates nothing


def test_check_endpoint_passes_a_server_without_a_models_route_and_names_an_unreachable_one():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoModels(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoModels)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        OpenAIGenerator(url, model="anything").check_endpoint()
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(GenerationError, match=rf"^--base-url: cannot reach {url}/models \(ConnectError"):
        OpenAIGenerator(url, model="anything").check_endpoint()
