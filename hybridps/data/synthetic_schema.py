"""Synthetic data for any feature schema: Zipf ids, Zipf list lengths, a planted model.

``SchemaSynthetic`` extends :class:`hybridps.data.synthetic.SyntheticCTR` (same seeding, same
determinism: a batch is a pure function of (seed, rank, step, batch size)) to the features of a
``features:`` schema (hybridps.schema):

* single-valued features: ids drawn from the bounded Zipf law of SyntheticCTR (``vocab_size``,
  ``zipf_a``), keys ``space_keys(feature's key space, id)`` as every schema reader computes
  them, so the same ids written to a file read back as the same keys;
* list features (multi-hot and sequences): a length per sample from the bounded Zipf law
  ``P(L = k) ∝ (k + 1) ** -a_len`` over ``k = 0 .. list_max_length``, with ``a_len`` solved so
  that the mean length is ``list_mean_length`` (0 lengths occur: empty lists); then that many
  ids from the feature's Zipf law; a feature with ``max_len`` keeps its first max_len ids
  (the rest are counted in ``Batch.truncated``, as a reader truncates a file's lists);
* dense features: i.i.d. N(0, 1), ``schema.num_dense`` of them;
* labels: ``Bernoulli(sigmoid(logit))`` with the planted logit of SyntheticCTR over the
  single-valued keys (per-key weights, dense weights, pairwise interactions) plus, for each list
  feature, ``list_scale`` times the mean planted weight of its ids (0 for an empty list), so
  the pooled values carry signal and AUC means something.

A schema of several tasks (``labels:``) gets labels (B, T) planted as a funnel:

* the first binary task is the click above (probability ``p_click``, mean ``target_ctr``:
  SyntheticCTR's keyword, default 0.25; a funnel's few percent is what ESMM is meant for);
* every later binary task is a conversion that happens only after a click: 0 without a click,
  else ``Bernoulli(sigmoid(CONVERSION_CLICK * (logit_click - bias) + conversion_own_scale *
  own_t + CONVERSION_BIAS))`` with ``own_t`` a second planted per-key term of its own
  (``key_weights`` under the task's salt, over the single-valued keys, of the click's scale),
  so click and conversion share signal but differ (``conversion_own_scale``, default 1: the
  conversion's own term as strong as the click's; smaller: a conversion that depends mostly on
  the click's features, as when both are driven by the same item and user);
  :meth:`conversion_probabilities` gives that planted probability of a conversion after a
  click for every impression, clicked or not;
* a regression task is a value observed only after a click (missing, NaN, without one; always
  present when the schema has no binary task): ``1 + 0.5 * (logit_click - bias) + own_t +
  0.5 * N(0, 1)``;
* a task reading the column of an earlier task gets that task's labels, and a task ``given``
  another is missing where that task's label is not 1 (hybridps.tasks.mask_given), as a
  reader of the same rows would make them.
:meth:`raw_batch` gives the same samples as raw ids (for writing files of this workload).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from hybridps._synthetic import alias_ids, key_weights
from hybridps.data.batch import Batch, truncate_lists
from hybridps.data.hashing import space_keys
from hybridps.data.synthetic import SyntheticCTR, _alias_table
from hybridps.errors import ConfigError
from hybridps.tasks import mask_given

CONVERSION_CLICK = 0.7        # weight of the click's planted logit in a conversion's
CONVERSION_BIAS = -0.5        # a conversion's bias (about half of the clicks convert)


def length_exponent(mean, cap):
    """The exponent a of P(L = k) ∝ (k + 1)^-a on 0..cap whose mean is ``mean`` (bisection)."""
    if not 0 < mean < cap / 2:
        raise ConfigError(f"list_mean_length must lie in (0, {cap / 2}) for lists of at most "
                          f"{cap} ids, got {mean}")
    k = np.arange(cap + 1, dtype=np.float64)
    lo, hi = 0.0, 20.0          # a = 0: uniform, mean cap / 2; large a: mean -> 0
    for _ in range(100):
        a = 0.5 * (lo + hi)
        p = (k + 1) ** -a
        if (p * k).sum() / p.sum() > mean:
            lo = a
        else:
            hi = a
    return 0.5 * (lo + hi)


class SchemaSynthetic(SyntheticCTR):
    """Endless deterministic data for a feature schema (see the module docstring).

    Args:
        schema: hybridps.schema.FeatureSchema (not the Criteo preset: SyntheticCTR is that).
        list_mean_length, list_max_length: the list length law (mean, cap for lists without
            a max_len).
        list_scale: weight of the list features' term in the planted logit.
        conversion_own_scale: weight of a conversion's own per-key term (module docstring).
        **kwargs: SyntheticCTR's (vocab_size, zipf_a, seed, rank, world_size, ...).
    """

    kind = "synthetic"

    def __init__(self, schema, list_mean_length: float = 10.0, list_max_length: int = 50,
                 list_scale: float = 1.0, conversion_own_scale: float = 1.0, **kwargs):
        singles = schema.single_features
        kwargs.pop("num_fields", None)
        kwargs.pop("num_dense", None)
        bias = kwargs.pop("bias", None)
        # bias 0 here: the calibration below needs the list features, set up after this call
        super().__init__(num_fields=max(len(singles), 1), num_dense=schema.num_dense, bias=0.0,
                         schema=schema, **kwargs)
        self.single_seeds = [f.key_space for f in singles]
        self.list_scale = float(list_scale)
        if not 0 <= float(conversion_own_scale) <= 100:
            raise ConfigError(f"conversion_own_scale must lie in [0, 100], got {conversion_own_scale}")
        self.conversion_own_scale = float(conversion_own_scale)
        self.lists = []
        a_len = length_exponent(float(list_mean_length), int(list_max_length))
        prob, alias, _ = _alias_table(int(list_max_length) + 1, round(a_len, 12))
        for f in schema.list_features:
            self.lists.append((f, prob.astype(np.float32), alias))
        vocab = self.vocab_sizes[0]
        prob, alias, _ = _alias_table(vocab, self.zipf_a)
        self._id_table = (vocab, prob.astype(np.float32), alias)
        self.bias = self._calibrate_bias() if bias is None else float(bias)

    # ------------------------------------------------------------------ generation
    def _zipf(self, rng, shape, table):
        vocab, prob, alias = table
        candidates = rng.integers(0, vocab, size=shape, dtype=alias.dtype)
        coins = rng.random(shape, dtype=np.float32)
        return alias_ids(candidates.reshape(-1), coins.reshape(-1), prob, alias).reshape(shape)

    def _draw_ids(self, rng, n):
        """(single ids (n, S), {name: (ids, lengths)}, dense (n, D), label uniforms (n,))."""
        singles = self._zipf(rng, (n, len(self.single_seeds)), self._id_table)
        lists = {}
        for feature, prob, alias in self.lists:
            lengths = self._zipf(rng, (n,), (len(prob), prob, alias)).astype(np.int32)
            lists[feature.name] = (self._zipf(rng, (int(lengths.sum()),), self._id_table), lengths)
        dense = rng.standard_normal((n, self.num_dense), dtype=np.float32)
        return singles, lists, dense, rng.random(n)

    def _hash(self, singles, lists):
        """(keys (n, S), {name: (keys, lengths)} truncated to max_len, {name: ids dropped})."""
        keys = np.empty(singles.shape, dtype=np.int64)
        for column, space in enumerate(self.single_seeds):
            keys[:, column] = space_keys(space, singles[:, column])
        hashed, truncated = {}, {}
        for feature, _, _ in self.lists:
            ids, lengths = lists[feature.name]
            ids, lengths, dropped = truncate_lists(ids, lengths, feature.max_len)
            hashed[feature.name] = (space_keys(feature.key_space, ids), lengths)
            if dropped:
                truncated[feature.name] = dropped
        return keys, hashed, truncated

    def _logits_of(self, keys, lists, dense):
        logit = self._logits(keys, dense) if self.single_seeds else np.full(len(dense), self.bias or 0.0)
        for feature, _, _ in self.lists:
            values, lengths = lists[feature.name]
            if not len(values):
                continue
            weights = key_weights(values, int(self._salt_w), self.list_scale)
            segments = np.repeat(np.arange(len(lengths)), lengths)
            total = np.bincount(segments, weights=weights, minlength=len(lengths))
            logit = logit + total / np.maximum(lengths, 1)
        return logit

    def _make_batch(self, rng, n):
        singles, lists, dense, label_u = self._draw_ids(rng, n)
        keys, hashed, truncated = self._hash(singles, lists)
        batch = Batch(dense=dense, keys=keys, labels=np.zeros(n, np.float32), lists=hashed,
                      truncated=truncated)
        click = (label_u < self.true_probabilities(batch)).astype(np.float32)
        batch.labels = self._task_labels(rng, batch, click) if self.schema.labels else click
        return batch

    def _task_labels(self, rng, batch, click):
        """Labels (B, T) of a schema of several tasks (the funnel of the module docstring),
        from this batch's uniforms drawn after its features."""
        tasks = self.schema.labels
        n = batch.size
        uniforms = rng.random((n, len(tasks)))
        noise = rng.standard_normal((n, len(tasks)))
        base = self._logits_of(batch.keys, batch.lists, batch.dense) - self.bias
        has_binary = any(t.kind == "binary" for t in tasks)
        labels = np.empty((n, len(tasks)), np.float32)
        first_binary, column_of = True, {}
        for j, task in enumerate(tasks):
            if task.column in column_of:          # a second task of one column: the same labels
                labels[:, j] = labels[:, column_of[task.column]]
                continue
            column_of[task.column] = j
            if task.kind == "binary" and first_binary:
                labels[:, j], first_binary = click, False
            elif task.kind == "binary":
                p = self._conversion_probability(batch, base, j)
                labels[:, j] = click * (uniforms[:, j] < p)
            else:
                value = 1.0 + 0.5 * base + self._own_logit(batch.keys, j) + 0.5 * noise[:, j]
                labels[:, j] = np.where(click > 0, value, np.nan) if has_binary else value
        return mask_given(tasks, labels)

    def _conversion_probability(self, batch, base, task_index):
        own = self.conversion_own_scale * self._own_logit(batch.keys, task_index)
        return 1.0 / (1.0 + np.exp(-(CONVERSION_CLICK * base + own + CONVERSION_BIAS)))

    def conversion_probabilities(self, batch) -> np.ndarray:
        """The planted probability that each impression of ``batch`` converts if clicked (the
        first conversion task: the schema's second binary task), clicked or not (float64, (B,))."""
        binary = [j for j, t in enumerate(self.schema.labels) if t.kind == "binary"]
        if len(binary) < 2:
            raise ConfigError("conversion_probabilities needs a schema with two binary tasks "
                              "(a click, then a conversion)")
        base = self._logits_of(batch.keys, batch.lists, batch.dense) - self.bias
        return self._conversion_probability(batch, base, binary[1])

    def _own_logit(self, keys, task_index):
        """Task ``task_index``'s own planted term: per-key weights under its own salt, summed
        over the single-valued features (0 without one)."""
        if keys.shape[1] == 0:
            return np.zeros(len(keys))
        salt = int(self._salt_w) ^ (0x9E3779B97F4A7C15 * (task_index + 1) & 0xFFFFFFFFFFFFFFFF)
        weights = key_weights(np.ascontiguousarray(keys.reshape(-1)), salt, self._w_scale)
        return weights.reshape(keys.shape).sum(axis=1)

    def raw_batch(self, step: int, batch_size: int):
        """The samples of :meth:`batch` (step, batch_size) as raw ids: (single ids (B, S),
        {name: (ids, lengths)} before truncation to max_len, dense (B, D), labels (B,) or (B, T))."""
        rng = self._rng(self.seed, self.rank, step)
        singles, lists, dense, label_u = self._draw_ids(rng, batch_size)
        keys, hashed, _ = self._hash(singles, lists)
        batch = Batch(dense=dense, keys=keys, labels=np.zeros(batch_size, np.float32), lists=hashed)
        click = (label_u < self.true_probabilities(batch)).astype(np.float32)
        return singles, lists, dense, self._task_labels(rng, batch, click) if self.schema.labels else click

    def true_probabilities(self, batch) -> np.ndarray:
        """The planted click probability of each sample of ``batch`` (float64, (B,))."""
        p = 1.0 / (1.0 + np.exp(-self._logits_of(batch.keys, batch.lists, batch.dense)))
        return self.label_flip + (1.0 - 2.0 * self.label_flip) * p if self.label_flip else p

    def _calibrate_bias(self) -> float:
        """The bias that makes the mean planted probability ``target_ctr`` (bisection over a
        fixed sample of 8192 draws that depends on the seed only)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(0xCA11C,))))
        singles, lists, dense, _ = self._draw_ids(rng, 8192)
        keys, hashed, _ = self._hash(singles, lists)
        saved, self.bias = self.bias, 0.0
        z = self._logits_of(keys, hashed, dense)
        self.bias = saved
        lo, hi = -60.0, 60.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if (1.0 / (1.0 + np.exp(-(z + mid)))).mean() < self.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def describe(self) -> dict:
        out = super().describe()
        out.update(schema=[f.name for f in self.schema.sparse], list_scale=self.list_scale,
                   conversion_own_scale=self.conversion_own_scale)
        return out


def open_synthetic(schema, config, rank, world_size) -> SyntheticCTR:
    """The synthetic data of a run (``data: synthetic``): :class:`SyntheticCTR` for the Criteo
    preset (its fields and dense features), :class:`SchemaSynthetic` for a ``features:``
    schema."""
    if schema.preset != "criteo":
        return make_schema_synthetic(schema, config, rank, world_size)
    return SyntheticCTR(num_fields=len(schema.sparse), num_dense=schema.num_dense,
                        vocab_size=config.vocab_size, zipf_a=config.zipf_a, seed=config.seed,
                        rank=rank, world_size=world_size, schema=schema)


def make_schema_synthetic(schema, config, rank, world_size) -> Optional[SchemaSynthetic]:
    """The synthetic dataset of a run whose schema is not the Criteo preset."""
    return SchemaSynthetic(schema, list_mean_length=config.list_mean_length,
                           list_max_length=config.list_max_length, vocab_size=config.vocab_size,
                           zipf_a=config.zipf_a, seed=config.seed, rank=rank,
                           world_size=world_size)


__all__ = ["SchemaSynthetic", "length_exponent", "make_schema_synthetic", "open_synthetic"]
