"""Delta and full exports, and `hybridps serve` following them.

In process (one TF import): numbered exports with tombstones of the eviction policies, a server
model that follows them (evicted keys read as unseen, re-inserted keys read their new row), and
its refusals (a gap in the sequence, a damaged delta, a delta from another step), checked
against the training tables' own rows. End to end (one 2-rank training job, two `hybridps
predict` runs, two `hybridps serve` processes): served predictions over HTTP equal `hybridps
predict` on the checkpoint of the served step, row form and column form, a server killed with
SIGKILL inside a delta apply comes back on a consistent version, bad requests are 400 naming
the feature, /metrics parses as Prometheus text, the port answers 503 LOADING before a model is
there, an older export copied in is reported as stale. Request handling without TensorFlow (the
aiohttp app on a stand-in model): abusive bodies are 400/413 naming the limit, the body is
parsed off the event loop, LOADING until the start-up is done.
"""
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.mpi_util import MPI_ENV, REPO, run_mpi
from tests.schema_data import FEATURES, rows, write_parquet

USER_LIMIT = 4      # max_rows of the user table in the in-process test


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow
    return tensorflow


# ---------------------------------------------------------------------------- in process
def _run(tf):
    from hybridps.config import make_config
    from hybridps.models import build_model
    from hybridps.schema import build_schema
    from hybridps.sparse.shard import OwnerShard
    from hybridps.step import build_on_sample
    features = json.loads(json.dumps(FEATURES))
    features["tables"]["user"].update(max_rows=USER_LIMIT, eviction="lru")
    config = make_config(overrides={"features": features, "model": "wide_deep", "hidden": [8],
                                    "optimizer": "sgd", "learning_rate": 0.5})
    schema = build_schema(config)
    tf.keras.utils.set_random_seed(0)
    model = build_on_sample(tf, build_model(config.model, schema, config), schema)
    return config, schema, model, OwnerShard(schema, seed=0)


def _user_keys(names):
    from hybridps.data.hashing import space_keys, text_ids
    return space_keys("user", text_ids(names))


def _train(shard, schema, step, users, rng):
    """Update the rows of ``users`` (and a few items) at ``step``, then the eviction policies."""
    for table, keys in ((schema.table_index("user"), _user_keys(users)),
                        (schema.table_index("item"), np.arange(3, dtype=np.int64) + 100 * step)):
        if len(keys):
            shard.tables[table].lookup_or_insert(keys, step=step)
            grads = rng.normal(size=(len(keys), shard.tables[table].dim)).astype(np.float32)
            shard.tables[table].apply_gradients(keys, grads, step=step)
    shard.evict(step)


def _assert_serves(live, shard, model):
    """The served tables hold exactly the training tables' rows, the dense weights are the model's."""
    for t, table in enumerate(shard.tables):
        truth = table.export()
        keys, values = live.module.tables[t].export()
        order, truth_order = np.argsort(keys.numpy()), np.argsort(truth["keys"])
        np.testing.assert_array_equal(keys.numpy()[order], truth["keys"][truth_order])
        np.testing.assert_array_equal(values.numpy()[order], truth["values"][truth_order])
    for served, trained in zip(live.module.dense_variables, model.variables):
        np.testing.assert_array_equal(served.numpy(), trained.numpy())


def _user_scores(live, users):
    import tensorflow as tf
    from hybridps.serving.inputs import serving_inputs
    inputs = serving_inputs(live.schema, {"user": list(users), "x": [0.3] * len(users)}, len(users))
    names = ["dense"] + [f.name for f in live.schema.sparse]
    return live.module.serve(*[tf.constant(inputs[n]) for n in names])["probability"].numpy()


def test_exports_tombstones_and_refusals(tmp_path, tf):
    from hybridps.export import DeltaExporter, list_exports, load_export, model_description, write_delta
    from hybridps.serving.live import LiveModel
    config, schema, model, shard = _run(tf)
    rng = np.random.default_rng(0)
    root = tmp_path / "exports"
    exporter = DeltaExporter(root, shard.tables, model=model, every=1, full_every=3,
                             description=model_description(config, schema), model_hash="run-1")
    user = schema.table_index("user")
    _train(shard, schema, 0, ["u0", "u1", "u2", "u3"], rng)
    exporter.maybe_export(1)                                      # seq 1: full
    live = LiveModel(root)
    assert live.catch_up().sequence == 1 and live.version.kind == "full"
    _assert_serves(live, shard, model)
    never, u1 = _user_scores(live, ["never-seen", "u1"])
    assert abs(u1 - never) > 1e-4                                 # a trained row counts

    # step 1: u4 arrives, the lru budget of 4 evicts u1 (the oldest update after u0's, by key)
    _train(shard, schema, 1, ["u0", "u2", "u3", "u4"], rng)
    assert shard.tables[user].size == USER_LIMIT
    exporter.maybe_export(2)                                      # seq 2: delta with tombstone u1
    delta = load_export(list_exports(root)[-1].path)
    assert delta.kind == "delta" and delta.sequence == 2 and (delta.from_step, delta.to_step) == (1, 2)
    np.testing.assert_array_equal(delta.tombstones[user], np.sort(_user_keys(["u1"])))
    live.catch_up()
    assert (live.version.sequence, live.version.step) == (2, 2)
    _assert_serves(live, shard, model)
    never, u1 = _user_scores(live, ["never-seen", "u1"])
    assert u1 == never                                            # evicted: reads as unseen

    # step 2: u0, u3, u4 evicted, u3 re-inserted in the same interval: in tombstones and rows
    _train(shard, schema, 2, ["u2"], rng)
    shard.tables[user].evict_to_budget(1, "lru")
    _train(shard, schema, 2, ["u3"], rng)
    exporter.maybe_export(3)                                      # seq 3: delta
    delta = load_export(list_exports(root)[-1].path)
    np.testing.assert_array_equal(delta.tombstones[user], np.sort(_user_keys(["u0", "u3", "u4"])))
    assert set(delta.rows[user][0]) == set(_user_keys(["u2", "u3"]))
    live.catch_up()
    _assert_serves(live, shard, model)                            # u3 holds its new row
    never, u0, u3 = _user_scores(live, ["never-seen", "u0", "u3"])
    assert u0 == never and abs(u3 - never) > 1e-6

    # seq 4 full, 5 and 6 deltas; 5 held back: 6 is refused (gap), version 4 serves
    for completed in (4, 5, 6):
        _train(shard, schema, completed - 1, ["u5", "u6"], rng)
        exporter.maybe_export(completed)
    kinds = [(e.sequence, e.kind) for e in list_exports(root)]
    assert kinds == [(1, "full"), (2, "delta"), (3, "delta"), (4, "full"), (5, "delta"), (6, "delta")]
    fifth = list_exports(root)[4].path
    os.rename(fifth, tmp_path / "held-back")
    live.catch_up()
    assert live.version.sequence == 4
    assert "export 5 is missing" in live.follower.last_refusal.reason
    scores_v4 = _user_scores(live, ["u5", "u6", "u2"])
    live.catch_up()
    assert live.version.sequence == 4 and len(live.follower.refusals) == 1   # reported once
    np.testing.assert_array_equal(_user_scores(live, ["u5", "u6", "u2"]), scores_v4)
    os.rename(tmp_path / "held-back", fifth)                      # the gap is filled
    live.catch_up()
    assert (live.version.sequence, live.version.step) == (6, 6)
    _assert_serves(live, shard, model)

    # seq 7 full, seq 8 delta damaged: refused, version 7 serves; repaired: applied
    for completed in (7, 8):
        _train(shard, schema, completed - 1, ["u7"], rng)
        w = model.variables[0]
        w.assign(w + 0.25)                                        # the dense part moves too
        exporter.maybe_export(completed)
    eighth = list_exports(root)[-1].path
    damaged = os.path.join(eighth, f"table-{user:03d}.rank-00000.values.npy")
    original = open(damaged, "rb").read()
    with open(damaged, "r+b") as fh:
        fh.seek(len(original) - 3)
        fh.write(bytes([original[-3] ^ 0xFF]))
    live.catch_up()
    assert live.version.sequence == 7
    assert "checksum mismatch" in live.follower.last_refusal.reason
    with open(damaged, "wb") as fh:
        fh.write(original)
    os.utime(damaged, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    live.catch_up()
    assert live.version.sequence == 8
    _assert_serves(live, shard, model)

    # a delta from a step the server does not hold is refused; a newer full export is taken
    write_delta(root, 5, 9, tables=shard.tables, model=model, model_hash="run-1", sequence=9)
    live.catch_up()
    assert live.version.sequence == 8 and "out of order" in live.follower.last_refusal.reason
    resumed = DeltaExporter(root, shard.tables, model=model, every=1, start_step=8, full_every=3,
                            description=model_description(config, schema), model_hash="run-1")
    assert resumed.sequence == 10 and resumed.next_is_full()     # a resumed run starts full
    resumed.export(9, position={"offset": 9})
    live.catch_up()
    assert (live.version.sequence, live.version.kind, live.version.position) == (10, "full", {"offset": 9})
    _assert_serves(live, shard, model)

    # the directory is emptied and refilled with an older full export (7): version 10 stays,
    # and the status says why the export was not taken, once
    from hybridps.serving.server import status_of
    seventh = [e for e in list_exports(root) if e.sequence == 7][0]
    shutil.copytree(seventh.path, tmp_path / "old-copy" / seventh.name)
    shutil.rmtree(root)
    root.mkdir()
    shutil.copytree(tmp_path / "old-copy" / seventh.name, root / seventh.name)
    refused_before = len(live.follower.refusals)
    live.catch_up()
    live.catch_up()
    assert (live.version.sequence, live.version.step) == (10, 9)
    _assert_serves(live, shard, model)
    stale = live.follower.stale_refusals
    assert len(stale) == 1 and len(live.follower.refusals) == refused_before + 1
    assert stale[0].export == seventh.name and stale[0].reason.startswith(
        "stale: full export 7 (step 7) appeared, not newer than the served version 10 (step 9")
    status = status_of(live, "m")
    assert status["stale_exports"] == 1 and status["stale_export"]["export"] == seventh.name
    assert status["version"] == 10


# ---------------------------------------------------------------------------- end to end
def _env(**extra):
    return dict(os.environ, **MPI_ENV, PYTHONPATH=REPO, **extra)


class Server:
    """`hybridps serve` as a subprocess on a free port."""

    def __init__(self, model_dir, log_path, **env):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridps.cli", "serve", "--model-dir", str(model_dir),
             "--port", "0", "--name", "ctr", "--poll-seconds", "0.2"],
            cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("hybridps serve: loading model dir"), (line, self.stderr())
        self.url = re.search(r"http://\S+", line).group(0)   # http://127.0.0.1:PORT/v1/models/ctr
        self.base = self.url.rsplit("/v1/", 1)[0]

    def stderr(self):
        self.log.flush()
        return open(self.log_path).read()

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return response.read().decode()

    def post(self, body):
        request = urllib.request.Request(self.url + ":predict", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self):
        return json.loads(self.get("/v1/models/ctr"))

    def wait_for(self, predicate, what, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; server stderr:\n{self.stderr()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def _copy_export(source, target_root):
    """Publish an export into ``target_root`` as the trainer does: a temporary name, a rename."""
    tmp = os.path.join(target_root, ".tmp-delta-copy")
    shutil.copytree(source, tmp)
    os.rename(tmp, os.path.join(target_root, os.path.basename(source)))


class PredictRun:
    """`hybridps predict` started in the background (it runs beside the servers: each process
    pays its own TensorFlow import); :meth:`scores` waits for it and reads its scores."""

    def __init__(self, checkpoint, data, out):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridps.cli", "predict", "--checkpoint", str(checkpoint),
             "--data", str(data), "--out", str(out)], cwd=REPO, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def scores(self, timeout=300):
        try:
            _, stderr = self.proc.communicate(timeout=timeout)
        finally:
            self.stop()
        assert self.proc.returncode == 0, stderr[-3000:]
        import pyarrow.parquet as pq
        return pq.read_table(self.out).column("score").to_numpy()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _instances(columns, n):
    names = [d["name"] for d in FEATURES["dense"]] + [s["name"] for s in FEATURES["sparse"]]

    def plain(v):
        if isinstance(v, (list, np.ndarray)):
            return [plain(x) for x in v]
        return v.item() if isinstance(v, np.generic) else v
    return [{name: plain(columns[name][i]) for name in names} for i in range(n)]


@pytest.mark.mpi
def test_serve_follows_training_exports(tmp_path):
    import yaml
    data = write_parquet(tmp_path / "train.parquet", rows(256), 64)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"features": FEATURES, "model": "wide_deep", "hidden": [8]}))
    trained = tmp_path / "exports"
    run_mpi(2, ["-m", "hybridps.cli", "train", "--config", config, "--data", data, "--steps", 8,
                "--batch-size", 32, "--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 4,
                "--delta-export-dir", trained, "--delta-every", 2, "--full-export-every", 2,
                "--no-progress"], env={"PYTHONPATH": REPO})
    names = sorted(os.listdir(trained))
    assert names == ["delta-0000000002-0000000002-0000000004", "delta-0000000004-0000000006-0000000008",
                     "full-0000000001-0000000002", "full-0000000003-0000000006"]
    predict4 = PredictRun(tmp_path / "ckpt" / "ckpt-0000000004", data, tmp_path / "s4.parquet")
    predict8 = PredictRun(tmp_path / "ckpt" / "ckpt-0000000008", data, tmp_path / "s8.parquet")
    columns = rows(256)
    instances = _instances(columns, 256)

    served = tmp_path / "served"
    served.mkdir()
    try:
        _serve_kill_and_follow(tmp_path, served, instances, names, trained, predict4, predict8)
    finally:
        predict4.stop()
        predict8.stop()


def _serve_kill_and_follow(tmp_path, served, instances, names, trained, predict4, predict8):
    """test_serve_follows_training_exports once the exports are there and the two predict runs
    started: the server killed inside a delta apply, then one that follows the rest."""
    from prometheus_client.parser import text_string_to_metric_families
    full1, delta2, full3, delta4 = (os.path.join(trained, n) for n in (names[2], names[0], names[3], names[1]))
    slow = Server(served, tmp_path / "slow.log", HYBRIDPS_SERVE_APPLY_DELAY="60")
    try:
        # the port answers before any model is there (the export comes later): 503 LOADING
        code, body = slow.post({"instances": instances[:1]})
        assert code == 503 and body["error"].startswith("LOADING: "), body
        status = slow.status()
        assert status["model_version_status"][0]["state"] == "LOADING" and status["version"] is None
        assert status["model_version_status"][0]["status"]["error_message"].startswith("LOADING: ")
        _copy_export(full1, served)
        slow.wait_for(lambda: slow.status()["version"] == 1, "version 1")
        status = slow.status()
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        assert (status["version"], status["step"]) == (1, 2)
        # a bad request names the feature; the server answers the next one
        code, body = slow.post({"instances": [{"user": "u1", "item": 3.5}]})
        assert code == 400 and "'item'" in body["error"]
        code, body = slow.post({"instances": [{"usr": "u1"}]})
        assert code == 400 and "'usr'" in body["error"]
        code, body = slow.post({"inputs": {"x": [1.0, 2.0], "tags": [["a"]]}})
        assert code == 400 and "'tags'" in body["error"]
        code, body = slow.post({"instances": instances[:3]})
        assert code == 200 and len(body["predictions"]) == 3 and body["version"] == 1
        families = {f.name: f for f in text_string_to_metric_families(slow.get("/metrics"))}
        assert families["hybridps_serve_model_version"].samples[0].value == 1
        requests = {s.labels.get("code"): s.value for s in families["hybridps_serve_requests"].samples
                    if s.name == "hybridps_serve_requests_total"}
        assert requests == {"503": 1, "400": 3, "200": 1}
        assert "hybridps_serve_request_latency_seconds" in families
        # killed inside the apply of delta 2
        _copy_export(delta2, served)
        slow.wait_for(lambda: "pausing 60.0s inside the apply" in slow.stderr(), "the delta apply")
        slow.proc.send_signal(signal.SIGKILL)
        slow.proc.wait(timeout=30)
    finally:
        slow.stop()

    server = Server(served, tmp_path / "server.log")
    try:
        scores4, scores8 = predict4.scores(), predict8.scores()
        server.wait_for(lambda: server.status()["version"] is not None, "the model")
        assert (server.status()["version"], server.status()["step"]) == (2, 4)   # full 1 + delta 2, whole
        code, body = server.post({"instances": instances})
        assert code == 200 and (body["version"], body["step"]) == (2, 4)
        np.testing.assert_allclose(body["predictions"], scores4, rtol=1e-5, atol=1e-6)
        # the training goes on: full 3, delta 4 land and are followed
        copied = time.time()
        _copy_export(full3, served)
        _copy_export(delta4, served)
        server.wait_for(lambda: server.status()["version"] == 4, "version 4")
        status = server.status()
        assert status["step"] == 8 and status["position"]["kind"] == "parquet"
        assert copied <= status["applied_at"] <= time.time()        # applied after they landed
        code, rows_form = server.post({"instances": instances})
        assert code == 200 and rows_form["step"] == 8
        np.testing.assert_allclose(rows_form["predictions"], scores8, rtol=1e-5, atol=1e-6)
        column_body = {"inputs": {name: [row[name] for row in instances] for name in instances[0]}}
        code, column_form = server.post(column_body)
        assert code == 200
        np.testing.assert_allclose(column_form["predictions"], rows_form["predictions"], rtol=1e-6)
        # a delta after a gap is refused and counted; version 4 keeps serving
        shutil.copytree(delta4, served / "delta-0000000006-0000000008-0000000010")
        server.wait_for(lambda: server.status()["last_refusal"] is not None, "the refusal")
        status = server.status()
        assert status["version"] == 4 and "export 5 is missing" in status["last_refusal"]["reason"]
        assert "refused delta-0000000006" in server.stderr()
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
        refused = [s.value for s in families["hybridps_serve_refused_deltas"].samples
                   if s.name == "hybridps_serve_refused_deltas_total"]
        assert refused == [1]
        code, again = server.post({"instances": instances[:5]})
        assert code == 200 and again["version"] == 4
        np.testing.assert_allclose(again["predictions"], scores8[:5], rtol=1e-5, atol=1e-6)
        # an older full export copied in: reported as stale (status, metrics, one log line)
        shutil.copytree(full1, served / "full-0000000002-0000000002")
        server.wait_for(lambda: server.status()["stale_export"] is not None, "the stale export")
        status = server.status()
        assert status["version"] == 4 and status["stale_exports"] == 1
        assert status["stale_export"]["reason"].startswith(
            "stale: full export 2 (step 2) appeared, not newer than the served version 4 (step 8")
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
        assert [s.value for s in families["hybridps_serve_stale_exports"].samples
                if s.name == "hybridps_serve_stale_exports_total"] == [1]
        assert server.stderr().count("refused full-0000000002-0000000002: stale") == 1
    finally:
        server.stop()


# ---------------------------------------------------------------------------- requests, no TF
class _StandIn:
    """What the app uses of a LiveModel: a schema, a version, a follower, predict (0.5 each)."""

    def __init__(self, root):
        from hybridps.config import make_config
        from hybridps.schema import build_schema
        from hybridps.serving.follower import ExportFollower, ServedVersion
        self.root = str(root)
        self.schema = build_schema(make_config(overrides={"features": FEATURES, "model": "wide_deep"}))
        self.version = ServedVersion(1, 2, None, time.time(), "full", "full-0000000001-0000000002", "h")
        self.follower = ExportFollower(root)

    def predict(self, schema, inputs, rows, deliver):
        deliver(np.full(rows, 0.5, np.float32), self.version, None)


def _with_client(live, scenario, limits=None, startup=None):
    """Run ``scenario(client)`` against the serve app of ``live`` (aiohttp's test client)."""
    from aiohttp.test_utils import TestClient, TestServer
    from hybridps.serving.inputs import RequestLimits
    from hybridps.serving.server import ServeMetrics, make_app

    async def main():
        app = make_app(live, "ctr", ServeMetrics(live), limits or RequestLimits(), startup)
        async with TestClient(TestServer(app)) as client:
            await asyncio.wait_for(scenario(client), 120)
    asyncio.run(main())


async def _post(client, body):
    response = await client.post("/v1/models/ctr:predict", data=body if isinstance(body, bytes)
                                 else json.dumps(body).encode())
    return response.status, await response.json()


def test_abusive_requests_are_refused_naming_the_limit(tmp_path):
    from hybridps.serving.inputs import RequestLimits
    limits = RequestLimits(max_rows=5, max_ids_per_list=3, max_body_bytes=1 << 20)
    deep_dicts = ('{"a":' * 50_000 + "1" + "}" * 50_000).encode()

    async def scenario(client):
        cases = [
            (b"[" * 100_000, 400, "its brackets do not match"),
            (deep_dicts, 400, "nests arrays/objects more than 4 levels deep"),
            ({"instances": [{"tags": [[["a"]]]}]}, 400, "more than 4 levels deep"),
            ({"inputs": {"x": [[1.0]]}}, 400, "feature 'x' (dense), row 0: [1.0] is not a finite number"),
            ({"instances": [{"x": 1.0}] * 6}, 400,
             "instances: 6 rows; this server takes at most 5 rows per request (--max-rows-per-request)"),
            ({"inputs": {"x": [1.0] * 6}}, 400, "at most 5 rows per request (--max-rows-per-request)"),
            ({"instances": [{"tags": ["a"]}, {"tags": ["a", "b", "c", "d"]}]}, 400,
             "feature 'tags', row 1: a list of 4 values; this server takes at most 3 per list "
             "(--max-ids-per-list)"),
            ({"inputs": {"seen": [[1], [1, 2, 3, 4, 5]]}}, 400, "feature 'seen', row 1: a list of 5 values"),
            (b"{" + b" " * (1 << 20) + b"}", 413, "larger than 1048576 bytes (--max-body-bytes)"),
        ]
        for body, want_code, want_text in cases:
            code, answer = await _post(client, body)
            assert code == want_code and want_text in answer["error"], (str(body)[:80], code, answer)
        # at the limits: answered
        code, answer = await _post(client, {"instances": [{"tags": ["a", "b", "c"], "seen": [1, 2, 3]}] * 5})
        assert code == 200 and answer["predictions"] == [0.5] * 5
        assert (await client.get("/v1/models/ctr")).status == 200
    _with_client(_StandIn(tmp_path), scenario, limits)


def test_a_request_is_parsed_off_the_event_loop(tmp_path, monkeypatch):
    from hybridps.serving import server
    entered, release = threading.Event(), threading.Event()
    real = server.request_inputs

    def held_parse(raw, schema, limits):
        entered.set()
        release.wait(60)
        return real(raw, schema, limits)
    monkeypatch.setattr(server, "request_inputs", held_parse)

    async def scenario(client):
        pending = asyncio.ensure_future(_post(client, {"instances": [{"x": 1.0}]}))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 60)
        # the predict request is being parsed: the event loop still answers others
        status = await asyncio.wait_for(client.get("/v1/models/ctr"), 30)
        assert status.status == 200 and not pending.done()
        release.set()
        assert await pending == (200, {"predictions": [0.5], "version": 1, "step": 2})
    try:
        _with_client(_StandIn(tmp_path), scenario)
    finally:
        release.set()


def test_predict_is_503_loading_until_the_start_up_is_done(tmp_path):
    startup = types.SimpleNamespace(loading="importing TensorFlow")

    async def scenario(client):
        code, answer = await _post(client, {"instances": [{"x": 1.0}]})
        assert code == 503 and answer["error"].startswith("LOADING: importing TensorFlow"), answer
        status = await (await client.get("/v1/models/ctr")).json()
        assert status["model_version_status"][0]["state"] == "LOADING" and status["version"] is None
        assert status["model_version_status"][0]["status"]["error_message"] == "LOADING: importing TensorFlow"
        startup.loading = None
        assert await _post(client, {"instances": [{"x": 1.0}]}) == (200, {"predictions": [0.5],
                                                                         "version": 1, "step": 2})
    _with_client(_StandIn(tmp_path), scenario, startup=startup)


# ---------------------------------------------------------------------------- several tasks
def test_serve_answers_every_task_in_row_and_column_form(tmp_path, tf):
    """A model of two tasks behind the HTTP app (a real LiveModel worker): rows answer one
    object per instance with a field per task, columns a list per task, each the sigmoid of
    the model fed by hand; a request of no rows answers empty lists."""
    from hybridps.config import make_config
    from hybridps.export.saved_model import _make_serving_module_class
    from hybridps.schema import build_schema
    from hybridps.serving.follower import ServedVersion
    from hybridps.serving.live import LiveModel
    from hybridps.step import sample_inputs
    from tests.export_reference import (LABELLED_TWO_TASK_SCHEMA, build_two_task_model, inputs_by_hand,
                                        raw_rows, sigmoid, table_rows)
    schema = build_schema(make_config(overrides={"features": LABELLED_TWO_TASK_SCHEMA}))
    columns = raw_rows(12, seed=4)
    rows = table_rows(schema, columns)
    tf.keras.utils.set_random_seed(1)
    model = build_two_task_model(schema)
    model(sample_inputs(tf, schema), training=False)
    outputs = model({k: tf.constant(v) for k, v in inputs_by_hand(schema, columns, rows).items()},
                    training=False)
    want = {task: sigmoid(np.asarray(value).reshape(-1)) for task, value in outputs.items()}
    live = LiveModel(tmp_path / "exports")
    live.module = _make_serving_module_class(tf)(model, schema, rows, 3, "h")
    live.schema = schema
    live.version = ServedVersion(1, 3, None, time.time(), "full", "full-0000000001-0000000003", "h")
    names = list(columns)
    instances = [{name: columns[name][i] for name in names} for i in range(12)]

    async def scenario(client):
        code, answer = await _post(client, {"instances": instances})
        assert code == 200 and (answer["version"], answer["step"]) == (1, 3), answer
        assert [sorted(p) for p in answer["predictions"]] == [["click", "conversion"]] * 12
        for task in want:
            np.testing.assert_allclose([p[task] for p in answer["predictions"]], want[task], rtol=1e-5)
        code, answer = await _post(client, {"inputs": columns})
        assert code == 200 and set(answer) == {"outputs", "version", "step"}, answer
        assert sorted(answer["outputs"]) == ["click", "conversion"]
        for task in want:
            np.testing.assert_allclose(answer["outputs"][task], want[task], rtol=1e-5)
        assert await _post(client, {"inputs": {"x": []}}) == (200, {"outputs": {"click": [], "conversion": []},
                                                                   "version": 1, "step": 3})
        assert await _post(client, {"instances": []}) == (200, {"predictions": [], "version": 1, "step": 3})
    live.start()
    try:
        _with_client(live, scenario)
    finally:
        live.stop()
