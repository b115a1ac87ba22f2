"""Sharded, atomic, checksummed checkpoints; restore onto any world size; inspection.

The package (re-exported here):

* :mod:`files`: atomic files, fsync, checksummed (optionally signed) manifests, the collective
  atomic directory;
* :mod:`format`: names, record layout, manifest, model signature, the schema of a checkpoint;
* :mod:`writer`: :func:`save_checkpoint` (collective: every rank writes its own shards);
* :mod:`reader`: :func:`restore_checkpoint` (collective: every rank reads only the buckets it
  owns under the new world size), :func:`verify_checkpoint`, :func:`read_table_rows`;
* :mod:`manager`: :class:`CheckpointManager` (save a backend's state, resume into one: it never
  sees a Trainer), :func:`find_resume_point`, damaged checkpoints set aside;
* :mod:`lock`: one job per checkpoint directory (an exclusive lock naming its holder);
* :mod:`inspect`: ``hybridps inspect``.

What does not live here: the SavedModel / delta export (hybridps.export, built on these
functions), MPI itself (a ``comm`` object is passed in: hybridps.comm.Comm, or
hybridps.comm.SingleProcessComm), the step loop (hybridps.trainer).

Directory layout (docs/design.md, Checkpoints and export)::

    ROOT/latest                         "ckpt-0000000100\\n" (replaced atomically, last)
    ROOT/ckpt-0000000100/manifest.json  written by rank 0 after every rank's files are on disk
        table-000.rank-00001.rows       rank 1's rows of table 0, sorted by (bucket, key)
        table-000.rank-00001.cands      rank 1's not-yet-admitted keys (min_count), same order
        table-000.rank-00001.index.npz  per bucket: row/candidate offsets and CRC32
        rank-00001.state.json           rank 1's data position, numpy RNG state, table counters
        dense.npz                       rank 0: model variables and dense optimizer variables

Ownership and buckets. Every key has a virtual bucket ``bucket(key) = mix64(key) %
num_buckets``; ``num_buckets`` is fixed when the tables are created (config.num_buckets) and
recorded in the manifest. The owner rank of a key is a function of its bucket::

    owner(key) = (mix64(key) % num_buckets) % world_size

so that a whole bucket always belongs to one rank, for every world size. A restoring rank
``r`` of ``W'`` reads exactly the buckets ``b`` with ``b % W' == r`` from every saved shard
(about 1/W' of the bytes) and needs no filtering. The alternative, keeping ``mix64(key) %
world_size`` and filtering rows by owner, only reads 1/W' when ``W'`` divides
``num_buckets``; for ``W' = 3`` and 4096 buckets every rank would read everything. When
``world_size`` divides ``num_buckets`` (powers of two with the default 4096) both functions
give the same owner, so the change is visible only for other world sizes.
hybridps.sparse.routing.owner_ranks is the one owner function (the exchange routes by it);
:meth:`CheckpointManager.resume` refuses to continue if restored rows sit elsewhere. Balance: a rank
owns floor or ceil of num_buckets / world_size buckets, so with 4096 buckets the largest share
is within 1.6% of the mean up to 64 ranks; larger jobs should use num_buckets >= 64 x ranks
(fixed for the life of the model, so choose it for the largest job it will ever run on).

Row records. A shard's ``.rows`` file is a packed array of records ``{key int64, hits int64,
last_update_step int64, update_count int64, row float32[row_width]}`` where ``row`` is the
table's own row ``[value | optimizer slot 0 | slot 1]``: a value is never paired with slots
from another moment. Records are sorted by (bucket, key), so a bucket is one contiguous byte
range and the same table state always gives the same bytes. ``.cands`` holds ``{key, hits}``
of candidates. The index holds, per bucket, the record offset (``num_buckets + 1`` cumulative
counts) and the CRC32 of the bucket's bytes, for rows and candidates.

Atomicity. Every rank writes into ``ROOT/.tmp-ckpt-<step>`` and fsyncs each file; the ranks
gather their file lists (name, sha256, bytes); rank 0 writes ``manifest.json`` (with a sha256
of its own canonical JSON, and an HMAC signature when ``HYBRIDPS_SIGNING_KEY_FILE`` names a
key: hybridps.checkpoint.files), fsyncs it and the directory, renames the directory to
``ckpt-<step>``, fsyncs ROOT, then replaces ``latest`` (``latest.tmp`` + fsync + os.replace)
and only then deletes checkpoints beyond the newest ``keep``. A crash at any point leaves
either no ``ckpt-<step>`` (a ``.tmp-`` directory that the next job deletes) or a complete
one; ``latest`` always names a complete checkpoint. A save that fails (a full disk) removes its
``.tmp-`` directory itself. One job per directory: rank 0 holds ``ROOT/.hybridps.lock``
(:mod:`lock`) for the life of the job, so a second job stops before training.

Verification. The manifest holds a sha256 and size per file. A restore checks the manifest's
own sha256, the model signature (model kind and shapes, field groups, optimizers,
num_buckets), each file's presence and size, the sha256 of every small file it reads whole
(index, dense, state) and the CRC32 of every bucket it reads; a restoring rank reads 1/W' of
the data, so hashing whole data files would defeat the point, but the ranks together read
every bucket, so together they check every byte. :func:`verify_checkpoint` with
``level="full"`` (used by ``hybridps inspect``) re-hashes every file with sha256. Verification
of every rank is agreed collectively before any table is touched, so a damaged checkpoint
leaves the tables empty and :meth:`CheckpointManager.resume` can try the next older one.

Per-rank state on another world size. Rank ``r`` of ``W'`` gets the data position of saved
rank ``r % W`` (the datasets' ``restore`` handles a changed world size: the synthetic
generator's position is the same on every rank, the Criteo reader uses its global offset) and
the RNG state of saved rank ``r`` (rank 0's for new ranks). Table counters (evictions,
admissions, ...) cannot be set through the table API; they come back in the report: per rank
with the saved world size, as totals on rank 0 otherwise, so sums over ranks are unchanged.

Memory: a save holds one table export plus one 16 MiB chunk of records at a time; a restore
holds this rank's records and their column copies (about 3x its share) until they are imported.
"""
from hybridps.checkpoint.files import CheckpointMismatchError, manifest_json_bytes
from hybridps.checkpoint.format import (CheckpointInfo, ResumePoint, RestoreReport, checkpoint_name,
                                        list_checkpoints, model_signature, row_record_dtype,
                                        schema_of, signature_hash)
from hybridps.checkpoint.inspect import add_inspect_arguments, inspect_checkpoint
from hybridps.checkpoint.manager import (CheckpointManager, check_routing, find_resume_point,
                                         resume_candidates, set_aside_damaged)
from hybridps.checkpoint.reader import (NO_SHARD, load_manifest, read_dense, read_table_rows,
                                        resolve_checkpoint, restore_checkpoint, verify_checkpoint)
from hybridps.checkpoint.writer import save_checkpoint

__all__ = ["CheckpointInfo", "CheckpointManager", "CheckpointMismatchError", "NO_SHARD",
           "ResumePoint", "RestoreReport", "add_inspect_arguments", "check_routing",
           "checkpoint_name", "find_resume_point", "inspect_checkpoint", "list_checkpoints",
           "load_manifest", "model_signature", "read_dense", "read_table_rows",
           "resolve_checkpoint", "restore_checkpoint", "resume_candidates", "row_record_dtype",
           "save_checkpoint", "schema_of", "set_aside_damaged", "signature_hash",
           "manifest_json_bytes", "verify_checkpoint"]
