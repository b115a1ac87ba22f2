"""``hybridps serve``: TF Serving's REST API on raw feature values, over a live model.

What lives here: the aiohttp application (:func:`make_app`), its Prometheus metrics
(prometheus_client, one registry per server), the ``serve`` command. What does not: the model
worker and the export follower (hybridps.serving.live, hybridps.serving.follower), raw values
-> inputs (hybridps.serving.inputs).

* ``POST /v1/models/NAME:predict`` with ``{"instances": [{feature: value, ...}, ...]}`` or
  ``{"inputs": {feature: [value, ...]}}`` -> ``{"predictions": [probability, ...]}`` (plus
  ``version`` and ``step``: the export that answered). Requests that wait together share one
  model call. A bad request is HTTP 400 ``{"error": "..."}`` naming the feature.
* ``GET /v1/models/NAME`` -> ``{"model_version_status": [...]}`` as TF Serving gives it, plus
  ``version`` (sequence), ``step``, ``position``, ``applied_at`` (unix seconds), ``export``,
  ``last_refusal`` and ``refused``.
* ``GET /metrics``: Prometheus text.

aiohttp: asyncio, so many connections wait cheaply on one thread while the model worker runs
one batched TF call for all of them; it is a maintained, widely used server with its own HTTP
parser, routing and graceful shutdown.
"""
import asyncio
import json
import os
import signal
import sys
import time

from hybridps.errors import HybridPSError, RequestError
from hybridps.serving.inputs import request_columns, serving_inputs
from hybridps.serving.live import LiveModel, log

DEFAULT_PORT = 8501                   # TF Serving's REST port
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServeMetrics:
    """The server's Prometheus metrics (its own registry)."""

    def __init__(self, live):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("hybridps_serve_requests", "Predict requests answered, by HTTP code",
                                ["code"], registry=registry)
        self.latency = Histogram("hybridps_serve_request_latency_seconds",
                                 "Predict request latency (parse, queue, model call)",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.model_calls = Counter("hybridps_serve_model_calls", "Batched model calls", registry=registry)
        self.batch_rows = Counter("hybridps_serve_predicted_rows", "Rows predicted", registry=registry)
        self.applied = Counter("hybridps_serve_applied_exports", "Exports applied, by kind", ["kind"],
                               registry=registry)
        self.refused = Counter("hybridps_serve_refused_deltas",
                               "Exports (deltas, full exports) refused: damaged or out of order",
                               registry=registry)
        version = Gauge("hybridps_serve_model_version", "Sequence number of the served export",
                        registry=registry)
        version.set_function(lambda: live.version.sequence if live.version else -1)
        step = Gauge("hybridps_serve_model_step", "Training step of the served model", registry=registry)
        step.set_function(lambda: live.version.step if live.version else -1)
        age = Gauge("hybridps_serve_seconds_since_applied",
                    "Seconds since the newest export (delta or full) was applied", registry=registry)
        age.set_function(lambda: time.time() - live.version.applied_at if live.version else -1)

    def text(self):
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def status_of(live, name):
    """The GET /v1/models/NAME body."""
    version = live.version
    refusal = live.follower.last_refusal
    entry = {"version": str(version.sequence) if version else "0",
             "state": "AVAILABLE" if version else "LOADING",
             "status": {"error_code": "OK" if version else "UNAVAILABLE",
                        "error_message": "" if version else f"no full export in {live.root} yet"}}
    return {"model_version_status": [entry], "name": name, "model_dir": live.follower.root,
            "version": version.sequence if version else None,
            "step": version.step if version else None,
            "position": version.position if version else None,
            "applied_at": version.applied_at if version else None,
            "kind": version.kind if version else None, "export": version.export if version else None,
            "last_refusal": refusal.to_dict() if refusal else None,
            "refused": len(live.follower.refusals)}


def make_app(live, name, metrics):
    """The aiohttp application of a LiveModel served as model ``name``."""
    from aiohttp import web

    def error(status, message):
        return web.json_response({"error": message}, status=status)

    def check_name(request):
        if request.match_info["name"] != name:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no model {request.match_info['name']!r}; "
                                                             f"this server serves {name!r}"}),
                                   content_type="application/json")

    async def predict(request):
        started = time.perf_counter()
        check_name(request)
        response = await _predict(request)
        metrics.requests.labels(code=str(response.status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _predict(request):
        schema = live.schema
        if schema is None:
            return error(503, f"no model loaded yet: waiting for a full export in {live.root}")
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return error(400, f"the request body is not JSON: {exc}")
        try:
            columns, rows = request_columns(body, schema)
            inputs = serving_inputs(schema, columns, rows)
        except RequestError as exc:
            return error(400, str(exc))
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(probabilities, version, exc):
            def settle():
                if not future.done():
                    future.set_result((probabilities, version, exc))
            loop.call_soon_threadsafe(settle)

        live.predict(schema, inputs, rows, deliver)
        probabilities, version, exc = await future
        if exc is not None:
            status = 503 if isinstance(exc, HybridPSError) else 500
            return error(status, f"{type(exc).__name__}: {exc}")
        return web.json_response({"predictions": [float(p) for p in probabilities],
                                  "version": version.sequence, "step": version.step})

    async def status(request):
        check_name(request)
        return web.json_response(status_of(live, name))

    async def metrics_text(request):
        return web.Response(body=metrics.text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/models/{name:[^/:]+}:predict", predict)
    app.router.add_get("/v1/models/{name:[^/:]+}", status)
    app.router.add_get("/metrics", metrics_text)
    return app


def serve(model_dir, *, host="127.0.0.1", port=DEFAULT_PORT, name="hybridps", poll_seconds=0.3,
          max_batch_rows=4096, apply_pause=0.0, model=None):
    """Serve ``model_dir`` until SIGTERM or SIGINT (the ``serve`` command's body; ``model``:
    the operator's ``--model``, hybridps.serving.live.LiveModel)."""
    from aiohttp import web
    metrics = None

    def applied(version, loaded):
        metrics.applied.labels(kind=version.kind).inc()

    def refused(refusal):
        metrics.refused.inc()

    def batch(rows, requests):
        metrics.model_calls.inc()
        metrics.batch_rows.inc(rows)

    live = LiveModel(model_dir, poll_seconds=poll_seconds, max_batch_rows=max_batch_rows,
                     apply_pause=apply_pause, on_apply=applied, on_refusal=refused, on_batch=batch,
                     model=model)
    metrics = ServeMetrics(live)
    live.catch_up()
    live.start()

    async def main():
        runner = web.AppRunner(make_app(live, name, metrics), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        version = live.version
        print(f"hybridps serve: model dir {os.path.abspath(model_dir)}, version "
              f"{version.sequence if version else None}, step {version.step if version else None}"
              f"{'' if version else ' (waiting for a full export)'}, "
              f"http://{host}:{bound}/v1/models/{name}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        live.stop()
    return 0


def add_serve_arguments(parser):
    """Arguments of ``hybridps serve``; sets ``func`` to :func:`serve_main`."""
    parser.add_argument("--model-dir", required=True,
                        help="the export directory a training run writes (--delta-export-dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port ({DEFAULT_PORT}, TF Serving's REST port; 0: any free port)")
    parser.add_argument("--name", default="hybridps", help="the model name in /v1/models/NAME")
    parser.add_argument("--poll-seconds", type=float, default=0.3,
                        help="how often to look for new exports (0.3)")
    parser.add_argument("--max-batch-rows", type=int, default=4096,
                        help="rows of one batched model call at most (4096)")
    from hybridps.models.registry import add_model_argument
    add_model_argument(parser)
    parser.set_defaults(func=serve_main)


def serve_main(args):
    """``hybridps serve --model-dir DIR``."""
    from hybridps import config as config_module
    from hybridps.errors import ConfigError
    from hybridps.tf_runtime import configure_tensorflow
    if args.poll_seconds <= 0 or args.max_batch_rows < 1:
        raise ConfigError("--poll-seconds must be > 0 and --max-batch-rows >= 1")
    if not os.path.isdir(args.model_dir):
        log(f"{args.model_dir} does not exist yet: waiting for the training run to write exports there")
    configure_tensorflow(config_module.env_tf_threads() or max(1, os.cpu_count() or 1))
    sys.stderr.flush()
    return serve(args.model_dir, host=args.host, port=args.port, name=args.name,
                 poll_seconds=args.poll_seconds, max_batch_rows=args.max_batch_rows,
                 apply_pause=config_module.env_serve_apply_delay(), model=args.model)
