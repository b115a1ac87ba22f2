"""``hybridps serve``: TF Serving's REST API on raw feature values, over a live model.

What lives here: the aiohttp application (:func:`make_app`), its Prometheus metrics
(prometheus_client, one registry per server), the start-up (:class:`Startup`: the port answers
at once, TensorFlow and the model load behind it), the ``serve`` command. What does not: the
model worker and the export follower (hybridps.serving.live, hybridps.serving.follower), raw
values -> inputs and the request limits (hybridps.serving.inputs).

* ``POST /v1/models/NAME:predict`` with ``{"instances": [{feature: value, ...}, ...]}`` or
  ``{"inputs": {feature: [value, ...]}}`` -> ``{"predictions": [probability, ...]}`` (plus
  ``version`` and ``step``: the export that answered). A model of several tasks answers every
  task as TF Serving answers a signature of several outputs: rows ``{"predictions": [{task:
  prediction, ...}, ...]}``, columns ``{"outputs": {task: [prediction, ...]}}`` (a binary
  task's probability, a regression task's value). Requests that wait together share one
  model call. A bad request is HTTP 400 ``{"error": "..."}`` naming the feature, or the limit
  it is over (rows per request, values per list, nesting; hybridps.serving.inputs); a body
  over ``--max-body-bytes`` is 413. Until a model is loaded: 503 ``{"error": "LOADING: ..."}``.
  The body is parsed and converted in a worker thread: the event loop keeps answering.
* ``GET /v1/models/NAME`` -> ``{"model_version_status": [...]}`` as TF Serving gives it (state
  ``LOADING`` until a model is loaded), plus ``version`` (sequence), ``step``, ``position``,
  ``applied_at`` (unix seconds), ``export``, ``last_refusal``, ``refused``, ``stale_export``
  (the last export found older than the served one, with the reason) and ``stale_exports``.
* ``GET /metrics``: Prometheus text.

Start-up: the port is bound and answers before TensorFlow is imported; TensorFlow and the
newest full export (with the deltas after it) load in a background thread.

aiohttp: asyncio, so many connections wait cheaply on one thread while the model worker runs
one batched TF call for all of them; it is a maintained, widely used server with its own HTTP
parser, routing and graceful shutdown.
"""
import asyncio
import json
import os
import signal
import sys
import threading
import time

from hybridps.errors import HybridPSError, RequestError
from hybridps.serving.inputs import RequestLimits, request_inputs
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
                               "Exports (deltas, full exports) refused: damaged, out of order or stale",
                               registry=registry)
        self.stale = Counter("hybridps_serve_stale_exports",
                             "Exports found older than the served version (kept the served one)",
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


class Startup:
    """Loads TensorFlow and the model in a background thread while the server answers.

    ``loading`` says what is being done (None once the model worker and the follower run);
    ``failed`` the error that stopped it.
    """

    def __init__(self, live, tf_threads=None):
        self.live, self.tf_threads = live, tf_threads
        self.loading = "starting"
        self.failed = None

    def start(self, on_failure):
        """Start loading; ``on_failure()`` is called (from the loading thread) if it fails."""
        threading.Thread(target=self._load, args=(on_failure,), name="hybridps-serve-startup",
                         daemon=True).start()

    def _load(self, on_failure):
        try:
            if self.tf_threads:
                self.loading = "importing TensorFlow"
                from hybridps.tf_runtime import configure_tensorflow
                configure_tensorflow(self.tf_threads)
            self.loading = f"loading the newest full export of {self.live.root}"
            version = self.live.catch_up()
            self.live.start()
            self.loading = None
            log(f"serving version {version.sequence}, step {version.step} ({version.export})" if version
                else f"ready; no full export in {self.live.root} yet: waiting for one")
        except Exception as exc:        # reported; the server stops (serve raises it)
            self.failed = f"{type(exc).__name__}: {exc}"
            log(f"loading failed: {self.failed}")
            on_failure()


def status_of(live, name, loading=None):
    """The GET /v1/models/NAME body (``loading``: what the start-up is doing, None when done)."""
    version = None if loading else live.version
    refusal = live.follower.last_refusal
    stale = live.follower.stale_refusals
    waiting = (f"LOADING: {loading}" if loading else f"LOADING: no full export in {live.root} yet")
    entry = {"version": str(version.sequence) if version else "0",
             "state": "AVAILABLE" if version else "LOADING",
             "status": {"error_code": "OK" if version else "UNAVAILABLE",
                        "error_message": "" if version else waiting}}
    return {"model_version_status": [entry], "name": name, "model_dir": live.follower.root,
            "version": version.sequence if version else None,
            "step": version.step if version else None,
            "position": version.position if version else None,
            "applied_at": version.applied_at if version else None,
            "kind": version.kind if version else None, "export": version.export if version else None,
            "last_refusal": refusal.to_dict() if refusal else None,
            "refused": len(live.follower.refusals),
            "stale_export": stale[-1].to_dict() if stale else None, "stale_exports": len(stale)}


def answer_of(predictions, columnar):
    """The predictions part of a predict answer (module doc): one task's probabilities (an
    array) -> ``{"predictions": [p, ...]}`` in both forms; several tasks ({task: array}) ->
    TF Serving's ``{"predictions": [{task: p, ...}, ...]}`` for rows (``instances``),
    ``{"outputs": {task: [p, ...]}}`` for columns (``inputs``)."""
    if not isinstance(predictions, dict):
        return {"predictions": [float(p) for p in predictions]}
    columns = {task: [float(p) for p in values] for task, values in predictions.items()}
    if columnar:
        return {"outputs": columns}
    rows = len(next(iter(columns.values()), []))
    return {"predictions": [{task: values[i] for task, values in columns.items()} for i in range(rows)]}


def make_app(live, name, metrics, limits=RequestLimits(), startup=None):
    """The aiohttp application of a LiveModel served as model ``name``.

    Args:
        limits: RequestLimits of a predict request.
        startup: the :class:`Startup` loading ``live`` (None: it is loaded).
    """
    from aiohttp import web

    def error(status, message):
        return web.json_response({"error": message}, status=status)

    def loading():
        return startup.loading if startup is not None else None

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
        schema = None if loading() else live.schema
        if schema is None:
            doing = loading() or f"no model yet: waiting for a full export in {live.root}"
            return error(503, f"LOADING: {doing}; GET /v1/models/{name} shows the state")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"the request body is larger than {limits.max_body_bytes} bytes "
                              f"(--max-body-bytes): split the request")
        loop = asyncio.get_running_loop()
        try:        # parsing and conversion take time on a large body: not on the event loop
            inputs, rows, columnar = await loop.run_in_executor(None, request_inputs, raw, schema, limits)
        except RequestError as exc:
            return error(400, str(exc))
        except RecursionError:
            return error(400, "the request body is nested too deeply")
        future = loop.create_future()

        def deliver(predictions, version, exc):
            def settle():
                if not future.done():
                    future.set_result((predictions, version, exc))
            loop.call_soon_threadsafe(settle)

        live.predict(schema, inputs, rows, deliver)
        predictions, version, exc = await future
        if exc is not None:
            status = 503 if isinstance(exc, HybridPSError) else 500
            return error(status, f"{type(exc).__name__}: {exc}")
        return web.json_response({**answer_of(predictions, columnar), "version": version.sequence,
                                  "step": version.step})

    async def status(request):
        check_name(request)
        return web.json_response(status_of(live, name, loading()))

    async def metrics_text(request):
        return web.Response(body=metrics.text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application(client_max_size=limits.max_body_bytes)
    app.router.add_post("/v1/models/{name:[^/:]+}:predict", predict)
    app.router.add_get("/v1/models/{name:[^/:]+}", status)
    app.router.add_get("/metrics", metrics_text)
    return app


def serve(model_dir, *, host="127.0.0.1", port=DEFAULT_PORT, name="hybridps", poll_seconds=0.3,
          max_batch_rows=4096, apply_pause=0.0, limits=RequestLimits(), tf_threads=None,
          model=None):
    """Serve ``model_dir`` until SIGTERM or SIGINT (the ``serve`` command's body; ``model``:
    the operator's ``--model``, hybridps.serving.live.LiveModel).

    The port answers first (503 LOADING); TensorFlow (configured with ``tf_threads``, when
    given) and the model load in the background (:class:`Startup`).

    Raises:
        HybridPSError: loading failed (after the server stopped).
    """
    from aiohttp import web
    metrics = None

    def applied(version, loaded):
        metrics.applied.labels(kind=version.kind).inc()

    def refused(refusal):
        metrics.refused.inc()
        if refusal.stale:
            metrics.stale.inc()

    def batch(rows, requests):
        metrics.model_calls.inc()
        metrics.batch_rows.inc(rows)

    live = LiveModel(model_dir, poll_seconds=poll_seconds, max_batch_rows=max_batch_rows,
                     apply_pause=apply_pause, on_apply=applied, on_refusal=refused, on_batch=batch,
                     model=model)
    metrics = ServeMetrics(live)
    startup = Startup(live, tf_threads)

    async def main():
        runner = web.AppRunner(make_app(live, name, metrics, limits, startup), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"hybridps serve: loading model dir {os.path.abspath(model_dir)} (503 LOADING until "
              f"it is loaded), http://{host}:{bound}/v1/models/{name}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        startup.start(on_failure=lambda: loop.call_soon_threadsafe(stop.set))
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        live.stop()
    if startup.failed:
        raise HybridPSError(f"hybridps serve: loading {os.path.abspath(model_dir)} failed: {startup.failed}")
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
    limits = RequestLimits()
    parser.add_argument("--max-rows-per-request", type=int, default=limits.max_rows,
                        help=f"rows (instances) of one predict request at most; more: HTTP 400 "
                             f"({limits.max_rows})")
    parser.add_argument("--max-ids-per-list", type=int, default=limits.max_ids_per_list,
                        help=f"values of one multi-hot or sequence list at most; more: HTTP 400 "
                             f"({limits.max_ids_per_list})")
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes,
                        help=f"bytes of one request body at most; more: HTTP 413 ({limits.max_body_bytes})")
    parser.set_defaults(func=serve_main)


def serve_main(args):
    """``hybridps serve --model-dir DIR``."""
    from hybridps import config as config_module
    from hybridps.errors import ConfigError
    if args.poll_seconds <= 0 or args.max_batch_rows < 1:
        raise ConfigError("--poll-seconds must be > 0 and --max-batch-rows >= 1")
    for flag in ("max_rows_per_request", "max_ids_per_list", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    if not os.path.isdir(args.model_dir):
        log(f"{args.model_dir} does not exist yet: waiting for the training run to write exports there")
    sys.stderr.flush()
    limits = RequestLimits(max_rows=args.max_rows_per_request, max_ids_per_list=args.max_ids_per_list,
                           max_body_bytes=args.max_body_bytes)
    return serve(args.model_dir, host=args.host, port=args.port, name=args.name,
                 poll_seconds=args.poll_seconds, max_batch_rows=args.max_batch_rows,
                 apply_pause=config_module.env_serve_apply_delay(), limits=limits,
                 tf_threads=config_module.env_tf_threads() or max(1, os.cpu_count() or 1),
                 model=args.model)
