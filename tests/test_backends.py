"""The Backend interface in one process: the backend the factory makes chooses the rank's loop
(the Trainer never asks whether its rank serves)."""
from hybridps.backends.base import Backend
from hybridps.backends.ps.server import PSServerBackend


def test_a_computing_rank_trains_and_a_ps_server_rank_serves():
    calls = []

    def train():
        calls.append("train")
        return "trained"

    def serve():
        calls.append("serve")
        return "served"

    assert Backend().run(train=train, serve=serve) == "trained"
    server = PSServerBackend.__new__(PSServerBackend)      # no MPI: only its choice of loop
    assert server.run(train=train, serve=serve) == "served"
    assert calls == ["train", "serve"]
    assert not hasattr(Backend, "serves") and not hasattr(PSServerBackend, "serves")
