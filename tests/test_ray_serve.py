"""``graphattn serve --ray``: two engine replicas on a local Ray cluster behind Ray's HTTP proxy.

One ``graphattn serve EXPORT --ray --replicas 2`` subprocess (it starts its own local cluster)
serves a tiny Llama export for the whole module. Through the official ``openai`` client, rounds
of concurrent requests (completions and chat, streamed and not, mixed prompts) each get exactly
the greedy text of the runtime Generator on the same export, and both replicas answer (each
response names its replica in ``x-graphattn-replica``); the API key is enforced through the
proxy (401) and bad requests keep their 400 bodies. SIGTERM shuts Serve and the cluster down:
exit 0, and every Ray process that appeared while it ran is gone.

Skips with a reason where the ``ray`` extra is absent (CI installs it); the test of the message
``--ray`` gives without the extra runs everywhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tiny_tokenizer

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
pytest.importorskip("starlette", reason="the serve extra installs starlette")

import test_server  # noqa: E402
from test_server import decided, free_port, greedy_text  # noqa: E402

# the live server tests' module-scoped fixtures: their tiny Llama export and its Generator
llama_export, generator = test_server.llama_export, test_server.generator

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the ray extra (pip install 'graphattn[ray]') is not installed; CI installs it",
)

API_KEY = "ray-test-key"
MODEL = "llama"
START_WAIT = 120.0  # seconds: Ray's cluster, Serve's proxy and two engines coming up
WAIT = 60.0  # seconds: the bound on every other wait here
REPLICA_HEADER = "x-graphattn-replica"


def ray_processes() -> set[int]:
    """Pids of Ray's processes on this machine (its actors, raylet, GCS, helpers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            text = b" ".join(argv)
            if argv[0].startswith(b"ray::") or b"/site-packages/ray/" in text:
                if (entry / "stat").read_text().split(") ", 1)[1][0] != "Z":  # not a zombie
                    found.add(int(entry.name))
    return found


def eventually(condition, what: str, bound: float = WAIT) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)  # polling interval, not synchronisation
    raise AssertionError(f"not within {bound} s: {what}")


@pytest.fixture(scope="module")
def cases(generator) -> list[tuple[str, int, bool]]:
    """8 (prompt, max_tokens, chat) of mixed lengths whose greedy decodes are decided (every
    fourth one a chat request, decided on its chat-templated ids)."""
    words = tiny_tokenizer.CORPUS[0].split() + tiny_tokenizer.CORPUS[1].split()
    found, index = [], 0
    while len(found) < 8 and index < 300:
        start, length = (index * 11) % len(words), 1 + index % 7
        prompt = " ".join(words[start : start + length]) or "graph"
        steps, chat = 3 + (index * 7) % 20, len(found) % 4 == 3
        ids = generator.encode(prompt, chat=chat)
        if len(ids) + steps <= generator.max_length and decided(generator, ids, steps):
            found.append((prompt, steps, chat))
        index += 1
    assert len(found) == 8, f"only {len(found)} decided prompts"
    return found


class RayServer:
    """``graphattn serve EXPORT --ray --replicas 2`` as a subprocess on a free loopback port."""

    def __init__(self, export_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.before = ray_processes()
        self.log = log.open("w")
        command = [
            *(sys.executable, "-m", "graphattn.cli", "serve", str(export_dir), "--ray"),
            *("--replicas", "2", "--replica-cpus", "0.5", "--port", str(self.port)),
            *("--api-key", API_KEY, "--model-name", MODEL, "--max-running", "4"),
            *("--max-queue", "16"),
        ]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.log_path = log

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"serve --ray exited {self.process.returncode}:\n{self.output()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                return (
                    httpx.get(f"{self.base}/health", headers=headers, timeout=2).status_code == 200
                )
            return False

        eventually(ready, f"{self.base}/health answers 200", START_WAIT)

    def new_ray_processes(self) -> set[int]:
        return ray_processes() - self.before

    def kill(self) -> None:
        """The fallback after a failure: the driver, then every Ray process it left."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT)
        for pid in self.new_ray_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=WAIT
        )


@pytest.fixture(scope="module")
def ray_server(llama_export, tmp_path_factory):
    server = RayServer(llama_export, tmp_path_factory.mktemp("ray-log") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()  # a no-op after test_sigterm_... has stopped it


# ------------------------------------------------------------------------------------ tests
def test_serve_ray_without_the_extra_is_one_readable_line(llama_export):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray -> ImportError
        "from graphattn.cli import main\n"
        f"sys.exit(main(['serve', {str(llama_export)!r}, '--ray', '--replicas', '2']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "install graphattn[ray]" in lines[0], result.stderr


def test_replicas_need_ray():
    from graphattn.cli import main

    assert main(["serve", "some-export", "--replicas", "2"]) == 1


@needs_ray
def test_two_replicas_answer_concurrent_requests_each_with_its_own_greedy_text(
    ray_server, generator, cases
):
    # (prompt, max_tokens, chat, stream): completions and chat, half of each streamed
    requests = [(p, n, chat, i % 2 == 1) for i, (p, n, chat) in enumerate(cases)]
    expected = [greedy_text(generator, p, n, chat=chat) for p, n, chat, _ in requests]
    client = ray_server.client()

    def one(request: tuple[str, int, bool, bool]) -> tuple[str, str, int]:
        prompt, steps, chat, stream = request
        if chat:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=steps,
                temperature=0,
                stream=stream,
            )
            result = raw.parse()
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
            else:
                text = result.choices[0].message.content
        else:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=prompt, max_tokens=steps, temperature=0, stream=stream
            )
            result = raw.parse()
            if stream:
                text = "".join(c.choices[0].text for c in result if c.choices)
            else:
                text = result.choices[0].text
        return text, raw.headers[REPLICA_HEADER], raw.status_code

    replicas: set[str] = set()
    for _ in range(3):  # rounds of 8 concurrent requests, until both replicas have answered
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            answers = list(pool.map(one, requests, timeout=WAIT * 2))
        assert [text for text, _, _ in answers] == expected
        assert {status for _, _, status in answers} == {200}
        replicas |= {replica for _, replica, _ in answers}
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, f"only {replicas} answered"


@needs_ray
def test_api_key_and_errors_through_the_proxy(ray_server):
    with pytest.raises(openai.AuthenticationError):
        ray_server.client(api_key="wrong").completions.create(
            model=MODEL, prompt="graph", max_tokens=2
        )
    bare = httpx.get(f"{ray_server.base}/v1/models", timeout=WAIT)
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == "Bearer"
    assert bare.json()["error"]["code"] == "invalid_api_key"

    client = ray_server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="graph", max_tokens=0)
    assert raised.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="graph", max_tokens=2)

    headers = {"Authorization": f"Bearer {API_KEY}"}
    metrics = httpx.get(f"{ray_server.base}/metrics", headers=headers, timeout=WAIT)
    assert metrics.status_code == 200 and REPLICA_HEADER in metrics.headers
    assert "# TYPE graphattn_time_to_first_token_seconds histogram" in metrics.text
    body = {"model": MODEL, "prompt": "graph", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{ray_server.base}/v1/completions", json=body, headers=headers, timeout=WAIT
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


@needs_ray
def test_sigterm_shuts_serve_and_ray_down_and_exits_0(ray_server):
    assert ray_server.new_ray_processes(), "no Ray process appeared while serving"
    ray_server.process.send_signal(signal.SIGTERM)
    try:
        returncode = ray_server.process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after SIGTERM:\n{ray_server.output()}") from None
    assert returncode == 0, ray_server.output()
    eventually(lambda: not ray_server.new_ray_processes(), "Ray's processes have exited")
