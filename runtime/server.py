"""An OpenAI-compatible HTTP server over the continuous-batching :class:`Engine`.

    graphattn serve out/ --port 8000 --api-key secret
    create_app(engine, model_name="tiny")        # the Starlette app, for tests or other ASGI hosts
    load_app("out/", api_key="secret")           # a new Engine over an export and its app

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the export's chat template),
streaming as server-sent events ending in ``data: [DONE]``; ``GET /v1/models``, ``GET /health``
and ``GET /metrics`` (Prometheus text). Built on Starlette and served by uvicorn (the ``serve``
extra); the engine runs its own background thread and every request is bridged from it.

Bad input never reaches the engine: malformed JSON, unknown or out-of-range parameters, a
prompt past the context and ``max_tokens <= 0`` answer 400 with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``; a missing or wrong bearer token (with
``api_key``) answers 401 on every route; a full queue answers 429 with ``Retry-After``. A client
that disconnects has its request cancelled (the engine frees its cache at once). On SIGTERM
uvicorn stops accepting connections, lets running responses finish, then the app's lifespan
calls ``engine.stop(drain=True)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from graphattn.runtime.engine import PromptTooLong, QueueFull, RequestParams

MAX_BODY_BYTES = 4 * 2**20
MAX_STOP_STRINGS = 4
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_END = object()


class APIError(Exception):
    """An error answered with an OpenAI-style body and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def response(self) -> JSONResponse:
        """The JSON response carrying this error."""
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- parameter checks
def _integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, got {json.dumps(value)}", "invalid_type")
    if minimum is not None and value < minimum:
        raise _bad(name, f"'{name}' must be >= {minimum}, got {value}")
    return value


def _number(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a number, got {json.dumps(value)}", "invalid_type")
    if value > high or value < low or (open_low and value == low):
        side = "(" if open_low else "["
        raise _bad(name, f"'{name}' must be in {side}{low}, {high}], got {value}")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be true or false, got {json.dumps(value)}", "invalid_type")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("stop", "'stop' must be a non-empty string or a list of them", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    return tuple(items)


def _only(name: str, allowed: tuple) -> Callable[[Any], Any]:
    """A parameter accepted for compatibility only at its neutral values."""

    def check(value: Any) -> Any:
        if not any(type(value) is type(a) and value == a for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise _bad(name, f"'{name}' is only supported as {shown}, got {json.dumps(value)}")
        return value

    return check


def _stream_options(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise _bad("stream_options", "'stream_options' takes only {\"include_usage\": bool}")
    return _boolean("stream_options.include_usage", value.get("include_usage", False))


_COMMON: dict[str, Callable[[Any], Any]] = {
    "model": lambda v: v,  # checked against the served name in the handler
    "max_tokens": lambda v: None if v is None else _integer("max_tokens", v, minimum=1),
    "temperature": lambda v: 1.0 if v is None else _number("temperature", v, 0.0, 2.0),
    "top_p": lambda v: 1.0 if v is None else _number("top_p", v, 0.0, 1.0, open_low=True),
    "top_k": lambda v: 0 if v is None else _integer("top_k", v, minimum=0),
    "repetition_penalty": lambda v: (
        1.0 if v is None else _number("repetition_penalty", v, 0.0, 10.0, open_low=True)
    ),
    "seed": lambda v: None if v is None else _integer("seed", v, minimum=0),
    "stop": _stop,
    "stream": lambda v: False if v is None else _boolean("stream", v),
    "stream_options": _stream_options,
    "n": _only("n", (1, None)),
    "user": lambda v: v,
    "presence_penalty": _only("presence_penalty", (0, 0.0, None)),
    "frequency_penalty": _only("frequency_penalty", (0, 0.0, None)),
    "logit_bias": _only("logit_bias", (None, {})),
}
_COMPLETION = {
    **_COMMON,
    "prompt": lambda v: v,
    "echo": _only("echo", (False, None)),
    "logprobs": _only("logprobs", (None,)),
    "best_of": _only("best_of", (1, None)),
    "suffix": _only("suffix", (None, "")),
}
_CHAT = {
    **_COMMON,
    "messages": lambda v: v,
    "max_completion_tokens": lambda v: (
        None if v is None else _integer("max_completion_tokens", v, minimum=1)
    ),
    "logprobs": _only("logprobs", (False, None)),
    "top_logprobs": _only("top_logprobs", (None,)),
}


def _check(body: dict, spec: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise _bad(unknown[0], f"unknown parameter '{unknown[0]}'", "unknown_parameter")
    return {name: check(body.get(name)) for name, check in spec.items()}


# --------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters and a time-to-first-token histogram, rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.requests: dict[tuple[str, int], int] = {}
        self.completion_tokens = 0
        self._last_sample: tuple[float, int] | None = None

    def observe_ttft(self, seconds: float) -> None:
        """Count one request's time from arrival to its first generated text."""
        with self._lock:
            index = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), -1)
            self.ttft_counts[index] += 1
            self.ttft_sum += seconds

    def observe_request(self, route: str, status: int, completion_tokens: int = 0) -> None:
        """Count one answered request (and the tokens it generated)."""
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            self.completion_tokens += completion_tokens

    def render(self, stats: dict) -> str:
        """Prometheus text exposition of these metrics and the engine's ``stats()``."""
        now = time.monotonic()
        generated = int(stats.get("tokens_generated", self.completion_tokens))
        with self._lock:
            previous, self._last_sample = self._last_sample, (now, generated)
            rate = 0.0
            if previous is not None and now > previous[0]:
                rate = (generated - previous[1]) / (now - previous[0])
            lines = [
                "# HELP graphattn_queue_depth Requests waiting for admission.",
                "# TYPE graphattn_queue_depth gauge",
                f"graphattn_queue_depth {int(stats.get('queue_depth', 0))}",
                "# HELP graphattn_running_sequences Sequences in the running batch.",
                "# TYPE graphattn_running_sequences gauge",
                f"graphattn_running_sequences {int(stats.get('running', 0))}",
                "# HELP graphattn_generated_tokens_total Tokens generated by the engine.",
                "# TYPE graphattn_generated_tokens_total counter",
                f"graphattn_generated_tokens_total {generated}",
                "# HELP graphattn_tokens_per_second Generated tokens/s since the previous scrape.",
                "# TYPE graphattn_tokens_per_second gauge",
                f"graphattn_tokens_per_second {rate:.6g}",
                "# HELP graphattn_time_to_first_token_seconds Arrival to first generated text.",
                "# TYPE graphattn_time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip(TTFT_BUCKETS, self.ttft_counts):
                cumulative += count
                lines.append(
                    f'graphattn_time_to_first_token_seconds_bucket{{le="{bound}"}} {cumulative}'
                )
            total = sum(self.ttft_counts)
            lines += [
                f'graphattn_time_to_first_token_seconds_bucket{{le="+Inf"}} {total}',
                f"graphattn_time_to_first_token_seconds_sum {self.ttft_sum:.6g}",
                f"graphattn_time_to_first_token_seconds_count {total}",
                "# HELP graphattn_requests_total Answered HTTP requests by route and status.",
                "# TYPE graphattn_requests_total counter",
            ]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(
                    f'graphattn_requests_total{{route="{route}",status="{status}"}} {count}'
                )
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- serving
@dataclass
class _Job:
    """One admitted request: the engine's handle and the text pieces bridged to the loop."""

    handle: Any
    queue: asyncio.Queue
    arrived: float
    first_text_at: float | None = None


class _BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The routes over one engine; :meth:`app` is the ASGI application."""

    def __init__(self, engine: Any, *, model_name: str, api_key: str | None = None) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.metrics = Metrics()
        self.created = int(time.time())

    # ------------------------------------------------------------------ app
    def app(self) -> ASGIApp:
        """The Starlette app (wrapped in bearer-token auth when an API key is set)."""

        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            self.engine.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.engine.stop, drain=True)

        app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_text, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
            lifespan=lifespan,
        )
        return _BearerAuth(app, self.api_key) if self.api_key else app

    async def _not_found(self, request: Request, _exc: Exception) -> Response:
        return APIError(404, f"no route {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request: Request, _exc: Exception) -> Response:
        message = f"{request.method} is not allowed on {request.url.path}"
        return APIError(405, message, code="method_not_allowed").response()

    # --------------------------------------------------------------- simple routes
    async def health(self, _request: Request) -> Response:
        """``{"status": "ok"}`` once the engine is up."""
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def models(self, _request: Request) -> Response:
        """The one served model, OpenAI list format."""
        entry = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "graphattn",
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def metrics_text(self, _request: Request) -> Response:
        """Prometheus text: queue depth, running sequences, tokens, tokens/s, TTFT."""
        text = self.metrics.render(dict(self.engine.stats()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # --------------------------------------------------------------- generation routes
    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        arrived = time.monotonic()
        try:
            body = await self._json(request)
            args = _check(body, _CHAT if chat else _COMPLETION)
            if args["model"] is not None and args["model"] != self.model_name:
                raise APIError(
                    404,
                    f"model {args['model']!r} is not served here (this server has"
                    f" {self.model_name!r})",
                    param="model",
                    code="model_not_found",
                )
            self._tokenizer()  # text out needs the tokenizer, even for a prompt of ids
            prompt_ids = self._chat_ids(args["messages"]) if chat else self._prompt_ids(args)
            params = self._request_params(args, prompt_ids, chat)
            handle = self._submit(prompt_ids, params)
        except APIError as error:
            self.metrics.observe_request(route, error.status)
            return error.response()
        job = self._bridge(handle, arrived)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if args["stream"]:
            events = self._events(job, ident, chat, args["stream_options"], route)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            # the background task runs after the response, a disconnect included: it cancels a
            # request whose event stream never started (so its finally never ran)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers=headers,
                background=BackgroundTask(self._cancel_unfinished, handle),
            )
        try:
            text = await self._collect(job, request)
            failure = self._failure(handle)
        except Exception as error:  # the engine side failed: answer it, keep serving
            failure = APIError(500, f"generation failed: {error}", type="server_error")
        if failure is not None:
            self.metrics.observe_request(route, failure.status)
            return failure.response()
        if text is None:  # the client went away; nobody reads this
            self.metrics.observe_request(route, 499)
            return Response(status_code=499)
        self.metrics.observe_request(route, 200, handle.completion_tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": handle.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None
        else:
            choice.update(text=text, logprobs=None)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [choice],
                "usage": self._usage(handle),
            }
        )

    # --------------------------------------------------------------- input
    async def _json(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _bad(None, f"the body is not valid JSON ({error})", "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad(None, "the body must be a JSON object", "invalid_json")
        return body

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            raise _bad("prompt", "this export has no tokenizer.json: send token ids as 'prompt'")
        return tokenizer

    def _prompt_ids(self, args: dict) -> list[int]:
        prompt = args["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt", "'prompt' is empty")
            return list(self._tokenizer().encode(prompt))
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = getattr(self.engine, "vocab_size", None)
            bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary")
            return list(prompt)
        if prompt is None:
            raise _bad("prompt", "'prompt' is required", "missing_parameter")
        raise _bad(
            "prompt",
            "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
            "invalid_type",
        )

    def _chat_ids(self, messages: Any) -> list[int]:
        if messages is None:
            raise _bad("messages", "'messages' is required", "missing_parameter")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "'messages' must be a non-empty list", "invalid_type")
        plain = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _bad(where, f"{where} must be an object with a string 'role'", "invalid_type")
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise _bad(where, f"{where}: only text content parts are supported")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise _bad(where, f"{where}.content must be a string", "invalid_type")
            plain.append({"role": message["role"], "content": content})
        tokenizer = self._tokenizer()
        try:
            text = tokenizer.chat(plain)
        except ValueError as error:  # TokenizerError: no template, or the template refused
            raise _bad("messages", str(error)) from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _request_params(self, args: dict, prompt_ids: list[int], chat: bool) -> Any:
        context = int(self.engine.context_length)
        room = context - len(prompt_ids)
        max_tokens = args["max_tokens"]
        if chat and args.get("max_completion_tokens") is not None:
            max_tokens = args["max_completion_tokens"]
        if max_tokens is None:
            max_tokens = max(room, 1) if chat else min(16, max(room, 1))
        if len(prompt_ids) + max_tokens > context:
            raise _bad(
                "max_tokens" if room > 0 else ("messages" if chat else "prompt"),
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together"
                f" past the context of {context} tokens",
                "context_length_exceeded",
            )
        try:
            return RequestParams(
                max_tokens=max_tokens,
                temperature=args["temperature"],
                top_p=args["top_p"],
                top_k=args["top_k"],
                repetition_penalty=args["repetition_penalty"],
                seed=args["seed"],
                stop=args["stop"],
            )
        except ValueError as error:
            raise _bad(None, str(error)) from None

    def _submit(self, prompt_ids: list[int], params: Any) -> Any:
        try:
            return self.engine.submit(prompt_ids, params)
        except QueueFull as error:
            raise APIError(
                429,
                f"the server is busy ({error}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except PromptTooLong as error:
            raise _bad("prompt", str(error), "context_length_exceeded") from None
        except ValueError as error:  # the engine refuses the prompt (empty, ids out of vocab)
            raise _bad("prompt", str(error)) from None

    # --------------------------------------------------------------- output
    def _bridge(self, handle: Any, arrived: float) -> _Job:
        """Pump the engine request's text pieces from a thread into an asyncio queue."""
        loop = asyncio.get_running_loop()
        job = _Job(handle=handle, queue=asyncio.Queue(), arrived=arrived)

        def pump() -> None:
            try:
                for piece in handle.deltas():
                    loop.call_soon_threadsafe(job.queue.put_nowait, piece)
                loop.call_soon_threadsafe(job.queue.put_nowait, _END)
            except BaseException as error:  # handed to the loop, re-raised there
                loop.call_soon_threadsafe(job.queue.put_nowait, error)

        threading.Thread(target=pump, name=f"request-{handle.id}", daemon=True).start()
        return job

    async def _pieces(self, job: _Job) -> AsyncIterator[str]:
        while True:
            item = await job.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if job.first_text_at is None and item:
                job.first_text_at = time.monotonic()
                self.metrics.observe_ttft(job.first_text_at - job.arrived)
            yield item

    async def _collect(self, job: _Job, request: Request) -> str | None:
        """All of a non-streamed request's text; None (and cancelled) if the client left."""

        async def gather() -> str:
            return "".join([piece async for piece in self._pieces(job)])

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        text_task = asyncio.ensure_future(gather())
        gone_task = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {text_task, gone_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone_task.cancel()
            if not text_task.done():
                text_task.cancel()
                job.handle.cancel()
        return text_task.result() if text_task in done else None

    @staticmethod
    def _cancel_unfinished(handle: Any) -> None:
        if handle.finish_reason is None:
            handle.cancel()

    def _failure(self, handle: Any) -> APIError | None:
        """The error of a request the engine finished with ``"error"`` (a failed graph call)."""
        if handle.finish_reason != "error":
            return None
        reason = getattr(handle, "error", None) or "the engine failed"
        return APIError(500, f"generation failed: {reason}", type="server_error")

    def _usage(self, handle: Any) -> dict[str, int]:
        prompt, completion = int(handle.prompt_tokens), int(handle.completion_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _events(
        self, job: _Job, ident: str, chat: bool, include_usage: bool, route: str
    ) -> AsyncIterator[str]:
        """Server-sent events of one streamed request; cancels it if the client leaves."""
        created, handle = int(time.time()), job.handle
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra: Any) -> str:
            body = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        finished = False
        try:
            if chat:
                yield chunk([choice("", None, role=True)])
            try:
                async for piece in self._pieces(job):
                    yield chunk([choice(piece, None)])
                failure = self._failure(handle)
            except Exception as error:  # the engine side failed mid-stream
                failure = APIError(500, f"generation failed: {error}", type="server_error")
            finished = True
            if failure is not None:
                yield f"data: {json.dumps(json.loads(failure.response().body))}\n\n"
                yield "data: [DONE]\n\n"
                self.metrics.observe_request(route, failure.status)
                return
            yield chunk([choice(None, handle.finish_reason)])
            if include_usage:
                yield chunk([], usage=self._usage(handle))
            yield "data: [DONE]\n\n"
            self.metrics.observe_request(route, 200, handle.completion_tokens)
        finally:
            if not finished:  # the client disconnected (or the send failed): free its cache
                handle.cancel()
                self.metrics.observe_request(route, 499)


def create_app(engine: Any, *, model_name: str, api_key: str | None = None) -> ASGIApp:
    """The ASGI app serving ``engine`` (its lifespan starts the engine and drains it on exit)."""
    return Server(engine, model_name=model_name, api_key=api_key).app()


def serve(
    export_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_running: int = 16,
    max_queue: int = 64,
    model_name: str | None = None,
    provider: str = "cpu",
    log_level: str = "info",
) -> None:
    """Load ``export_dir`` into an :class:`Engine` and serve it until SIGINT/SIGTERM."""
    app = load_app(
        export_dir,
        api_key=api_key,
        max_running=max_running,
        max_queue=max_queue,
        model_name=model_name,
        provider=provider,
    )
    run(app, host=host, port=port, log_level=log_level)


def load_app(
    export_dir: str,
    *,
    api_key: str | None = None,
    max_running: int = 16,
    max_queue: int = 64,
    model_name: str | None = None,
    provider: str = "cpu",
    threads: int | None = None,
) -> ASGIApp:
    """A new :class:`Engine` over ``export_dir`` and the app serving it (``graphattn serve`` and
    each Ray Serve replica build theirs with this); the model is named after the directory."""
    import pathlib

    from graphattn.runtime.engine import Engine

    engine = Engine(
        export_dir,
        max_running=max_running,
        max_queue=max_queue,
        provider=provider,
        threads=threads,
    )
    name = model_name or pathlib.Path(export_dir).resolve().name
    return create_app(engine, model_name=name, api_key=api_key)


def run(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; SIGTERM drains and returns normally.

    uvicorn finishes the open responses, runs the lifespan shutdown (``engine.stop(drain=True)``)
    and then re-raises the signal it caught; the handler installed here turns that re-raised
    SIGTERM into a normal return, so ``graphattn serve`` exits 0 after draining.
    """
    import signal

    import uvicorn

    def drained(_signum: int, _frame: Any) -> None:
        pass  # only reached after uvicorn's graceful shutdown has finished

    previous = signal.signal(signal.SIGTERM, drained)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
