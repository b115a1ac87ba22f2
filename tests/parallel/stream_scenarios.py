"""One training run on a stream, recording the rows every rank trains on, inside an MPI job:

    mpirun -np N python tests/parallel/stream_scenarios.py OUT NAME 'JSON_OVERRIDES'

Trains with ``OUT/config.yaml`` and the overrides (``data`` a stream spec, ``steps`` 0, ...),
the summary in ``OUT/NAME/metrics.json``. Before training each rank writes its pid to
``OUT/NAME/pid-<rank>`` (the tests send signals to it); after each batch it is handed, the
batch's ``group_by`` values (the schema groups by the row-id column) and its step are appended
to ``OUT/NAME/rows-<rank>.jsonl`` (flushed, so a killed job leaves what it drew). A hybridps
error ends the job as ``hybridps train`` does (printed once with the rank, then MPI_Abort).
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
    rank = trainer.rank
    with open(os.path.join(run_dir, f"pid-{rank}.tmp"), "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(os.path.join(run_dir, f"pid-{rank}.tmp"), os.path.join(run_dir, f"pid-{rank}"))
    read = trainer.dataset.iter_batches
    log = open(os.path.join(run_dir, f"rows-{rank}.jsonl"), "a")

    def logged(*args, **kwargs):
        step = kwargs.get("start_step", 0)
        for batch in read(*args, **kwargs):
            log.write(json.dumps({"step": step, "rows": [int(g) for g in batch.groups]}) + "\n")
            log.flush()
            step += 1
            yield batch

    trainer.dataset.iter_batches = logged
    trainer.run()


if __name__ == "__main__":
    from hybridps.cli import _report_and_exit
    from hybridps.errors import HybridPSError
    try:
        main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    except HybridPSError as exc:
        _report_and_exit(exc)
