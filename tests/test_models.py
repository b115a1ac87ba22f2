"""Unit tests of hybridps.models: shapes, gradients, the FM and cross formulas against numpy,
deterministic seeding (in one process and across processes), get_config, a training sanity run.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hybridps.errors import ConfigError  # noqa: E402
from hybridps.models import (CrossNetwork, cross_step, fm_second_order, logloss_sum,  # noqa: E402
                             mean_logloss)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the built-in models that take the Criteo layout (DIN needs a sequence: tests/test_schema_models.py)
NAMES = ["dcn", "deepfm", "wide_deep"]
FIELDS, DENSE, DIM, HIDDEN = 3, 2, 4, (8, 4)


def build_model(name, num_fields, num_dense, dim, hidden=(256, 128), cross_layers=3, seed=0):
    """A built-in model on the Criteo preset of ``num_fields`` fields at ``dim``, built on a
    zero batch (as hybridps.trainer builds models)."""
    import dataclasses
    from hybridps.config import make_config
    from hybridps.models.registry import BUILTIN_MODELS
    from hybridps.schema import criteo_preset
    from hybridps.step import build_on_sample
    if name not in BUILTIN_MODELS:
        from hybridps.models import load_build_function
        load_build_function(name)                     # raises the ConfigError naming the choices
    config = dataclasses.replace(make_config(), dim=dim)
    schema = criteo_preset(config, num_fields, num_dense)
    from hybridps.models import DCN, DeepFM, WideDeep
    kwargs = {"cross_layers": cross_layers} if name == "dcn" else {}
    model = {"dcn": DCN, "deepfm": DeepFM, "wide_deep": WideDeep}[name](schema, hidden=hidden, seed=seed, **kwargs)
    return build_on_sample(tf, model, schema)


def as_inputs(dense, emb):
    """The model input dict of the Criteo preset from dense (B, D) and emb (B, F, dim)."""
    fields = tf.unstack(tf.convert_to_tensor(emb), axis=1)
    return {"dense": dense, **{f"C{i + 1}": field for i, field in enumerate(fields)}}


def small_model(name, seed=0, **kwargs):
    return build_model(name, FIELDS, DENSE, DIM, hidden=HIDDEN, cross_layers=2, seed=seed,
                       **kwargs)


def random_inputs(batch, rng, num_dense=DENSE):
    dense = rng.normal(size=(batch, num_dense)).astype(np.float32)
    emb = rng.normal(size=(batch, FIELDS, DIM)).astype(np.float32)
    return tf.constant(dense), tf.constant(emb)


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


# ---- shapes, gradients, argument checks ---------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_logits_shape_and_gradients(name):
    model = small_model(name)
    dense, emb = random_inputs(6, np.random.default_rng(1))
    labels = tf.constant([0, 1, 1, 0, 1, 0], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        logits = model(as_inputs(dense, emb), training=True)
        loss = mean_logloss(labels, logits)
    assert logits.shape == (6,) and logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))
    variables = model.trainable_variables
    assert variables, "build_model must create the weights"
    grads = tape.gradient(loss, [emb] + variables)
    for source, grad in zip(["emb"] + [v.name for v in variables], grads):
        assert grad is not None, f"no gradient for {source}"
        assert np.all(np.isfinite(tf.convert_to_tensor(grad).numpy())), source
    emb_grad = grads[0].numpy()
    assert emb_grad.shape == (6, FIELDS, DIM) and np.any(emb_grad != 0)


@pytest.mark.parametrize("name", NAMES)
def test_no_dense_features(name):
    model = build_model(name, FIELDS, 0, DIM, hidden=HIDDEN)
    dense, emb = random_inputs(4, np.random.default_rng(2), num_dense=0)
    logits = model(as_inputs(dense, emb))
    assert logits.shape == (4,) and np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("name", NAMES)
def test_empty_hidden_means_no_hidden_layers(name):
    model = build_model(name, FIELDS, DENSE, DIM, hidden=())
    dense, emb = random_inputs(4, np.random.default_rng(8))
    assert model(as_inputs(dense, emb)).shape == (4,)
    assert not any("mlp" in v.name for v in model.trainable_variables)


@pytest.mark.parametrize("name", NAMES)
def test_fixed_signature_function_does_not_retrace(name):
    model = small_model(name)
    traces = []

    @tf.function(input_signature=[tf.TensorSpec((None, DENSE), tf.float32),
                                  tf.TensorSpec((None, FIELDS, DIM), tf.float32)])
    def forward(dense, emb):
        traces.append(1)
        return model(as_inputs(dense, emb), training=False)

    rng = np.random.default_rng(9)
    for batch in (3, 5):
        dense, emb = random_inputs(batch, rng)
        np.testing.assert_allclose(forward(dense, emb).numpy(), model(as_inputs(dense, emb)).numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_shape_names_the_argument(name):
    model = small_model(name)
    dense, _ = random_inputs(2, np.random.default_rng(3))
    with pytest.raises(ConfigError, match=r"expects inputs\['C1'\] of shape \(batch, 4\)"):
        model(as_inputs(dense, tf.zeros((2, FIELDS, DIM + 1))))


def test_unknown_model_name_lists_allowed():
    with pytest.raises(ConfigError, match=r"deepfm, wide_deep, dcn, din"):
        build_model("xdeepfm", FIELDS, DENSE, DIM)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_fields": 0}, "num_fields"), ({"num_dense": -1}, "num_dense"),
    ({"dim": 0}, "dim"), ({"dim": 2.0}, "dim"), ({"hidden": (8, 0)}, "hidden"),
    ({"hidden": "256"}, "hidden"), ({"seed": -1}, "seed"), ({"cross_layers": -1}, "cross_layers"),
])
def test_bad_arguments_raise_config_error(kwargs, field):
    args = {"num_fields": FIELDS, "num_dense": DENSE, "dim": DIM, **kwargs}
    with pytest.raises(ConfigError, match=field):
        build_model("dcn", args.pop("num_fields"), args.pop("num_dense"), args.pop("dim"), **args)


# ---- formulas against independent numpy ----------------------------------------------------

def numpy_pairwise_interactions(emb):
    batch, fields, _ = emb.shape
    out = np.zeros(batch, np.float64)
    for b in range(batch):
        for i in range(fields):
            for j in range(i + 1, fields):
                out[b] += np.dot(emb[b, i].astype(np.float64), emb[b, j].astype(np.float64))
    return out


def test_fm_second_order_equals_pairwise_sum():
    emb = np.random.default_rng(4).normal(size=(3, 5, 6)).astype(np.float32)
    got = fm_second_order(tf.constant(emb)).numpy()
    np.testing.assert_allclose(got, numpy_pairwise_interactions(emb), rtol=1e-5, atol=1e-5)


def test_deepfm_logit_is_fm_term_when_other_parts_are_zero():
    model = build_model("deepfm", FIELDS, DENSE, DIM, hidden=HIDDEN)
    for layer in (model.dense_linear, model.field_projection, model.deep_head):
        for variable in layer.trainable_variables:
            variable.assign(tf.zeros_like(variable))
    dense, emb = random_inputs(4, np.random.default_rng(5))
    np.testing.assert_allclose(model(as_inputs(dense, emb)).numpy(),
                               numpy_pairwise_interactions(emb.numpy()), rtol=1e-5, atol=1e-5)


def numpy_cross_network(x0, kernels, biases):
    xl = x0.astype(np.float64)
    for w, b in zip(kernels, biases):
        xl = np.stack([x0[n] * np.dot(xl[n], w) + b + xl[n] for n in range(len(x0))])
    return xl


def test_cross_step_and_network_match_numpy():
    rng = np.random.default_rng(6)
    x0 = rng.normal(size=(4, 7)).astype(np.float32)
    network = CrossNetwork(num_layers=2, seed=3)
    network(tf.constant(x0))
    for bias in network.biases:                      # initial biases are zero: test b_l too
        bias.assign(rng.normal(size=bias.shape).astype(np.float32))
    kernels = [k.numpy() for k in network.kernels]
    biases = [b.numpy() for b in network.biases]
    np.testing.assert_allclose(
        cross_step(x0, x0, kernels[0], biases[0]).numpy(),
        numpy_cross_network(x0, kernels[:1], biases[:1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(network(tf.constant(x0)).numpy(),
                               numpy_cross_network(x0, kernels, biases), rtol=1e-5, atol=1e-5)


def test_losses_match_numpy():
    labels = np.array([0, 1, 1, 0], np.float32)
    logits = np.array([-2.0, 0.5, 3.0, 0.1], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    np.testing.assert_allclose(mean_logloss(labels, logits).numpy(), expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(logloss_sum(labels, logits).numpy(), expected.sum(), rtol=1e-6)
    with pytest.raises(ValueError):
        mean_logloss(labels[:3], logits)


# ---- determinism and config -----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name):
    first, second, other = small_model(name, seed=5), small_model(name, seed=5), small_model(
        name, seed=6)
    for a, b in zip(weights(first), weights(second)):
        np.testing.assert_array_equal(a, b)
    for a, c in zip(weights(first), weights(other)):
        if np.any(a != 0):                            # kernels; biases start at zero
            assert not np.array_equal(a, c)


SUBPROCESS_BUILD = textwrap.dedent("""
    import sys
    import numpy as np
    from tests.test_models import NAMES, build_model
    for name in NAMES:
        model = build_model(name, 3, 2, 4, hidden=(8, 4), cross_layers=2, seed=11)
        np.savez(sys.argv[1] + "/" + name + ".npz", *[v.numpy() for v in model.trainable_variables])
""")


@pytest.mark.slow
def test_weights_identical_in_another_process(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", SUBPROCESS_BUILD, str(tmp_path)], env=env,
                   check=True, timeout=120)
    for name in NAMES:
        theirs = np.load(tmp_path / f"{name}.npz")
        ours = weights(small_model(name, seed=11))
        assert len(theirs.files) == len(ours)
        for i, array in enumerate(ours):
            np.testing.assert_array_equal(theirs[f"arr_{i}"], array)


@pytest.mark.parametrize("name", NAMES)
def test_get_config_round_trip(name):
    model = small_model(name, seed=3)
    config = model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    clone(as_inputs(tf.zeros((1, DENSE)), tf.zeros((1, FIELDS, DIM))))
    assert [v.shape for v in clone.trainable_variables] == [
        v.shape for v in model.trainable_variables]
    for a, b in zip(weights(model), weights(clone)):
        np.testing.assert_array_equal(a, b)
    assert config["hidden"] == list(HIDDEN)
    if name == "dcn":
        assert config["cross_layers"] == 2


# ---- training sanity --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_sgd_reduces_loss_on_separable_toy_problem(name):
    """Trains model weights and an embedding table together, the way the trainer does."""
    rng = np.random.default_rng(7)
    samples, vocab, lr = 512, 10, 0.5
    ids = rng.integers(0, vocab, size=(samples, FIELDS)) + vocab * np.arange(FIELDS)
    dense = rng.normal(size=(samples, DENSE)).astype(np.float32)
    true_logit = rng.normal(size=FIELDS * vocab)[ids].sum(axis=1) + dense @ rng.normal(size=DENSE)
    labels = tf.constant((true_logit > 0).astype(np.float32))
    table = tf.Variable(rng.normal(scale=0.1, size=(FIELDS * vocab, DIM)).astype(np.float32))
    ids, dense = tf.constant(ids), tf.constant(dense)
    model = small_model(name, seed=1)

    @tf.function
    def sgd_step():
        emb = tf.gather(table, ids)
        with tf.GradientTape() as tape:
            tape.watch(emb)
            loss = mean_logloss(labels, model(as_inputs(dense, emb), training=True))
        emb_grad, *grads = tape.gradient(loss, [emb] + model.trainable_variables)
        table.scatter_nd_sub(tf.reshape(ids, (-1, 1)), lr * tf.reshape(emb_grad, (-1, DIM)))
        for variable, grad in zip(model.trainable_variables, grads):
            variable.assign_sub(lr * grad)
        return loss

    losses = [float(sgd_step()) for _ in range(300)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
