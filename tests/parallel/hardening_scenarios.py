"""Issue 18 scenarios in one MPI job: `mpirun -np 2 python tests/parallel/hardening_scenarios.py OUT`.

skip:   the Criteo sample with malformed lines owned by both ranks, on_bad_line=skip, batch 512
        (larger than a rank's share of 100 rows): rank 0 prints one skipped-lines line and the
        small-share warning; the metrics go to OUT/skip.json.
resume: checkpoints at steps 2 and 4, rank 1's rows shard of each truncated; a resume must
        refuse on every rank with the same error and change nothing (OUT/resume-refused.json:
        the messages and whether the files stayed byte-identical); then resume_fresh sets them
        aside and trains (OUT/resume-fresh.json: the directory listing after it).
tests/test_parallel_hardening.py checks them.
"""
import hashlib
import json
import os
import sys

from hybridps import comm as comm_module
from hybridps.config import make_config
from hybridps.data import SAMPLE_CRITEO_CSV
from hybridps.errors import CheckpointError
from hybridps.trainer import Trainer
from hybridps.tf_runtime import skip_keras_optional_imports

skip_keras_optional_imports()      # as hybridps train does: Keras starts without pandas, sklearn, matplotlib

COMMON = {"model": "deepfm", "batch_size": 16, "dim": 4, "hidden": [8], "seed": 3,
          "warmup_steps": 1, "progress": False, "steps": 4}
BAD_LINES = (3, 4, 10, 51, 52)          # physical lines (line 1 is the header): both ranks own some


def snapshot(root):
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main(out_dir):
    comm = comm_module.init(with_horovod=True)
    bad = os.path.join(out_dir, "bad.csv")
    if comm.rank == 0:
        lines = open(SAMPLE_CRITEO_CSV).read().splitlines()
        for number in BAD_LINES:
            lines[number - 1] = "7" + lines[number - 1][1:]
        with open(bad, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    comm.barrier()
    Trainer(make_config(overrides=dict(COMMON, data=bad, on_bad_line="skip", batch_size=512, steps=2,
                                       metrics_out=os.path.join(out_dir, "skip.json"))), comm=comm).run()
    sys.stderr.flush()

    root = os.path.join(out_dir, "ckpt")
    Trainer(make_config(overrides=dict(COMMON, checkpoint_dir=root, checkpoint_every=2)), comm=comm).run()
    comm.barrier()
    if comm.rank == 0:
        for step in (2, 4):
            rows = os.path.join(root, f"ckpt-{step:010d}", "table-000.rank-00001.rows")
            with open(rows, "r+b") as fh:
                fh.truncate(os.path.getsize(rows) - 5)
    comm.barrier()
    before = snapshot(root)
    try:
        Trainer(make_config(overrides=dict(COMMON, steps=6, checkpoint_dir=root, checkpoint_every=2,
                                           resume=True)), comm=comm)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    messages = comm.allgather_object(message)
    if comm.rank == 0:
        with open(os.path.join(out_dir, "resume-refused.json"), "w") as fh:
            json.dump({"messages": messages, "unchanged": snapshot(root) == before,
                       "before": sorted(before)}, fh)
    comm.barrier()
    summary = Trainer(make_config(overrides=dict(COMMON, steps=6, checkpoint_dir=root, checkpoint_every=2,
                                                 resume=True, resume_fresh=True)), comm=comm).run()
    if comm.rank == 0:
        aside = {name: value for name, value in snapshot(root).items() if name.startswith("damaged-")}
        with open(os.path.join(out_dir, "resume-fresh.json"), "w") as fh:
            json.dump({"listing": sorted(os.listdir(root)), "first_step": summary["first_step"],
                       "aside_unchanged": {k.replace("damaged-", "", 1): v for k, v in aside.items()}
                       == {k: v for k, v in before.items() if k != "latest"}}, fh)
    comm.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
