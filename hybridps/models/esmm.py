"""ESMM (Ma et al. 2018, "Entire Space Multi-Task Model"): click and conversion over every
impression.

Two towers over the same inputs (every sparse feature's vector and the dense features, so
the embedding rows are shared): pCTR and pCVR. The schema's first binary task is the click,
supervised by pCTR; its second binary task is the conversion over every impression (0
without a click), supervised by pCTCVR = pCTR x pCVR, so pCVR is learnt over the entire
impression space rather than over clicked rows only (the selection bias ESMM exists for).
pCVR of a row is p_conversion / p_click of the model's two outputs. (The click and the
conversion are the first two binary tasks without ``given``.)

A binary task ``given`` the click (``{name: cvr, column: conversion, given: click}``: the
conversion labelled on clicked rows only) is the pCVR tower's own logit: pCVR is then also
supervised on the clicked rows, the post-click constraint of ESCM² (Wang et al. 2022), naive,
or inverse-propensity weighted with the task's ``ipw`` (hybridps.models.loss). Any further task
gets a tower of its own.

:class:`ConversionTower` is ESMM's pCVR tower alone (same layers, same initial weights for a
seed) for a one-task schema: the conversion model of the clicked rows that ESMM is compared
with (``hybridps bench multitask``).

The model returns a dict of logits: the click's, and the conversion's ``logit(pCTR x pCVR)``
computed in log space (``log p - log(1 - p)``), so the loss is the usual sigmoid
cross-entropy of hybridps.models.loss.
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.errors import ConfigError
from hybridps.models._base import CTRModel, MLP, derive_seed, seeded_dense


def product_logit(logit_a, logit_b):
    """``logit(sigmoid(a) * sigmoid(b))``, stable for large |a|, |b|."""
    log_p = tf.minimum(tf.math.log_sigmoid(logit_a) + tf.math.log_sigmoid(logit_b), -1e-7)
    return log_p - tf.math.log(-tf.math.expm1(log_p))


@tf.keras.utils.register_keras_serializable(package="hybridps")
class ESMM(CTRModel):
    """ESMM: a dict {click task: pCTR logit, conversion task: pCTCVR logit, tasks given the
    click: pCVR logit, other tasks: their tower's output} (see the module docstring)."""

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        binary = [t.name for t in schema.tasks if t.kind == "binary" and t.given is None]
        if len(binary) < 2:
            raise ConfigError(f"esmm needs two binary tasks without 'given' in features.labels, "
                              f"the click first and the conversion (over every impression) "
                              f"second; the schema's tasks are "
                              f"{[(t.name, t.kind) for t in schema.tasks]}")
        self.click_task, self.conversion_task = binary[0], binary[1]
        self.post_click_tasks = [t.name for t in schema.tasks
                                 if t.kind == "binary" and t.given == self.click_task]
        self.task_names = [t.name for t in schema.tasks]
        own = binary[:2] + self.post_click_tasks
        towers = ["ctr", "cvr"] + [n for n in self.task_names if n not in own]
        self.tower_index = {tower: index for index, tower in enumerate(towers)}
        self.tower_mlps = [MLP(self.hidden, derive_seed(seed, 2 * i), name=f"{tower}_mlp")
                           for i, tower in enumerate(towers)]
        self.tower_heads = [seeded_dense(1, derive_seed(seed, 2 * i + 1), name=f"{tower}_head")
                            for i, tower in enumerate(towers)]

    def _tower(self, tower, x):
        index = self.tower_index[tower]
        return tf.squeeze(self.tower_heads[index](self.tower_mlps[index](x)), axis=-1)

    def call(self, inputs, training=None):
        x = tf.concat(self.feature_vectors(inputs) + [self.dense_input(inputs)], axis=1)
        ctr = self._tower("ctr", x)
        cvr = self._tower("cvr", x)
        out = {self.click_task: ctr, self.conversion_task: product_logit(ctr, cvr)}
        out.update({name: cvr for name in self.post_click_tasks})
        for name in self.task_names:
            if name not in out:
                out[name] = self._tower(name, x)
        return out


@tf.keras.utils.register_keras_serializable(package="hybridps")
class ConversionTower(CTRModel):
    """ESMM's pCVR tower alone, for a schema of one binary task: the same MLP and head over
    the same inputs, built from the same seeds as ESMM's pCVR tower, returning its logit."""

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), seed: int = 0,
                 name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        self.mlp = MLP(self.hidden, derive_seed(seed, 2), name="cvr_mlp")      # ESMM's tower 1
        self.head = seeded_dense(1, derive_seed(seed, 3), name="cvr_head")

    def call(self, inputs, training=None):
        x = tf.concat(self.feature_vectors(inputs) + [self.dense_input(inputs)], axis=1)
        return tf.squeeze(self.head(self.mlp(x)), axis=-1)


def build(schema, config):
    return ESMM(schema, hidden=tuple(config.hidden), seed=config.seed)


def build_conversion_tower(schema, config):
    """``model: hybridps.models.esmm:build_conversion_tower``: :class:`ConversionTower`."""
    return ConversionTower(schema, hidden=tuple(config.hidden), seed=config.seed)
