"""Testing aids: a failure or a slow data loader injected into a training run.

hybridps's own tests and benchmarks use these to play a rank that raises mid-run or a
straggler; they are not user configuration (no config field, flag or YAML key). They are read
from environment variables once, at the first :func:`active` call of the process:

- ``HYBRIDPS_TEST_FAIL_AT_STEP=N`` with ``HYBRIDPS_TEST_FAIL_RANK=R`` (default 0): rank R raises
  a RuntimeError when its training loop reaches step N;
- ``HYBRIDPS_TEST_LOADER_DELAY_MS=MS`` with ``HYBRIDPS_TEST_DELAY_RANK=R``: rank R's data
  loader sleeps MS milliseconds before every batch.

:func:`environment` writes them for a job to be launched; :func:`use` sets them for the rest of
a process (a test scenario training several runs in one process). Unset, the trainer's loop
runs unchanged: :func:`failing_steps` and :func:`delayed_batches` return what they are given.
"""
import dataclasses
import os
import time

from hybridps.errors import ConfigError

_VARIABLES = {"fail_at_step": "HYBRIDPS_TEST_FAIL_AT_STEP", "fail_rank": "HYBRIDPS_TEST_FAIL_RANK",
              "loader_delay_ms": "HYBRIDPS_TEST_LOADER_DELAY_MS", "delay_rank": "HYBRIDPS_TEST_DELAY_RANK"}


@dataclasses.dataclass(frozen=True)
class TestingHooks:
    """The injected failure (``fail_at_step`` on ``fail_rank``; -1: none) and the slow loader
    (``loader_delay_ms`` on ``delay_rank``; 0: none)."""
    __test__ = False                       # not a pytest test class
    fail_at_step: int = -1
    fail_rank: int = 0
    loader_delay_ms: float = 0.0
    delay_rank: int = -1


def from_environment(environ=None):
    """The TestingHooks the ``HYBRIDPS_TEST_*`` variables set (unset: none).

    Raises:
        ConfigError: a variable that is not a number of the right kind, naming it.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(TestingHooks):
        text = environ.get(_VARIABLES[field.name], "").strip()
        if not text:
            continue
        try:
            values[field.name] = field.type(text) if field.type is float else int(text)
        except ValueError:
            raise ConfigError(f"environment variable {_VARIABLES[field.name]} (a testing aid) must "
                              f"be {'a number' if field.type is float else 'an integer'}, "
                              f"got {text!r}") from None
    hooks = TestingHooks(**values)
    if hooks.loader_delay_ms < 0:
        raise ConfigError(f"environment variable HYBRIDPS_TEST_LOADER_DELAY_MS (a testing aid) must "
                          f"be milliseconds >= 0, got {hooks.loader_delay_ms:g}")
    return hooks


_active = None


def active():
    """This process's TestingHooks: the environment's, read at the first call, or :func:`use`'s."""
    global _active
    if _active is None:
        _active = from_environment()
    return _active


def use(hooks=None, **values):
    """Set this process's hooks (a TestingHooks, or its fields); ``use()`` clears them."""
    global _active
    _active = hooks if hooks is not None else TestingHooks(**values)


def environment(**values):
    """{variable: text} setting the given hooks for a job to be launched, e.g.
    ``environment(fail_at_step=5, fail_rank=1)``."""
    return {_VARIABLES[name]: f"{value:g}" if isinstance(value, float) else str(value)
            for name, value in values.items()}


def check_job(world_size, data_ranks, hooks=None):
    """Raise ConfigError for a hook that names a rank this job does not have (or that would do
    nothing on it); ``data_ranks`` are the ranks that train (all, or the PS workers)."""
    h = active() if hooks is None else hooks
    workers = f"0..{data_ranks - 1}" if data_ranks > 1 else "0"
    if h.loader_delay_ms > 0 or h.delay_rank != -1:
        if not 0 <= h.delay_rank < data_ranks:
            raise ConfigError(
                f"testing aid 'delay_rank': {h.delay_rank} is not a training rank of this "
                f"{world_size}-rank job (allowed: {workers}); it names the rank whose data loader "
                f"loader_delay_ms (now {h.loader_delay_ms:g}) slows (HYBRIDPS_TEST_DELAY_RANK, "
                f"HYBRIDPS_TEST_LOADER_DELAY_MS)")
    if h.fail_at_step >= 0 and not 0 <= h.fail_rank < data_ranks:
        what = ("a parameter server: the failure is injected in the training loop of the workers"
                if data_ranks <= h.fail_rank < world_size else f"not a rank of this {world_size}-rank job")
        raise ConfigError(f"testing aid 'fail_rank': rank {h.fail_rank} is {what} (allowed: {workers}); "
                          f"it is set by HYBRIDPS_TEST_FAIL_RANK")


def failing_steps(steps, rank):
    """``steps`` (the loop's step numbers), raising a RuntimeError before the injected failure's
    step on its rank; ``steps`` itself when no failure is injected here."""
    h = active()
    if h.fail_at_step < 0 or rank != h.fail_rank:
        return steps
    return _failing(steps, h.fail_at_step, rank)


def _failing(steps, fail_at_step, rank):
    for step in steps:
        if step == fail_at_step:
            raise RuntimeError(f"injected failure at step {step} on rank {rank} "
                               f"(fail_at_step testing aid, HYBRIDPS_TEST_FAIL_AT_STEP)")
        yield step


def delayed_batches(batches, rank):
    """``batches``, each after the injected loader delay on its rank; ``batches`` itself when no
    delay is injected here."""
    h = active()
    if h.loader_delay_ms <= 0 or rank != h.delay_rank:
        return batches
    return _delayed(batches, h.loader_delay_ms / 1000.0)


def _delayed(batches, seconds):
    for batch in batches:
        time.sleep(seconds)
        yield batch
