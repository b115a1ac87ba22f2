"""hybridps.serving: ``hybridps serve``, the model of an export directory kept current.

* :mod:`follower`: which export to apply next (full exports, deltas, refusals);
* :mod:`live`: the model worker (batched predictions, atomic version swaps) and the follower
  thread;
* :mod:`inputs`: raw feature values -> the serving module's inputs;
* :mod:`server`: TF Serving's REST API, Prometheus metrics, the command (aiohttp).
"""
from hybridps.serving.follower import ExportFollower, Refusal, ServedVersion
from hybridps.serving.inputs import request_columns, serving_inputs

__all__ = ["ExportFollower", "Refusal", "ServedVersion", "request_columns", "serving_inputs"]
