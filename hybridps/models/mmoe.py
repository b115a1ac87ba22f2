"""MMoE (Ma et al. 2018, "Multi-gate Mixture-of-Experts"): experts shared by the tasks, one
gate and one tower per task.

Every expert is an MLP (``expert_units``) over the same inputs (every sparse feature's vector
and the dense features); task t mixes the experts' outputs with its gate's softmax weights
(a linear layer of the inputs, ``num_experts`` wide) and its tower (an MLP of ``hidden`` and
a linear head) gives its output: a logit for a binary task, the value for a regression one.
The model returns a dict {task name: (B,)} naming every task of the schema (one task: the
schema's ``label``).
"""
from typing import Optional, Sequence

import tensorflow as tf

from hybridps.models._base import CTRModel, MLP, check_hidden, check_int, derive_seed, seeded_dense


@tf.keras.utils.register_keras_serializable(package="hybridps")
class MMoE(CTRModel):
    """MMoE over the input contract (see the module docstring)."""

    def __init__(self, schema, hidden: Sequence[int] = (256, 128), num_experts: int = 4,
                 expert_units: Sequence[int] = (128,), seed: int = 0, name: Optional[str] = None):
        super().__init__(schema, hidden, seed, name=name)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.expert_units = check_hidden(expert_units)
        if not self.expert_units:
            check_int("expert_units[0]", 0, 1)
        self.task_names = [t.name for t in schema.tasks]
        self.experts = [MLP(self.expert_units, derive_seed(seed, k), name=f"expert_{k}")
                        for k in range(self.num_experts)]
        base = self.num_experts
        self.gates, self.towers, self.heads = [], [], []
        for t, task in enumerate(self.task_names):
            self.gates.append(seeded_dense(self.num_experts, derive_seed(seed, base + 3 * t),
                                           name=f"{task}_gate"))
            self.towers.append(MLP(self.hidden, derive_seed(seed, base + 3 * t + 1), name=f"{task}_tower"))
            self.heads.append(seeded_dense(1, derive_seed(seed, base + 3 * t + 2), name=f"{task}_head"))

    def call(self, inputs, training=None):
        x = tf.concat(self.feature_vectors(inputs) + [self.dense_input(inputs)], axis=1)
        experts = tf.stack([expert(x) for expert in self.experts], axis=1)     # (B, K, units)
        out = {}
        for task, gate, tower, head in zip(self.task_names, self.gates, self.towers, self.heads):
            weights = tf.nn.softmax(gate(x), axis=-1)[:, :, None]              # (B, K, 1)
            mixed = tf.reduce_sum(weights * experts, axis=1)
            out[task] = tf.squeeze(head(tower(mixed)), axis=-1)
        return out

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts,
                "expert_units": list(self.expert_units)}


def build(schema, config):
    return MMoE(schema, hidden=tuple(config.hidden), num_experts=config.num_experts,
                expert_units=tuple(config.expert_units), seed=config.seed)
