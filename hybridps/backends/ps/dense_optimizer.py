"""The Keras dense optimizers' formulas (TF 2.15) in numpy, as a PS server applies them to its
chunk of the dense parameters, and their state in the Keras optimizer's variable layout.
"""
import numpy as np

from hybridps.errors import ConfigError


# The optimizer slots per dense variable, in the order Keras (TF 2.15) creates them; SGD
# without momentum still creates its "m" slot (all zeros), which this mode never needs.
KERAS_SLOTS = {"sgd": ("m",), "adagrad": ("accumulator",), "adam": ("m", "v")}


class NumpyDenseOptimizer:
    """The Keras dense optimizers' formulas (TF 2.15) on a float32 chunk, applied by a server.

    sgd: w -= lr g; adagrad: a += g^2, w -= lr g / sqrt(a + eps) (a starts at 0.1);
    adam: m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), w -= m lr sqrt(1 - b2^t) / (1 - b1^t) /
    (sqrt(v) + eps). Matching Keras makes PS BSP equal collective BSP numerically.

    State: ``t`` (updates applied, Keras' ``iterations``) and ``slots`` (name -> float32 array
    of the chunk's size); :meth:`to_keras_arrays` / :meth:`from_keras_arrays` convert to and
    from the variable list a Keras optimizer of the same kind holds, so checkpoints of both
    modes store the dense optimizer alike.
    """

    def __init__(self, name, learning_rate, size):
        if name not in KERAS_SLOTS:
            raise ConfigError(f"dense optimizer {name!r} is not available in PS mode; use sgd, adagrad or adam")
        self.name = name
        self.learning_rate = learning_rate
        self.lr = np.float32(learning_rate)
        self.size = int(size)
        self.t = 0
        self.slots = {}
        if name == "adagrad":
            self.slots["accumulator"] = np.full(size, 0.1, dtype=np.float32)
        elif name == "adam":
            self.slots["m"] = np.zeros(size, dtype=np.float32)
            self.slots["v"] = np.zeros(size, dtype=np.float32)

    def apply(self, weights, grads):
        self.t += 1
        if self.name == "sgd":
            weights -= self.lr * grads
        elif self.name == "adagrad":
            accumulator = self.slots["accumulator"]
            accumulator += grads * grads
            weights -= self.lr * grads / np.sqrt(accumulator + np.float32(1e-7))
        else:
            m, v = self.slots["m"], self.slots["v"]
            m += (grads - m) * np.float32(0.1)
            v += (grads * grads - v) * np.float32(0.001)
            alpha = self.lr * np.float32(np.sqrt(1 - 0.999 ** self.t) / (1 - 0.9 ** self.t))
            weights -= m * alpha / (np.sqrt(v) + np.float32(1e-7))

    # ------------------------------------------------------------------ state transfer
    def slot_matrix(self, start=0, stop=None):
        """The slots' [start, stop) as one (num_slots, n) float32 array (for a server's chunk)."""
        stop = self.size if stop is None else stop
        names = sorted(self.slots)
        if not names:
            return np.empty((0, stop - start), dtype=np.float32)
        return np.ascontiguousarray(np.stack([self.slots[n][start:stop] for n in names]))

    def load(self, t, slot_matrix):
        """Set ``t`` and the slots from :meth:`slot_matrix` of an optimizer of the same kind."""
        names = sorted(self.slots)
        if slot_matrix.shape != (len(names), self.size):
            raise ValueError(f"{self.name} state of shape {slot_matrix.shape}, expected "
                             f"{(len(names), self.size)}")
        self.t = int(t)
        for name, row in zip(names, slot_matrix):
            self.slots[name] = np.array(row, dtype=np.float32)

    def to_keras_arrays(self, shapes):
        """[iterations, then per variable its slots in KERAS_SLOTS order], shaped like ``shapes``."""
        arrays, start = [np.array(self.t, dtype=np.int64)], 0
        for shape in shapes:
            size = int(np.prod(shape, dtype=np.int64))
            for name in KERAS_SLOTS[self.name]:
                flat = self.slots.get(name)
                arrays.append(np.zeros(shape, np.float32) if flat is None
                              else flat[start:start + size].reshape(shape).copy())
            start += size
        return arrays

    @classmethod
    def from_keras_arrays(cls, name, learning_rate, arrays, shapes):
        """The inverse of :meth:`to_keras_arrays` (raises ValueError on another layout)."""
        per_variable = len(KERAS_SLOTS[name])
        if len(arrays) != 1 + per_variable * len(shapes):
            raise ValueError(f"{len(arrays)} {name} optimizer variables for {len(shapes)} dense "
                             f"variables; expected {1 + per_variable * len(shapes)}")
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        optimizer = cls(name, learning_rate, sum(sizes))
        optimizer.t = int(np.asarray(arrays[0]))
        for k, slot in enumerate(KERAS_SLOTS[name]):
            if slot in optimizer.slots:
                parts = [np.asarray(arrays[1 + v * per_variable + k], np.float32).ravel()
                         for v in range(len(shapes))]
                optimizer.slots[slot] = np.concatenate(parts) if parts else optimizer.slots[slot]
        return optimizer
