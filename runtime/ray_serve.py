"""``graphattn serve`` on Ray Serve: N replicas of the same engine behind Ray's HTTP proxy.

    graphattn serve out/ --ray --replicas 2                       # a local Ray cluster
    graphattn serve out/ --ray --replicas 4 --ray-address auto    # a running cluster
    app = build_application("out/", replicas=2)                   # a serve.Application
    serve.run(app, route_prefix="/")

Each replica is a Ray actor that builds its own :class:`~graphattn.runtime.engine.Engine` from
the export directory (``runtime/server.py``'s :func:`load_app`) and serves that app's routes
unchanged: the same OpenAI-compatible API, SSE streaming, API key, error bodies and status codes
as ``graphattn serve`` without Ray. Replicas share nothing but the export files (each has its
own weights in memory, KV cache, queue and metrics; ``/metrics`` reports the replica that
answered). Ray's proxy spreads requests over the replicas; every response carries the header
``x-graphattn-replica`` naming the replica that answered it.

A replica accepts up to ``max_running + max_queue`` requests at once, so its engine, not Ray's
router, decides admission (429 with ``Retry-After`` when full). Needs the ``ray`` extra
(``pip install 'graphattn[ray]'``): this module imports ``ray`` at import time.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graphattn.runtime.config import locate_model
from graphattn.runtime.server import load_app

APP_NAME = "graphattn"
REPLICA_HEADER = "x-graphattn-replica"
GRACEFUL_SHUTDOWN_S = 60.0  # a replica being stopped finishes its running requests first


class _ReplicaHeader:
    """ASGI middleware: adds ``x-graphattn-replica: <replica id>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_tagged)


@serve.deployment(name="GraphattnEngine")
@serve.ingress()
class GraphattnReplica:
    """One replica: its own engine over ``export_dir``, serving runtime/server.py's app."""

    def __init__(self, export_dir: str, **app_options: Any) -> None:
        self.export_dir, self.app_options = export_dir, app_options

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Called by Ray Serve once per replica after ``__init__``: load the engine, build the
        app (Ray runs its lifespan: the engine starts here and drains when the replica stops)."""
        app = load_app(self.export_dir, **self.app_options)
        replica = serve.get_replica_context().replica_id.unique_id
        return _ReplicaHeader(app, replica)


def _last_line(error: BaseException) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if line), type(error).__name__)


def build_application(
    export_dir: str | Path,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    api_key: str | None = None,
    max_running: int = 16,
    max_queue: int = 64,
    model_name: str | None = None,
    provider: str = "cpu",
) -> serve.Application:
    """The Ray Serve application: ``replicas`` copies of the engine over ``export_dir``.

    ``export_dir`` is resolved here, on the driver: it must exist at that same absolute path on
    every node that runs a replica. Ray reserves ``replica_cpus`` CPUs per replica, and each
    engine runs that many threads (at least one).
    """
    export = Path(export_dir).resolve()
    locate_model(export)  # a missing or bad export fails here, not in every replica
    if replicas < 1:
        raise ValueError(f"--replicas must be positive, got {replicas}")
    if replica_cpus <= 0:
        raise ValueError(f"--replica-cpus must be positive, got {replica_cpus}")
    deployment = GraphattnReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_running + max_queue,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    )
    return deployment.bind(
        str(export),
        api_key=api_key,
        max_running=max_running,
        max_queue=max_queue,
        model_name=model_name or export.name,
        provider=provider,
        threads=max(1, int(replica_cpus)),
    )


def serve_ray(
    export_dir: str | Path,
    *,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    replica_cpus: float = 1.0,
    api_key: str | None = None,
    max_running: int = 16,
    max_queue: int = 64,
    model_name: str | None = None,
    provider: str = "cpu",
) -> None:
    """Serve ``export_dir`` on Ray Serve until SIGINT/SIGTERM, then shut it down and return.

    Without ``address`` a new local Ray cluster is started (and stopped on exit); with one
    (``auto``, ``HEAD:6379``) the driver joins that cluster, and on exit deletes its
    application (and stops Serve there if no other application is left).
    """
    app = build_application(
        export_dir,
        replicas=replicas,
        replica_cpus=replica_cpus,
        api_key=api_key,
        max_running=max_running,
        max_queue=max_queue,
        model_name=model_name,
        provider=provider,
    )
    if address is None:
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)
    # ray.init installs a SIGTERM handler that exits at once: ours shuts Serve down first. A
    # signal while Serve starts (serve.run waits for replicas, forever if the cluster lacks the
    # CPUs) interrupts the start; once serving, it ends the wait. A second one during the
    # shutdown meets the previous handlers (Ray's exit, KeyboardInterrupt) and aborts it.
    stop, serving = threading.Event(), threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt  # a BaseException: Ray's `except Exception` lets it by

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        serving.set()
        print(
            f"graphattn: serving {replicas} replica(s) on http://{host}:{port} (Ray Serve);"
            " SIGTERM or Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    except KeyboardInterrupt:
        pass  # stopped while starting: shut down what started, return normally
    except Exception as error:  # Ray's errors carry remote tracebacks: keep their last line
        raise RuntimeError(f"Ray Serve did not start: {_last_line(error)}") from error
    finally:
        serving.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(APP_NAME)  # replicas finish their running requests, engines drain
            if address is None or not serve.status().applications:
                serve.shutdown()
        finally:
            ray.shutdown()
