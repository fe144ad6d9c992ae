"""The OpenAI-compatible server (runtime/server.py) on a live uvicorn on 127.0.0.1, driven through
the official ``openai`` client and raw HTTP: completions and chat, streamed and not, stop strings,
usage, 401/400/429, a client disconnect cancelling its request, metrics, and SIGTERM draining.

The protocol tests run over ``ScriptedEngine``, a test double implementing the engine contract
whose steps the test can hold (a blocked engine makes 429 and disconnects deterministic); the
live-engine tests compare the server's greedy text with the runtime Generator's.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import checkpoints
import numpy as np
import pytest
import tiny_tokenizer

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
pytest.importorskip("starlette", reason="the serve extra installs starlette")

from graphattn import export  # noqa: E402
from graphattn.runtime import Generator, PlainCache  # noqa: E402
from graphattn.runtime.engine import (  # noqa: E402
    Engine,
    PromptTooLong,
    QueueFull,
    RequestParams,
)
from graphattn.runtime.generate import positions  # noqa: E402
from graphattn.runtime.server import create_app  # noqa: E402
from graphattn.runtime.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

WAIT = 20.0  # seconds: the bound on every wait in this file
SCRIPT = "Once upon a time there was a little graph that wanted to attend. " * 8


# ------------------------------------------------------------------ the scripted test double
class ScriptedRequest:
    """Emits the tokens of ``SCRIPT`` in order, one per engine step."""

    def __init__(self, engine: ScriptedEngine, prompt_ids: list[int], params: RequestParams):
        self.engine, self.params = engine, params
        self.id = f"r{id(self):x}"
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._tokens: queue.Queue = queue.Queue()

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Generated ids as they come; ends when the request finishes."""
        while True:
            token = self._tokens.get(timeout=timeout)
            if token is None:
                return
            yield token

    def deltas(self) -> Iterator[str]:
        """Text pieces with stop strings applied (text from a stop string on is dropped)."""
        decoder, text, sent = StreamDecoder(self.engine.tokenizer), "", 0
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        for token in self.tokens(timeout=WAIT):
            text += decoder.push(token)
            hits = [text.find(s) for s in self.params.stop if s in text]
            if hits:
                yield text[sent : min(hits)]
                self.engine.finish(self, "stop")
                self.finish_reason = "stop"  # even when the last token also hit max_tokens
                return
            if len(text) - hold > sent:
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
        text += decoder.finish()
        if text[sent:]:
            yield text[sent:]

    def cancel(self) -> None:
        """Finish as cancelled (frees its slot at once)."""
        self.engine.finish(self, "cancelled")


class ScriptedEngine:
    """The engine contract over a script; ``gate`` cleared holds every step."""

    def __init__(self, tokenizer_dir: Path, *, max_running: int = 4, max_queue: int = 4) -> None:
        self.tokenizer = Tokenizer(tokenizer_dir)
        self.script = self.tokenizer.encode(SCRIPT)
        self.context_length = 256
        self.max_running, self.max_queue = max_running, max_queue
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[ScriptedRequest] = []
        self.tokens_generated = 0
        self.fail = False  # every step finishes its requests with "error"
        self.budget: int | None = None  # tokens allowed before every step holds (None: no limit)
        self.started = self.stopped_with_drain = False
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, prompt_ids: list[int], params: RequestParams) -> ScriptedRequest:
        """Admit a request or raise QueueFull (capacity max_running + max_queue, no timing)."""
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise PromptTooLong("prompt past the context")
        with self._lock:
            if len(self.requests) >= self.max_running + self.max_queue:
                raise QueueFull(f"{len(self.requests)} requests waiting or running")
            request = ScriptedRequest(self, prompt_ids, params)
            self.requests.append(request)
            self._lock.notify_all()
            return request

    def finish(self, request: ScriptedRequest, reason: str) -> None:
        """End ``request`` (idempotent) and free its slot."""
        with self._lock:
            if request.finish_reason is None:
                request.finish_reason = reason
                request._tokens.put(None)
            if request in self.requests:
                self.requests.remove(request)
            self._lock.notify_all()

    def step(self) -> None:
        """One token to each of the first max_running requests."""
        if self.budget is not None and self.tokens_generated >= self.budget:
            self.gate.clear()
            return
        with self._lock:
            running = list(self.requests[: self.max_running])
        for request in running:
            if request.finish_reason is not None:
                continue
            if self.fail:  # as the real engine does when a graph call raises
                request.error = "RuntimeError: the graph call failed"
                self.finish(request, "error")
                continue
            token = self.script[request.completion_tokens % len(self.script)]
            request.completion_tokens += 1
            self.tokens_generated += 1
            request._tokens.put(token)
            if request.completion_tokens >= request.params.max_tokens:
                self.finish(request, "length")

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self.requests or self._stopping, timeout=WAIT)
                if self._stopping and not self.requests:
                    return
            if self.gate.wait(timeout=0.05):
                self.step()

    def start(self) -> None:
        """Run steps in a background thread."""
        self.started = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Finish running work (drain) or cancel it, then end the thread."""
        self.stopped_with_drain = drain
        with self._lock:
            if not drain:
                for request in list(self.requests):
                    request.finish_reason = "cancelled"
                    request._tokens.put(None)
                self.requests.clear()
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=WAIT)

    def stats(self) -> dict:
        """Queue depth, running sequences and the generated-token counter."""
        with self._lock:
            running = min(len(self.requests), self.max_running)
            return {
                "queue_depth": len(self.requests) - running,
                "running": running,
                "tokens_generated": self.tokens_generated,
            }


# ------------------------------------------------------------------------------ live server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, headers: dict | None = None, process=None) -> None:
    """Poll /health until it answers 200 (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", headers=headers, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)  # polling interval, not synchronisation
    raise AssertionError(f"{base} not healthy within {WAIT} s")


class LiveServer:
    """uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, engine, *, api_key: str | None = None, model_name: str = "tiny") -> None:
        self.engine, self.api_key, self.model_name = engine, api_key, model_name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, model_name=model_name, api_key=api_key)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_healthy(self.base, self.headers)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.gate.set() if hasattr(self.engine, "gate") else None
        self.server.should_exit = True
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the server did not shut down"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1",
            api_key=self.api_key or "none",
            max_retries=0,
            timeout=WAIT,
            **kwargs,
        )


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)  # polling interval, not synchronisation
    raise AssertionError(f"not within {WAIT} s: {what}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("server-tokenizer")
    tiny_tokenizer.write_tokenizer(directory)
    return directory


@pytest.fixture
def scripted(tokenizer_dir):
    engine = ScriptedEngine(tokenizer_dir)
    with LiveServer(engine) as live:
        yield live


def script_text(engine: ScriptedEngine, count: int) -> str:
    return engine.tokenizer.decode(engine.script[:count])


# ------------------------------------------------------------------------ protocol tests
def test_completions_streamed_and_not_with_usage(scripted):
    client, engine = scripted.client(), scripted.engine
    assert [m.id for m in client.models.list().data] == ["tiny"]
    result = client.completions.create(model="tiny", prompt="Once upon", max_tokens=7)
    assert result.choices[0].text == script_text(engine, 7)
    assert result.choices[0].finish_reason == "length"
    prompt_tokens = len(engine.tokenizer.encode("Once upon"))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, 7)
    assert result.usage.total_tokens == prompt_tokens + 7

    stream = client.completions.create(
        model="tiny",
        prompt="Once upon",
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == script_text(engine, 9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices


def test_chat_streamed_and_not_uses_the_template(scripted):
    client, engine = scripted.client(), scripted.engine
    messages = [{"role": "user", "content": "hello"}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == script_text(engine, 5)
    templated = engine.tokenizer.chat(messages)
    expected = len(engine.tokenizer.encode(templated, add_special_tokens=False))
    assert result.usage.prompt_tokens == expected
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == script_text(engine, 5)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_streamed_and_not(scripted):
    client, engine = scripted.client(), scripted.engine
    full = script_text(engine, 40)
    cut = full[: full.index("little")]
    result = client.completions.create(model="tiny", prompt="x", max_tokens=40, stop=["little"])
    assert (result.choices[0].text, result.choices[0].finish_reason) == (cut, "stop")
    stream = client.completions.create(
        model="tiny", prompt="x", max_tokens=40, stop=["little", "zzz"], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sse_ends_with_done(scripted):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{scripted.base}/v1/completions", json=body, timeout=WAIT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "temperature": 3.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "banana": 1}, "banana"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, -4]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"prompt": list(range(3, 260)), "max_tokens": 1}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400_with_an_openai_error(scripted, body, param):
    response = httpx.post(f"{scripted.base}/v1/completions", json=body, timeout=WAIT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_malformed_json_and_bad_chat_are_400_and_the_server_survives(scripted):
    url = f"{scripted.base}/v1"
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        response = httpx.post(f"{url}/completions", content=raw, timeout=WAIT)
        assert response.status_code == 400, raw
        assert response.json()["error"]["code"] == "invalid_json"
    for messages in (None, [], [{"content": "no role"}], [{"role": "user", "content": 5}]):
        response = httpx.post(f"{url}/chat/completions", json={"messages": messages}, timeout=WAIT)
        assert response.status_code == 400, messages
    with pytest.raises(openai.BadRequestError):
        scripted.client().completions.create(model="tiny", prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        scripted.client().completions.create(model="other", prompt="hi", max_tokens=2)
    # still serving after all of that
    result = scripted.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert result.choices[0].text == script_text(scripted.engine, 2)


def test_an_engine_failure_is_a_500_error_and_the_server_keeps_serving(scripted):
    client, engine = scripted.client(), scripted.engine
    engine.fail = True
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert "the graph call failed" in raised.value.message
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{scripted.base}/v1/completions", json=body, timeout=WAIT) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
    engine.fail = False
    result = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert result.choices[0].text == script_text(engine, 3)


def test_api_key_is_required_everywhere(tokenizer_dir):
    engine = ScriptedEngine(tokenizer_dir)
    with LiveServer(engine, api_key="s3cret") as live:
        for path in ("/health", "/v1/models", "/metrics"):
            assert httpx.get(f"{live.base}{path}", timeout=WAIT).status_code == 401, path
            wrong = {"Authorization": "Bearer nope"}
            assert httpx.get(f"{live.base}{path}", headers=wrong, timeout=WAIT).status_code == 401
        bad_client = openai.OpenAI(base_url=f"{live.base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        result = live.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert result.choices[0].text == script_text(engine, 2)
        assert engine.stats()["running"] == 0


def test_full_queue_is_429_with_retry_after(tokenizer_dir):
    engine = ScriptedEngine(tokenizer_dir, max_running=1, max_queue=1)
    engine.gate.clear()  # nothing advances: both slots stay taken
    with LiveServer(engine) as live:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
        with contextlib.ExitStack() as streams:
            for _ in range(2):
                r = streams.enter_context(
                    httpx.stream("POST", f"{live.base}/v1/completions", json=body, timeout=WAIT)
                )
                assert r.status_code == 200
            response = httpx.post(f"{live.base}/v1/completions", json=body, timeout=WAIT)
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                live.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
            metrics = httpx.get(f"{live.base}/metrics", timeout=WAIT).text
            assert "graphattn_queue_depth 1" in metrics
            assert "graphattn_running_sequences 1" in metrics
            engine.gate.set()
        eventually(lambda: engine.stats()["running"] == 0, "the two streams finish")


def test_client_disconnect_cancels_and_frees(tokenizer_dir):
    engine = ScriptedEngine(tokenizer_dir)
    with LiveServer(engine) as live:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 200, "stream": True}
        engine.budget = 3  # the engine holds after 3 tokens: the request is still running
        with httpx.stream("POST", f"{live.base}/v1/completions", json=body, timeout=WAIT) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: ")
            (request,) = engine.requests
        eventually(lambda: request.finish_reason == "cancelled", "the request is cancelled")
        assert engine.stats() == {**engine.stats(), "running": 0, "queue_depth": 0}
        assert request.completion_tokens == 3
        # a non-streamed request whose client leaves is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.base}/v1/completions", json={**body, "stream": False}, timeout=1.0)
        eventually(lambda: not engine.requests, "the non-streamed request is cancelled")


def test_metrics_are_prometheus_text(scripted):
    client = scripted.client()
    for _ in range(2):
        list(client.completions.create(model="tiny", prompt="hi", max_tokens=3, stream=True))
    text = httpx.get(f"{scripted.base}/metrics", timeout=WAIT).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["graphattn_generated_tokens_total"] == 6
    assert samples["graphattn_queue_depth"] == 0 and samples["graphattn_running_sequences"] == 0
    assert samples["graphattn_time_to_first_token_seconds_count"] == 2
    assert samples['graphattn_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert "graphattn_tokens_per_second" in samples
    assert "# TYPE graphattn_time_to_first_token_seconds histogram" in text


def test_lifespan_starts_and_drains_the_engine(tokenizer_dir):
    engine = ScriptedEngine(tokenizer_dir)
    with LiveServer(engine):
        assert engine.started
    assert engine.stopped_with_drain


def test_serve_binds_loopback_by_default():
    from graphattn.cli import build_parser

    args = build_parser().parse_args(["serve", "some-export"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


# --------------------------------------------------------------------------- SIGTERM drains
SERVE_SCRIPTED = """
import sys
sys.path.insert(0, {tests!r})
from test_server import ScriptedEngine
from graphattn.runtime.server import create_app, run
engine = ScriptedEngine({tokenizer!r})
engine.gate.clear()
import threading
threading.Thread(target=lambda: (sys.stdin.readline(), engine.gate.set()), daemon=True).start()
app = create_app(engine, model_name="tiny")
run(app, host="127.0.0.1", port={port}, log_level="warning")
print("drained", engine.stopped_with_drain, engine.stats()["running"], flush=True)
"""


def test_sigterm_drains_a_running_stream_then_exits_0(tokenizer_dir):
    port = free_port()
    code = SERVE_SCRIPTED.format(
        tests=str(Path(__file__).parent), tokenizer=str(tokenizer_dir), port=port
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process=process)
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 12, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=WAIT) as r:
            assert r.status_code == 200
            process.send_signal(signal.SIGTERM)  # while the request is held mid-generation
            process.stdin.write("go\n")  # let the engine run; the stream must complete
            process.stdin.flush()
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        tokenizer = Tokenizer(tokenizer_dir)
        assert text == tokenizer.decode(tokenizer.encode(SCRIPT)[:12])
        out, err = process.communicate(timeout=WAIT)
        assert process.returncode == 0, err
        assert "drained True 0" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=WAIT)


# ------------------------------------------------------------------ the real engine, live
LLAMA = {**checkpoints.LLAMA, "vocab_size": 300, "eos_token_id": 2}
MARGIN = 1e-3  # prompts whose greedy steps are all decided by more than this are compared


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server-llama")
    checkpoints.write_checkpoint(root / "hf", LLAMA, seed=11)
    tiny_tokenizer.write_tokenizer(root / "hf")
    export(root / "hf", root / "onnx")
    return root / "onnx"


@pytest.fixture(scope="module")
def generator(llama_export) -> Generator:
    return Generator(llama_export, provider="cpu", cache="plain")


def decided(generator: Generator, prompt_ids: list[int], steps: int) -> bool:
    """Whether every greedy step of ``prompt_ids`` alone has a top-2 logit margin > MARGIN
    (then batching's float rounding cannot flip a token)."""
    cache = PlainCache(generator.model, generator.max_length)
    cache.reset(1)
    ids = np.array([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    logits = cache.step(ids, mask, positions(mask, ids.shape[1]))[0, -1]
    for _ in range(steps):
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] <= MARGIN:
            return False
        token = int(np.argmax(logits))
        if token in generator.model.config.eos_token_ids:
            return True
        mask = np.concatenate([mask, [[1]]], axis=1)
        logits = cache.step(np.array([[token]]), mask, positions(mask, 1))[0, -1]
    return True


def greedy_text(generator: Generator, prompt: str, steps: int, chat: bool = False) -> str:
    result = generator.generate(prompt, max_new_tokens=steps, temperature=0.0, chat=chat)
    return result.text


@pytest.fixture(scope="module")
def cases(generator) -> list[tuple[str, int]]:
    """32 (prompt, max_tokens) of mixed lengths whose greedy decodes are decided."""
    words = tiny_tokenizer.CORPUS[0].split() + tiny_tokenizer.CORPUS[1].split()
    found, index = [], 0
    while len(found) < 32 and index < 400:
        start, length = (index * 7) % len(words), 1 + index % 9
        prompt = " ".join(words[start : start + length]) or "graph"
        steps = 4 + (index * 5) % 28
        ids = generator.encode(prompt)
        if len(ids) + steps <= generator.max_length and decided(generator, ids, steps):
            found.append((prompt, steps))
        index += 1
    assert len(found) == 32, f"only {len(found)} decided prompts"
    return found


@pytest.fixture(scope="module")
def live_llama(llama_export):
    engine = Engine(llama_export, max_running=8, max_queue=64, provider="cpu")
    with LiveServer(engine, model_name="llama") as live:
        yield live


def test_server_greedy_text_equals_the_generator(live_llama, generator, cases):
    client = live_llama.client()
    for prompt, steps in cases[:4]:
        expected = greedy_text(generator, prompt, steps)
        result = client.completions.create(
            model="llama", prompt=prompt, max_tokens=steps, temperature=0
        )
        assert result.choices[0].text == expected, prompt
        assert result.usage.prompt_tokens == len(generator.encode(prompt))
        assert 1 <= result.usage.completion_tokens <= steps
        stream = client.completions.create(
            model="llama", prompt=prompt, max_tokens=steps, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == expected, prompt
    prompt, steps = cases[0]
    chat = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=steps,
        temperature=0,
    )
    assert chat.choices[0].message.content == greedy_text(generator, prompt, steps, chat=True)
    stats = live_llama.engine.stats()
    assert (stats["running"], stats["queue_depth"], stats["cache_rows"]) == (0, 0, 0)


def test_prompt_past_the_context_is_400(live_llama):
    client = live_llama.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="llama", prompt=[5] * 70, max_tokens=1)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="llama", prompt=[5, 6], max_tokens=63)
    assert raised.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="llama", prompt=[5, 300], max_tokens=2)
    assert raised.value.param == "prompt"


def streamed_texts(live: LiveServer, cases: list[tuple[str, int]]) -> list[str]:
    """Every (prompt, max_tokens) of ``cases`` as one concurrent greedy stream; their texts."""
    client = live.client()

    def one(case: tuple[str, int]) -> str:
        prompt, steps = case
        stream = client.completions.create(
            model="llama", prompt=prompt, max_tokens=steps, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return list(pool.map(one, cases, timeout=WAIT * 2))


def test_32_concurrent_streams_each_get_their_own_greedy_text(live_llama, generator, cases):
    expected = [greedy_text(generator, prompt, steps) for prompt, steps in cases]
    assert streamed_texts(live_llama, cases) == expected
    stats = live_llama.engine.stats()
    assert (stats["running"], stats["queue_depth"], stats["cache_rows"]) == (0, 0, 0)


def test_a_disconnect_frees_the_engine_row(live_llama, generator):
    check_disconnect_frees(live_llama, generator, "cache_rows")


@pytest.fixture(scope="module")
def live_paged(llama_export):
    """The same checkpoint exported with ``--kv-layout paged`` (4-slot blocks), served."""
    out = llama_export.parent / "onnx-paged"
    export(llama_export.parent / "hf", out, kv_layout="paged", kv_block_size=4)
    engine = Engine(out, max_running=8, max_queue=64, provider="cpu")
    assert engine.stats()["kv_store"] == "paged"
    with LiveServer(engine, model_name="llama") as live:
        yield live


def test_paged_export_serves_each_stream_its_own_greedy_text(live_paged, generator, cases):
    expected = [greedy_text(generator, prompt, steps) for prompt, steps in cases[:12]]
    assert streamed_texts(live_paged, cases[:12]) == expected
    stats = live_paged.engine.stats()
    assert (stats["running"], stats["blocks_used"]) == (0, 0)
    assert stats["block_allocations"] == stats["block_frees"] > 0


def test_a_disconnect_frees_the_paged_blocks(live_paged, generator):
    check_disconnect_frees(live_paged, generator, "blocks_used")


def check_disconnect_frees(live: LiveServer, generator: Generator, held: str) -> None:
    """A client that drops a stream mid-generation has its request cancelled: the engine's
    ``held`` counter (cache rows, or pool blocks in use) returns to 0."""
    prompt = next(
        [5, first, 7]
        for first in range(3, 300)
        if generator.generate([5, first, 7], max_new_tokens=8).stopped_by == "length"
    )  # no end-of-sequence within the tokens the engine is let to make
    engine, release = live.engine, threading.Event()
    original, held_after = engine.step, engine.stats()["tokens_generated"] + 2

    def held_step() -> None:  # two tokens, then the engine holds until released
        if engine.stats()["tokens_generated"] >= held_after and not release.is_set():
            release.wait(WAIT)
        original()

    engine.step = held_step
    try:
        body = {
            "model": "llama",
            "prompt": prompt,
            "max_tokens": 50,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{live.base}/v1/completions", json=body, timeout=WAIT) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(line for line in lines if line).startswith("data: ")
            assert engine.stats()["running"] == 1
            assert engine.stats()[held] > 0
        eventually(lambda: engine.stats()[held] == 0, f"{held} returns to 0")
        assert engine.stats()["running"] == 0
    finally:
        release.set()
        del engine.step


def test_graphattn_serve_sigterm_drains_then_exits_0(llama_export, generator, cases):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "graphattn.cli", "serve", str(llama_export), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process=process)
        prompt, steps = max(cases, key=lambda case: case[1])
        body = {"prompt": prompt, "max_tokens": steps, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=WAIT) as r:
            assert r.status_code == 200
            process.send_signal(signal.SIGTERM)
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert text == greedy_text(generator, prompt, steps)
        _, err = process.communicate(timeout=WAIT)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=WAIT)
