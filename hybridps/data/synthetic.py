"""Synthetic Criteo-like CTR data with a planted model, so that AUC means something.

Samples
-------
``SyntheticCTR.batch(step, batch_size)`` is a pure function of ``(seed, rank, step,
batch_size)``: its generator is ``np.random.Generator(PCG64(SeedSequence([seed, rank, step])))``.
Each rank therefore sees its own samples, and any step can be regenerated (no state to save
beyond the next step number).

* Categorical IDs: for each field independently, a bounded Zipf law over ``[0, vocab_size)``,
  ``P(id = k) ∝ (k + 1) ** -zipf_a`` (id 0 is the most frequent), sampled exactly with
  Walker's alias method (O(1) per draw; the table is built once per (vocab, a)). IDs become keys
  with :func:`hybridps.data.hashing.integer_feature_keys` ``(field, id)``.
* Dense features: i.i.d. N(0, 1), float32.
* Labels: ``Bernoulli(p)`` with ``p = flip + (1 - 2 flip) * sigmoid(logit)`` and ::

      logit = bias + sum_f w(key_f) + dense . w_dense + sum_{f < g} <v(key_f), v(key_g)>

The planted model
-----------------
Every planted parameter is a pure function of ``seed`` and the feature key (hence of (seed,
field, id)), so :meth:`true_probabilities` needs nothing but a batch:

* ``w(key)``: ``h = splitmix64(key ^ salt_w(seed))``; the sum of the four 16-bit chunks of ``h``
  (Irwin-Hall, standardised to mean 0 / variance 1, normal-ish and bounded by ±3.46) times
  ``field_scale / sqrt(num_fields)``; the field sum has standard deviation ``field_scale`` for
  independent keys.
* ``v(key)`` (``planted_dim`` components): the 16-bit chunks (low bits first) of
  ``splitmix64(key ^ salt_v_j(seed))``, one hash per 4 components,
  mapped to uniform [-1, 1) times ``c``, with ``c`` chosen so that the pairwise (FM) term has
  standard deviation ``interaction_scale`` for independent keys. This is what FM-style models
  (DeepFM, DCN's cross layers) can find beyond a linear model.
* ``w_dense``: ``N(0, (dense_scale / sqrt(num_dense))**2)`` from a generator seeded by ``seed``.
* ``bias``: unless given, solved (bisection) so that the mean planted click probability over a
  fixed calibration sample of 32768 draws equals ``target_ctr``. The calibration sample depends
  on ``seed`` only, so every rank uses the same bias.

With the defaults (26 fields, 13 dense, vocab 100k, a = 1.2, field/dense/interaction scales
1.0/0.5/0.5, target CTR 0.25) the Bayes AUC (:meth:`bayes_auc`, what the planted probabilities
themselves achieve) is 0.77-0.79 depending on the seed (0.789 for seed 0); without the
interaction term it is about 0.015 lower. A one-hot logistic regression trained for 100 steps of
batch 512 reaches about 0.67 on held-out data (seed 0). Because
IDs are Zipf-distributed, most of the signal sits on frequent IDs, which a model learns within a
few hundred steps; weights of rare IDs are as large but seen too rarely to be learned quickly.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from hybridps.data.auc import roc_auc
from hybridps.data.batch import Batch, check_int, resolve_batch_size
from hybridps._synthetic import pick_keys, planted_logits
from hybridps.data.criteo import criteo_schema
from hybridps.data.hashing import _field_offset, splitmix64
from hybridps.data.source import DataSource
from hybridps.errors import ConfigError, DataError

__all__ = ["SyntheticCTR", "HELD_OUT_FIRST_STEP"]

#: The step of the first held-out batch (:meth:`SyntheticCTR.epoch_batches`): no training run
#: reaches it, so held-out batches are never trained on.
HELD_OUT_FIRST_STEP = 1 << 40

_SALT_W = 0x5BD1E9955BD1E995
_SALT_V = 0xD6E8FEB86659FD93
_CALIBRATION_TAG = 0xCA11B
_BAYES_TAG = 0xBA7E5
_DENSE_W_TAG = 0xDE45E
_CALIBRATION_SAMPLES = 32768
_MASK64 = (1 << 64) - 1
_MAX_PLANTED_DIM = 64


@functools.lru_cache(maxsize=8)
def _alias_table(vocab: int, a: float):
    """Walker/Vose alias table of the bounded Zipf law P(k) ∝ (k+1)^-a over [0, vocab)."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** (-a)
    p /= p.sum()
    q = p * vocab
    prob = np.ones(vocab, dtype=np.float64)
    alias = np.arange(vocab, dtype=np.int64)
    small = np.flatnonzero(q < 1.0).tolist()
    large = np.flatnonzero(q >= 1.0).tolist()
    ql = q.tolist()
    prob_l = prob.tolist()
    alias_l = alias.tolist()
    while small and large:
        s = small.pop()
        g = large.pop()
        prob_l[s] = ql[s]
        alias_l[s] = g
        ql[g] = (ql[g] + ql[s]) - 1.0
        (small if ql[g] < 1.0 else large).append(g)
    # leftovers are 1 up to rounding
    prob = np.asarray(prob_l, dtype=np.float64)
    alias = np.asarray(alias_l, dtype=np.int64)
    itype = np.int32 if vocab < 2 ** 31 else np.int64
    alias = alias.astype(itype)
    for a_ in (prob, alias, p):
        a_.setflags(write=False)
    return prob, alias, p



def _check_float(name: str, value, lo: float, hi: float = math.inf,
                 lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ConfigError(f"{name} must be in {bound}, got {value!r}")
    return v


class SyntheticCTR(DataSource):
    """Endless, deterministic synthetic CTR data with a learnable planted model (see module
    doc): an endless :class:`~hybridps.data.source.DataSource` of the Criteo preset's layout.

    Args:
        num_fields: categorical fields (one key per field per sample).
        num_dense: dense features.
        vocab_size: distinct IDs per field, an int or one int per field.
        zipf_a: Zipf exponent (> 0; larger is more skewed).
        seed: data seed (the planted model depends on it only; samples on seed, rank, step).
        rank, world_size: this process's rank; each rank draws its own samples.
        planted_dim: dimension of the planted interaction vectors (0 disables them).
        field_scale, dense_scale, interaction_scale: standard deviations of the three logit
            terms (for independent keys).
        label_flip: probability that a label is flipped (label noise; lowers the Bayes AUC).
        target_ctr: the mean click probability the bias is calibrated to.
        bias: fix the logit bias instead of calibrating it.
        batch_size: default batch size of :meth:`iter_batches`.
        schema: the run's schema (default: the Criteo preset of ``num_fields`` and
            ``num_dense``, built when first asked for).
    """

    kind = "synthetic"
    finite = False

    def __init__(self, num_fields: int = 26, num_dense: int = 13,
                 vocab_size: Union[int, Sequence[int]] = 100_000, zipf_a: float = 1.2,
                 seed: int = 0, rank: int = 0, world_size: int = 1, planted_dim: int = 4,
                 field_scale: float = 1.0, dense_scale: float = 0.5,
                 interaction_scale: float = 0.5, label_flip: float = 0.0,
                 target_ctr: float = 0.25, bias: Optional[float] = None,
                 batch_size: Optional[int] = None, schema=None):
        self._schema = schema
        self.num_fields = check_int("num_fields", num_fields, 1)
        if self.num_fields > 1 << 16:
            raise ConfigError(f"num_fields must be <= 65536, got {num_fields}")
        self.num_dense = check_int("num_dense", num_dense, 0)
        if isinstance(vocab_size, (int, np.integer)) and not isinstance(vocab_size, bool):
            vocabs = [vocab_size] * self.num_fields
        else:
            try:
                vocabs = list(vocab_size)
            except TypeError:
                raise ConfigError(f"vocab_size must be an int or a sequence of ints, got "
                                  f"{vocab_size!r}") from None
            if len(vocabs) != self.num_fields:
                raise ConfigError(f"vocab_size has {len(vocabs)} entries for "
                                  f"{self.num_fields} fields")
        self.vocab_sizes = [check_int("vocab_size", v, 1) for v in vocabs]
        if max(self.vocab_sizes) >= 1 << 48:
            raise ConfigError("vocab_size must be < 2**48")
        self.zipf_a = _check_float("zipf_a", zipf_a, 0.0, 20.0, lo_open=True)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size ({self.world_size}), got {rank}")
        self.planted_dim = check_int("planted_dim", planted_dim, 0)
        if self.planted_dim > _MAX_PLANTED_DIM:
            raise ConfigError(f"planted_dim must be <= {_MAX_PLANTED_DIM}, got {planted_dim}")
        self.field_scale = _check_float("field_scale", field_scale, 0.0)
        self.dense_scale = _check_float("dense_scale", dense_scale, 0.0)
        self.interaction_scale = _check_float("interaction_scale", interaction_scale, 0.0)
        self.label_flip = _check_float("label_flip", label_flip, 0.0, 0.5)
        if self.label_flip == 0.5:
            raise ConfigError("label_flip must be < 0.5")
        self.target_ctr = _check_float("target_ctr", target_ctr, 0.0, 1.0)
        if not self.label_flip < self.target_ctr < 1.0 - self.label_flip:
            raise ConfigError(f"target_ctr must lie strictly between label_flip and "
                              f"1 - label_flip, got {target_ctr}")
        self.default_batch_size = (None if batch_size is None
                                   else check_int("batch_size", batch_size, 1))
        self.next_step = 0

        # Field groups sharing a vocabulary (one alias table each).
        self._groups = []
        for v in sorted(set(self.vocab_sizes)):
            cols = np.array([f for f, fv in enumerate(self.vocab_sizes) if fv == v])
            prob, alias, _ = _alias_table(v, self.zipf_a)
            self._groups.append((v, cols, prob.astype(np.float32), alias))

        # Planted model constants (functions of the seed only).
        s = np.array([self.seed], dtype=np.uint64)
        self._salt_w = np.uint64(int(splitmix64(s ^ np.uint64(_SALT_W))[0]))
        n_vhash = (self.planted_dim + 3) // 4
        self._salt_v = [np.uint64(int(splitmix64(s ^ np.uint64((_SALT_V + 7919 * (j + 1))
                                                                 & _MASK64))[0]))
                        for j in range(n_vhash)]
        self._w_scale = self.field_scale / math.sqrt(self.num_fields)
        pairs = self.num_fields * (self.num_fields - 1) / 2
        if self.planted_dim > 0 and pairs > 0 and self.interaction_scale > 0:
            # <v_i, v_j> of uniform[-c, c) entries has variance planted_dim * (c^2/3)^2
            self._v_scale = (9.0 * self.interaction_scale ** 2
                             / (pairs * self.planted_dim)) ** 0.25
        else:
            self._v_scale = 0.0
        wrng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence(self.seed, spawn_key=(_DENSE_W_TAG,))))
        dscale = self.dense_scale / math.sqrt(self.num_dense) if self.num_dense else 0.0
        self.dense_weights = (wrng.standard_normal(self.num_dense) * dscale).astype(np.float32)
        # what the C kernels take: float64 weights, uint64 salts, each field's key offset
        self._dense_weights64 = self.dense_weights.astype(np.float64)
        self._salt_v_array = np.array([int(x) for x in self._salt_v] or [0], dtype=np.uint64)
        self._field_offsets = np.array([_field_offset(f) for f in range(self.num_fields)],
                                       dtype=np.uint64)
        if bias is None:
            self.bias = self._calibrate_bias()
        else:
            self.bias = _check_float("bias", bias, -1e3, 1e3)

    # ------------------------------------------------------------------ generation
    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(tags))))

    def _draw(self, rng: np.random.Generator, n: int):
        """(keys (n, F) int64, dense (n, D) float32, label uniforms (n,)) from ``rng``.

        Per field group: candidate IDs and coins from ``rng``, then the alias pick and the
        key hashing in one C loop (hybridps._synthetic.pick_keys).
        """
        keys = np.empty((n, self.num_fields), dtype=np.int64)
        for vocab, cols, prob, alias in self._groups:
            shape = (n, cols.size)
            candidates = rng.integers(0, vocab, size=shape, dtype=alias.dtype)
            coins = rng.random(shape, dtype=np.float32)
            pick_keys(candidates, coins, prob, alias, cols, self._field_offsets, keys)
        dense = rng.standard_normal((n, self.num_dense), dtype=np.float32)
        label_u = rng.random(n)
        return keys, dense, label_u

    def _make_batch(self, rng: np.random.Generator, n: int) -> Batch:
        keys, dense, label_u = self._draw(rng, n)
        p = self._probabilities(keys, dense)
        labels = (label_u < p).astype(np.float32)
        return Batch(dense=dense, keys=keys, labels=labels)

    def batch(self, step: int, batch_size: Optional[int] = None) -> Batch:
        """The batch of ``step`` on this rank (pure function of seed, rank, step, size)."""
        step = check_int("step", step, 0)
        b = resolve_batch_size(batch_size, self.default_batch_size)
        return self._make_batch(self._rng(self.seed, self.rank, step), b)

    def _next_batches(self, batch_size: Optional[int] = None,
                      num_steps: Optional[int] = None) -> Iterator[Batch]:
        """Yield ``num_steps`` batches (forever if None), starting at the current position
        (what :meth:`iter_batches` serves).

        The position (``next_step``) advances before each batch is handed out, so
        :meth:`state` taken while processing a batch points at the batch after it.
        """
        b = resolve_batch_size(batch_size, self.default_batch_size)
        if num_steps is not None:
            num_steps = check_int("num_steps", num_steps, 0)
        produced = 0
        while num_steps is None or produced < num_steps:
            step = self.next_step
            self.next_step = step + 1
            produced += 1
            yield self.batch(step, b)

    def epoch_batches(self, batch_size: int, count: Optional[int] = None) -> Iterator[Batch]:
        """``count`` held-out batches: those of steps ``HELD_OUT_FIRST_STEP + k``, which no
        training run reaches (the position does not move)."""
        if count is None:
            raise ConfigError("synthetic data has no end: say how many held-out batches to read")
        for k in range(check_int("count", count, 0)):
            yield self.batch(HELD_OUT_FIRST_STEP + k, batch_size)

    @property
    def schema(self):
        if self._schema is None:
            self._schema = criteo_schema(self.num_fields, self.num_dense)
        return self._schema

    @schema.setter
    def schema(self, schema):
        self._schema = schema

    # ------------------------------------------------------------------ planted model
    def _logits(self, keys: np.ndarray, dense: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if keys.ndim != 2 or keys.shape[1] != self.num_fields:
            raise DataError(f"keys must have shape (B, {self.num_fields}), got {keys.shape}")
        dense = np.ascontiguousarray(dense, dtype=np.float32)
        if dense.shape != (keys.shape[0], self.num_dense):
            raise DataError(f"dense must have shape ({keys.shape[0]}, {self.num_dense}), "
                            f"got {dense.shape}")
        return planted_logits(keys, dense, self._dense_weights64, float(self.bias or 0.0),
                              int(self._salt_w), self._w_scale, self._salt_v_array,
                              self._v_scale, self.planted_dim)

    def _probabilities(self, keys: np.ndarray, dense: np.ndarray) -> np.ndarray:
        logit = self._logits(keys, dense)
        p = 1.0 / (1.0 + np.exp(-logit))
        if self.label_flip:
            p = self.label_flip + (1.0 - 2.0 * self.label_flip) * p
        return p

    def true_probabilities(self, batch: Batch) -> np.ndarray:
        """The planted click probability of each sample of ``batch`` (float64, shape (B,))."""
        return self._probabilities(batch.keys, batch.dense)

    def _calibrate_bias(self) -> float:
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence(self.seed, spawn_key=(_CALIBRATION_TAG,))))
        keys, dense, _ = self._draw(rng, _CALIBRATION_SAMPLES)
        saved_bias = getattr(self, "bias", None)
        self.bias = 0.0
        z = self._logits(keys, dense)
        self.bias = saved_bias
        lo, hi = -60.0, 60.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            p = 1.0 / (1.0 + np.exp(-(z + mid)))
            if self.label_flip:
                p = self.label_flip + (1.0 - 2.0 * self.label_flip) * p
            if p.mean() < self.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def bayes_auc(self, num_samples: int = 200_000) -> float:
        """AUC of the planted probabilities on ``num_samples`` fresh samples (labels drawn
        from them): the best AUC any model can reach on this data, up to sampling noise
        (about ±0.002 at 200k samples). Depends on the seed only, not on the rank."""
        num_samples = check_int("num_samples", num_samples, 2)
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence(self.seed, spawn_key=(_BAYES_TAG,))))
        probs, labels = [], []
        for start in range(0, num_samples, 16384):
            b = self._make_batch(rng, min(16384, num_samples - start))
            probs.append(self.true_probabilities(b))
            labels.append(b.labels)
        return roc_auc(np.concatenate(labels), np.concatenate(probs))

    # ------------------------------------------------------------------ position / info
    def state(self) -> dict:
        """The data position: resume with :meth:`restore` (also across world sizes)."""
        return {"kind": self.kind, "next_step": self.next_step, "seed": self.seed}

    position = property(state)

    def restore(self, state: dict) -> None:
        """Continue at the position recorded by :meth:`state`."""
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise DataError(f"cannot restore a synthetic dataset from state {state!r}")
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"data state was saved with seed {state['seed']}, this dataset "
                            f"has seed {self.seed}")
        self.next_step = check_int("next_step", state.get("next_step"), 0)

    def stats(self) -> None:
        """None: a generator reads nothing (its parameters: :meth:`describe`)."""
        return None

    def describe(self) -> dict:
        """The generator's parameters, for logs and benchmark reports."""
        return {
            "kind": self.kind, "num_fields": self.num_fields, "num_dense": self.num_dense,
            "vocab_size": (self.vocab_sizes[0] if len(set(self.vocab_sizes)) == 1
                           else list(self.vocab_sizes)),
            "zipf_a": self.zipf_a, "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "planted_dim": self.planted_dim,
            "field_scale": self.field_scale, "dense_scale": self.dense_scale,
            "interaction_scale": self.interaction_scale, "label_flip": self.label_flip,
            "target_ctr": self.target_ctr, "bias": self.bias,
            "batch_size": self.default_batch_size, "next_step": self.next_step,
        }

    def __repr__(self) -> str:
        return (f"SyntheticCTR(num_fields={self.num_fields}, num_dense={self.num_dense}, "
                f"zipf_a={self.zipf_a}, seed={self.seed}, rank={self.rank}/{self.world_size})")
