"""One training run on a stream with wall-clock delta exports, inside an MPI job:

    mpirun -np N python tests/parallel/realtime_scenarios.py OUT NAME 'JSON_OVERRIDES'

Trains with ``OUT/config.yaml`` and the overrides (``data`` a stream spec, ``steps`` 0,
``delta_export_dir``, ``delta_every_seconds`` ...), the summary in ``OUT/NAME/metrics.json``.
Before training each rank writes its pid to ``OUT/NAME/pid-<rank>`` (written under another name,
then renamed), so the test knows the job is about to train and whom to signal.
"""
import json
import os
import sys

from hybridps.config import make_config
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib


def main(out, name, overrides):
    from hybridps.trainer import Trainer
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    settings = dict(dict(progress=True, log_every=1, metrics_out=os.path.join(run_dir, "metrics.json")),
                    **overrides)
    trainer = Trainer(make_config(os.path.join(out, "config.yaml"), settings))
    pid_file = os.path.join(run_dir, f"pid-{trainer.rank}")
    with open(pid_file + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    trainer.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
