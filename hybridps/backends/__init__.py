"""hybridps.backends: where parameters live, behind one interface the Trainer talks to.

* :mod:`base`: the Backend base class and BackendState (what checkpoints save);
* :mod:`factory`: the only switch on mode and sync (``make_backend``, ``placement``,
  ``communication``);
* :mod:`collective`: BSP (:mod:`collective.bsp`) and pipelined SSP/ASP
  (:mod:`collective.pipeline`) over the sharded tables and Horovod;
* :mod:`ps`: the parameter-server mode (server, worker, transport) for comparisons.
"""
from hybridps.backends.base import Backend, BackendState
from hybridps.backends.factory import communication, make_backend, placement

__all__ = ["Backend", "BackendState", "communication", "make_backend", "placement"]
