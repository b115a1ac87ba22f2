"""PS wire protocol: roles, message headers and tags, the dense chunking, numpy dense optimizers.

Every request starts with an int64 header on ``TAG_HEADER`` (so a server can take requests
from any worker in arrival order); its payload follows on dedicated tags from the same source,
which MPI delivers in order. Payloads are raw numpy buffers (upper-case mpi4py calls).
"""
import numpy as np

from hybridps.errors import ConfigError

TAG_HEADER, TAG_COUNTS, TAG_KEYS, TAG_ROW_GRADS, TAG_DENSE_GRADS = 101, 102, 103, 104, 105
TAG_REPLY_ROWS, TAG_REPLY_DENSE, TAG_INIT_DENSE = 106, 107, 108
OP_PULL, OP_PUSH, OP_DONE = 1, 2, 3
HEADER_LEN = 4          # [op, step, worker index, number of keys]


class PSRoles:
    """Which ranks serve and which train: servers are the last ``num_servers`` ranks."""

    def __init__(self, world_size, num_servers):
        if num_servers >= world_size:
            raise ConfigError(f"config field 'num_servers': {num_servers} servers leave no worker "
                              f"among {world_size} ranks; use at most {world_size - 1} "
                              f"(or start more ranks)")
        self.world_size = world_size
        self.num_servers = num_servers
        self.num_workers = world_size - num_servers
        self.server_ranks = list(range(self.num_workers, world_size))

    def is_server(self, rank):
        return rank >= self.num_workers

    def server_index(self, rank):
        return rank - self.num_workers


def dense_chunks(total, num_servers):
    """[start, stop) of each server's contiguous chunk of the flattened dense parameters."""
    bounds = np.linspace(0, total, num_servers + 1).round().astype(np.int64)
    return list(zip(bounds[:-1], bounds[1:]))


def header(op, step, worker, num_keys):
    return np.array([op, step, worker, num_keys], dtype=np.int64)


class NumpyDenseOptimizer:
    """The Keras dense optimizers' formulas (TF 2.15) on a float32 chunk, applied by a server.

    sgd: w -= lr g; adagrad: a += g^2, w -= lr g / sqrt(a + eps) (a starts at 0.1);
    adam: m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), w -= m lr sqrt(1 - b2^t) / (1 - b1^t) /
    (sqrt(v) + eps). Matching Keras makes PS BSP equal collective BSP numerically.
    """

    def __init__(self, name, learning_rate, size):
        self.name = name
        self.lr = np.float32(learning_rate)
        self.t = 0
        if name == "adagrad":
            self.accumulator = np.full(size, 0.1, dtype=np.float32)
        elif name == "adam":
            self.m = np.zeros(size, dtype=np.float32)
            self.v = np.zeros(size, dtype=np.float32)
        elif name != "sgd":
            raise ConfigError(f"dense optimizer {name!r} is not available in PS mode; use sgd, adagrad or adam")

    def apply(self, weights, grads):
        if self.name == "sgd":
            weights -= self.lr * grads
        elif self.name == "adagrad":
            self.accumulator += grads * grads
            weights -= self.lr * grads / np.sqrt(self.accumulator + np.float32(1e-7))
        else:
            self.t += 1
            self.m += (grads - self.m) * np.float32(0.1)
            self.v += (grads * grads - self.v) * np.float32(0.001)
            alpha = self.lr * np.float32(np.sqrt(1 - 0.999 ** self.t) / (1 - 0.9 ** self.t))
            weights -= self.m * alpha / (np.sqrt(self.v) + np.float32(1e-7))
