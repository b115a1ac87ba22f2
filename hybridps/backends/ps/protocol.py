"""PS wire protocol: roles, message headers and tags, the dense chunking.

Every request starts with an int64 header on ``TAG_HEADER`` (so a server can take requests
from any worker in arrival order); its payload follows on dedicated tags from the same source,
which MPI delivers in order. Payloads are raw numpy buffers (hybridps.backends.ps.transport).
"""
import numpy as np

from hybridps.errors import ConfigError

TAG_HEADER, TAG_COUNTS, TAG_KEYS, TAG_ROW_GRADS, TAG_DENSE_GRADS = 101, 102, 103, 104, 105
TAG_REPLY_ROWS, TAG_REPLY_DENSE, TAG_INIT_DENSE, TAG_INIT_OPTIMIZER = 106, 107, 108, 109
# OP_CONSISTENT_POINT: a worker has pushed every step before ``step`` and waits for a
# checkpoint or delta export; when all workers sent it, the servers join that collective action.
OP_PULL, OP_PUSH, OP_DONE, OP_CONSISTENT_POINT = 1, 2, 3, 4
HEADER_LEN = 4          # [op, step, worker index, number of keys]


class PSRoles:
    """Which ranks serve and which train: servers are the last ``num_servers`` ranks."""

    def __init__(self, world_size, num_servers):
        if world_size == 1:
            raise ConfigError("config field 'mode': ps needs at least 2 ranks (the last num_servers "
                              "ranks serve, the others train) and this job has 1; start it with "
                              "mpirun -np 2 or more, or use mode=collective")
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
