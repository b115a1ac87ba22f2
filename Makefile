# hybridps: one-command setup, tests and the demo job.
#
#   make demo    short 2-rank training run on synthetic data (sets everything up first)
#   make test-fast  the tests that start no MPI job, test bed, Slurm or extra hybridps process
#   make test    the whole test suite (sets everything up first, including the Slurm and
#                munge packages that tests/test_slurm.py starts a single-node Slurm from, and
#                iproute2 for the network-namespace hosts of tests/test_multihost.py, and
#                redis-server for the Redis stream tests)
#   make docs    the documentation site (MkDocs, docs/ -> site/); make test builds it --strict
#   make docs-reference   regenerate docs/configuration.md from the fields of hybridps/config.py
#   make setup   Open MPI (from apt, only when no mpicc is on PATH), .venv, pinned Python
#                packages from requirements.txt, Horovod built against this MPI and TF
#                (wheel cached in $(WHEEL_CACHE)), hybridps in editable mode.
#   make test-compat   the fast tests on the TensorFlow 2.15 stack (make test-fast TF=2.15)
#
# Two TensorFlow stacks are supported (docs/getting-started.md): the default TF 2.18 (Keras 3,
# numpy 2; requirements.txt, environment .venv) and TF 2.15 (Keras 2, numpy 1.26;
# requirements-tf2.15.txt, environment .venv-tf2.15). Pick one with TF=, e.g. `make setup TF=2.15`,
# `make test-fast TF=2.15`. VENV= overrides the environment's directory.
#
# Idempotent: each step leaves a stamp in $(VENV)/.stamps and reruns only when its inputs change.

SHELL := /bin/bash
PYTHON ?= python3
DEFAULT_TF := 2.18
TF ?= $(DEFAULT_TF)
REQUIREMENTS := $(if $(filter $(DEFAULT_TF),$(TF)),requirements.txt,requirements-tf$(TF).txt)
VENV ?= $(if $(filter $(DEFAULT_TF),$(TF)),.venv,.venv-tf$(TF))
ifeq ($(wildcard $(REQUIREMENTS)),)
$(error TF=$(TF): no $(REQUIREMENTS); the supported stacks are TF=$(DEFAULT_TF) (requirements.txt) and TF=2.15)
endif
VPY := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
HOROVOD_PIN := $(shell grep -E '^horovod==' $(REQUIREMENTS))
TF_PIN := $(shell grep -E '^tensorflow-cpu==' $(REQUIREMENTS))
# Keyed on the Horovod and TensorFlow pins: a Horovod wheel only runs with the TF it was built against.
WHEEL_CACHE ?= $(HOME)/.cache/hybridps/wheels/$(subst ==,-,$(HOROVOD_PIN))_$(subst ==,-,$(TF_PIN))
# Oversubscribed multi-rank runs on few cores (see docs/clusters.md, "Running on a small machine").
export OMPI_MCA_mpi_yield_when_idle := 1
export OMP_NUM_THREADS := 1
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export HYBRIDPS_TF_THREADS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# slurmctld, slurmd and munged live in sbin, which a non-login root shell may lack
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: setup test test-fast test-compat demo bench clean mpi slurm testbed redis docs docs-reference
setup: $(STAMPS)/hybridps

mpi:
	@if command -v mpicc >/dev/null 2>&1; then \
	  echo "setup: using the MPI on PATH: $$(command -v mpicc)"; \
	else \
	  echo "setup: no mpicc on PATH, installing Open MPI from apt"; \
	  if [ "$$(id -u)" != 0 ]; then echo "setup: need root for apt-get; install Open MPI (or 'module load' one) and rerun" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null; \
	fi

# Daemons for tests/test_slurm.py, which starts a single-node Slurm itself (skipped without them).
slurm:
	@if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && \
	    command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then \
	  echo "setup: Slurm and munge present: $$(command -v slurmctld)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "setup: Slurm/munge missing and not root: tests/test_slurm.py will be skipped" >&2; \
	else \
	  echo "setup: installing Slurm and munge from apt (slurmctld slurmd slurm-client munge)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; \
	fi

# Tools of the network-namespace test bed (launch/testbed/netns.py) that tests/test_multihost.py
# and `hybridps bench scale` build their hosts with (the tests skip without them or without root).
testbed:
	@if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1; then \
	  echo "setup: ip, tc, unshare and nsenter present: $$(command -v ip)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "setup: ip/tc/unshare/nsenter missing and not root: tests/test_multihost.py will be skipped" >&2; \
	else \
	  echo "setup: installing iproute2 and util-linux from apt (the test bed's ip, tc, unshare, nsenter)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null; \
	fi

# redis-server for the Redis Streams source (hybridps.data.stream) that tests/test_streaming.py
# starts itself on a loopback port (the tests skip without it).
redis:
	@if command -v redis-server >/dev/null 2>&1; then \
	  echo "setup: redis-server present: $$(command -v redis-server)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "setup: redis-server missing and not root: the Redis stream tests will be skipped" >&2; \
	else \
	  echo "setup: installing redis-server from apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	fi

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/requirements: $(REQUIREMENTS) $(STAMPS)/venv | mpi
	$(VPY) -m pip install -q --upgrade pip
	grep -v -E '^horovod==' $(REQUIREMENTS) > $(VENV)/requirements-base.txt
	MPICC=$$(command -v mpicc) $(VPY) -m pip install -q -r $(VENV)/requirements-base.txt
	touch $@

# --no-cache-dir: pip's own wheel cache is not keyed on TensorFlow, so it could hand back a
# Horovod built against another TF stack. --force-reinstall: an environment moved to another TF
# pin already holds a horovod of the same version, built against the old TF.
$(STAMPS)/horovod: $(STAMPS)/requirements
	@if ! ls $(WHEEL_CACHE)/horovod-*.whl >/dev/null 2>&1; then \
	  echo "setup: building $(HOROVOD_PIN) against $$(command -v mpicc) and $(TF_PIN) (a few minutes, cached in $(WHEEL_CACHE))"; \
	  mkdir -p $(WHEEL_CACHE) && \
	  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1 \
	  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2 \
	  $(VPY) -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps -w $(WHEEL_CACHE) "$(HOROVOD_PIN)"; \
	fi
	$(VPY) -m pip install -q --no-deps --force-reinstall $(WHEEL_CACHE)/horovod-*.whl
	touch $@

$(STAMPS)/hybridps: $(STAMPS)/horovod setup.py $(wildcard cython/*.pyx cython/*.pxd)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: setup slurm testbed redis
	$(VENV)/bin/pytest -q --durations=25 tests

# The markers are registered in pytest.ini; tests/conftest.py fails a test that starts MPI unmarked.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not mpi and not netns and not slurm and not slow" tests

# The fast tests on the TensorFlow 2.15 stack (its own environment, .venv-tf2.15); .ci/run calls it.
test-compat:
	$(MAKE) test-fast TF=2.15

demo: setup
	mpirun -np 2 --oversubscribe --bind-to none $(VENV)/bin/hybridps train --model deepfm \
	  --data synthetic --steps 60 --batch-size 2048 --metrics-out demo-metrics.json

bench: setup
	$(VENV)/bin/hybridps bench table --out bench-results
	$(VENV)/bin/hybridps bench train --out bench-results

docs: setup
	$(VENV)/bin/mkdocs build --strict

docs-reference: setup
	$(VPY) -m hybridps.config_reference > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf site build hybridps/*.so cython/*.c cython/*.cpp
