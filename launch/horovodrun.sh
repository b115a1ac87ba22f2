#!/bin/bash
# Start hybridps with horovodrun and the settings of `hybridps launch` (threads per rank,
# oversubscription, root, binding, Horovod stall check): a thin wrapper, all flags pass through.
#
#     launch/horovodrun.sh -np 4 -- train --steps 1000 --batch-size 4096
#     launch/horovodrun.sh -np 8 --hosts node1:4,node2:4 -- train --config my.yaml
#     launch/horovodrun.sh -np 2 --dry-run -- train        # print the command only
#     launch/horovodrun.sh -np 2 -- doctor                 # preflight check on 2 ranks
#
# Flags before `--` are those of `hybridps launch --help`; after it comes a hybridps command
# (train, doctor, bench ...) or any program. The hybridps used is $HYBRIDPS_BIN, else the one
# on PATH, else the repository's .venv next to this script. Exit code: the job's.
exec "$(dirname "${BASH_SOURCE[0]}")/_wrapper.sh" horovodrun "$@"
