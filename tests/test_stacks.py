"""The two supported TensorFlow stacks: their pins and setup, and the Keras 2 / Keras 3 bridge.

* requirements.txt (TF 2.18, Keras 3, numpy 2) and requirements-tf2.15.txt (TF 2.15, Keras 2,
  numpy 1.26) differ only in TensorFlow, Keras, numpy and TensorFlow's ml-dtypes; `make setup
  TF=2.15` sets up its own environment and its own Horovod wheel, built without pip's cache.
* hybridps.dense.optimizer_state writes one checkpoint layout for the dense optimizer from a
  Keras 2 optimizer (iteration, slots) and a Keras 3 one (iteration, learning rate, slots; SGD
  without slots), checked here on stand-in optimizers that hold numpy arrays, so both Keras
  versions are covered on either stack.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from hybridps.dense.optimizer_state import assign_optimizer_state, optimizer_state, state_names
from hybridps.tf_compat import model_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK_PACKAGES = {"tensorflow-cpu", "numpy", "keras", "ml-dtypes"}


def _pins(name):
    pins = {}
    with open(os.path.join(REPO, name)) as fh:
        for line in fh:
            line = line.split("#")[0].strip()
            if line:
                package, version = line.split("==")
                pins[package.lower()] = version
    return pins


def test_the_two_stacks_differ_only_in_tensorflow_keras_numpy_and_ml_dtypes():
    default, compat = _pins("requirements.txt"), _pins("requirements-tf2.15.txt")
    assert default["tensorflow-cpu"] == "2.18.1" and default["numpy"].startswith("2.")
    assert default["keras"].startswith("3.")
    assert compat["tensorflow-cpu"] == "2.15.1" and compat["numpy"].startswith("1.26")
    assert "keras" not in compat                       # TF 2.15 brings its own Keras 2.15
    # ml-dtypes pinned on both: TF 2.15.1 needs 0.3.x; TF 2.18 takes 0.4 to 1.0, and an unpinned
    # install (0.7) costs every process that imports TF over a second of CPU
    assert compat["ml-dtypes"].startswith("0.3.") and default["ml-dtypes"].startswith("0.4.")
    assert {p: v for p, v in default.items() if p not in STACK_PACKAGES} == \
        {p: v for p, v in compat.items() if p not in STACK_PACKAGES}
    # tensorflow-cpu 2.18 needs numpy >= 1.26, < 2.1; 2.15 needs numpy < 2
    assert (2, 0) <= tuple(int(x) for x in default["numpy"].split(".")[:2]) < (2, 1)
    assert int(default["pyarrow"].split(".")[0]) < 20    # pyarrow 20 refuses numpy 1.26


def _dry_run(*args):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # a clean make: under `make test-compat` the variables of the calling make (TF=2.15 in
    # MAKEFLAGS, VENV) would otherwise choose the stack of the dry run
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "TF", "VENV")}
    proc = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    return proc


@pytest.mark.parametrize("args, venv, requirements, tf_pin", [
    ((), ".venv", "requirements.txt", "tensorflow-cpu-2.18.1"),
    (("TF=2.15",), ".venv-tf2.15", "requirements-tf2.15.txt", "tensorflow-cpu-2.15.1"),
])
def test_make_setup_builds_each_stack_in_its_own_environment(args, venv, requirements, tf_pin):
    proc = _dry_run(*args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"-m venv {venv}\n" in out
    assert f"grep -v -E '^horovod==' {requirements} > {venv}/requirements-base.txt" in out
    wheel_builds = [line for line in out.splitlines() if "pip wheel" in line]
    assert wheel_builds and all("--no-cache-dir" in line for line in wheel_builds)
    assert re.search(rf"wheels/horovod-0\.28\.1_{re.escape(tf_pin)}\b", out)
    # an environment moved to another TF pin holds the same Horovod version, built for the old TF
    installs = [line for line in out.splitlines() if "pip install" in line and "horovod-" in line]
    assert installs and all("--force-reinstall" in line for line in installs)
    assert f"{venv}/bin/python -m pip install -q --no-build-isolation --no-deps -e ." in out


def test_make_rejects_an_unknown_stack():
    proc = _dry_run("TF=2.99")
    assert proc.returncode != 0
    assert "TF=2.99: no requirements-tf2.99.txt" in proc.stderr and "TF=2.15" in proc.stderr


# ----------------------------------------------------------------- the optimizer layout bridge
class _Variable:
    """A stand-in Keras variable: a numpy value with numpy() and assign()."""

    def __init__(self, value):
        self.value = np.array(value)

    @property
    def shape(self):
        return self.value.shape

    def numpy(self):
        return self.value.copy()

    def assign(self, value):
        assert np.shape(value) == self.value.shape
        self.value = np.array(value, dtype=self.value.dtype)


class _Keras2Like:
    """Keras 2's variable list: the update counter, then the slots per model variable."""
    slot_names = ()

    def __init__(self, learning_rate=0.01):
        self.learning_rate = _Variable(np.float32(learning_rate))   # not in .variables
        self.variables = [_Variable(np.int64(0))]
        self.built = False

    def build(self, model_variables):
        if self.built:
            return
        self.built = True
        for v in model_variables:
            for slot in self.slot_names:
                self.variables.append(_Variable(np.zeros(v.shape, np.float32)))


class _Keras3Like(_Keras2Like):
    """Keras 3's variable list: the update counter, the learning-rate variable, then slots."""

    def __init__(self, learning_rate=0.01):
        super().__init__(learning_rate)
        self.variables.insert(1, self.learning_rate)


def _optimizer(base, kind, slots):
    return type({"adam": "Adam", "sgd": "SGD", "adagrad": "Adagrad"}[kind], (base,),
                {"slot_names": slots})()


MODEL = [_Variable(np.zeros((3, 2), np.float32)), _Variable(np.zeros((2,), np.float32))]


@pytest.mark.parametrize("base", [_Keras2Like, _Keras3Like])
def test_adam_state_round_trips_in_one_layout_on_both_keras_versions(base):
    saved = _optimizer(base, "adam", ("m", "v"))
    saved.build(MODEL)
    held = [v for v in saved.variables if v is not saved.learning_rate]
    for i, variable in enumerate(held):
        variable.assign(np.full(variable.shape, i, variable.value.dtype))
    arrays = optimizer_state(saved, MODEL)
    # iteration, then m and v of variable 0, then m and v of variable 1: values 0, 1, 2, 3, 4
    assert [a.shape for a in arrays] == [(), (3, 2), (3, 2), (2,), (2,)]
    assert [float(a.flat[0]) for a in arrays] == [0, 1, 2, 3, 4] and arrays[0].dtype == np.int64
    assert state_names("adam", 2) == ["iteration", "m_0000", "v_0000", "m_0001", "v_0001"]
    for other_base in (_Keras2Like, _Keras3Like):                 # restores under either
        restored = _optimizer(other_base, "adam", ("m", "v"))
        assign_optimizer_state(restored, MODEL, arrays)
        assert float(restored.learning_rate.numpy()) == np.float32(0.01)   # untouched
        for a, b in zip(optimizer_state(restored, MODEL), arrays):
            np.testing.assert_array_equal(a, b)


def test_sgd_without_slots_keeps_the_keras2_layout_of_zero_slots():
    keras3_sgd = _optimizer(_Keras3Like, "sgd", ())               # Keras 3 SGD: no momentum slot
    keras3_sgd.build(MODEL)
    keras3_sgd.variables[0].assign(np.int64(7))
    arrays = optimizer_state(keras3_sgd, MODEL)
    assert [a.shape for a in arrays] == [(), (3, 2), (2,)] and int(arrays[0]) == 7
    assert all(not a.any() for a in arrays[1:])
    keras2_sgd = _optimizer(_Keras2Like, "sgd", ("m",))           # Keras 2 SGD: an "m" per variable
    assign_optimizer_state(keras2_sgd, MODEL, arrays)
    assert int(keras2_sgd.variables[0].numpy()) == 7 and len(keras2_sgd.variables) == 3
    back = _optimizer(_Keras3Like, "sgd", ())
    assign_optimizer_state(back, MODEL, optimizer_state(keras2_sgd, MODEL))
    assert int(back.variables[0].numpy()) == 7


def test_optimizer_state_of_another_layout_is_refused_with_the_entry():
    restored = _optimizer(_Keras3Like, "adam", ("m", "v"))
    with pytest.raises(ValueError, match=r"\(adam\) has 5 state entries for 2 model variables, "
                                         r"the checkpoint 3"):
        assign_optimizer_state(restored, MODEL, [np.int64(1), np.zeros((3, 2)), np.zeros(2)])
    wrong = [np.int64(1), np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(3), np.zeros(2)]
    with pytest.raises(ValueError, match=r"m_0001: shape \(2,\) expected, the checkpoint holds \(3,\)"):
        assign_optimizer_state(_optimizer(_Keras3Like, "adam", ("m", "v")), MODEL, wrong)


def test_model_weights_are_trainable_then_non_trainable():
    class Model:
        trainable_weights = ["k0", "b0", "k1"]
        non_trainable_weights = ["mean", "var"]
        variables = ["k0", "b0", "seed_state", "mean", "k1", "var"]   # Keras 3 also lists seeds
    assert model_weights(Model()) == ["k0", "b0", "k1", "mean", "var"]


def test_tf_variables_are_what_tensorflow_differentiates_and_assigns():
    tf = pytest.importorskip("tensorflow")
    from hybridps.tf_compat import tf_variables
    layer = tf.keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros")
    x = tf.constant([[1.0, 2.0, 3.0]])
    layer(x)
    sources = tf_variables(layer.trainable_variables)
    assert all(isinstance(v, tf.Variable) for v in sources)     # what Horovod's tape needs
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    # by hand: y = x @ ones(3, 2) = [6, 6]; d/dW = 2 y x^T, d/db = 2 y
    np.testing.assert_allclose(tape.gradient(loss, sources)[0].numpy(), [[12, 12], [24, 24], [36, 36]])
    np.testing.assert_allclose(tape.gradient(loss, sources)[1].numpy(), [12, 12])
    sources[1].assign([5.0, 7.0])                               # the Keras variable is that variable
    np.testing.assert_allclose(layer.trainable_variables[1].numpy(), [5.0, 7.0])


KERAS_START = """
import json, sys
from hybridps.tf_runtime import KERAS_OPTIONAL_IMPORTS, skip_keras_optional_imports
if sys.argv[1] == "skip":
    skip_keras_optional_imports()
    skip_keras_optional_imports()                # a second call adds no second finder
import tensorflow as tf
layer = tf.keras.layers.Dense(2, kernel_initializer="ones")
out = layer(tf.constant([[1.0, 2.0]])).numpy().tolist()
loaded = sorted(name for name in KERAS_OPTIONAL_IMPORTS if name in sys.modules)
import pandas, sklearn.metrics, matplotlib       # any other importer still gets them
finders = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_SkipKerasOptionalImports"]
from importlib.metadata import version
print(json.dumps({"keras": version("keras"),
                  "out": out, "loaded": loaded, "finders": len(finders),
                  "auc": sklearn.metrics.roc_auc_score([0, 1, 1], [0.1, 0.7, 0.4]),
                  "frame": pandas.DataFrame({"a": [1, 2]})["a"].sum().item()}))
"""


@pytest.mark.parametrize("start", ["skip", "plain"])
def test_hybridps_programs_start_keras_without_its_optional_imports(start):
    pytest.importorskip("tensorflow")
    import json
    import sys
    proc = subprocess.run([sys.executable, "-c", KERAS_START, start], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == [[3.0, 3.0]]                      # Keras works: 1 + 2 into ones
    assert result["auc"] == 1.0 and result["frame"] == 3      # and the three import later
    if start == "skip":
        assert result["loaded"] == [] and result["finders"] == 1
    elif result["keras"].startswith("2."):
        assert set(result["loaded"]) <= {"pandas"}, result        # Keras 2: pandas at most
    else:
        # why the skip exists: Keras 3 loads all three at its own import when installed
        assert result["loaded"] == ["matplotlib", "pandas", "sklearn"], result
