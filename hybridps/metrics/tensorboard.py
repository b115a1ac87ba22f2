"""TensorBoard scalars of a run, written by rank 0 (``--tensorboard-dir``).

What lives here: :class:`TensorBoardLog`. What does not: the figures themselves (the training
loop, hybridps.metrics.summary, hybridps.evaluation).

Written, under the step they belong to:

* while training, every ``log_every`` steps: ``train/loss_rank0`` (rank 0's mean loss over the
  interval) and ``train/samples_per_s`` (rank 0's rate times the computing ranks, as the
  progress line shows it). Only rank 0's figures: anything over all ranks would need a
  collective on the training thread, which SSP/ASP's exchange thread must not meet;
* at each evaluation: ``eval/auc``, ``eval/gauc``, ``eval/logloss``, ``eval/calibration``,
  ``eval/rows`` (over all ranks, hybridps.evaluation); with several tasks ``eval/<task>/<metric>``
  for each task's metrics (``rmse``, ``mae`` of a regression task);
* at the end, from the run summary (over all ranks): ``train/loss`` and ``train/staleness_max``
  for every step (every point of the summary's curve in runs beyond its length), and under the last step ``train/auc``, ``train/samples_per_s_all_ranks``,
  ``exchange/bytes_sent_per_step``, ``exchange/bytes_received_per_step`` and
  ``train/staleness_mean``.
"""
import numpy as np

EVAL_SCALARS = ("auc", "gauc", "logloss", "calibration", "rows")
TASK_SCALARS = EVAL_SCALARS + ("rmse", "mae")


class TensorBoardLog:
    """Scalars to a TensorBoard event directory; every method is a no-op when ``path`` is None
    (the ranks other than 0)."""

    def __init__(self, tf, path):
        self.tf = tf
        self.writer = tf.summary.create_file_writer(path) if path else None
        self.interval_loss, self.interval_steps = 0.0, 0

    def _scalars(self, step, values):
        if self.writer is None:
            return
        with self.writer.as_default():
            for name, value in values.items():
                if value is not None and np.isfinite(value):
                    self.tf.summary.scalar(name, float(value), step=int(step))

    def train_step(self, step, loss, samples_per_s, log_every):
        """After step ``step`` (0-based): rank 0's mean sample loss of that step."""
        if self.writer is None:
            return
        self.interval_loss += float(loss)
        self.interval_steps += 1
        if (step + 1) % log_every == 0:
            self._scalars(step + 1, {"train/loss_rank0": self.interval_loss / self.interval_steps,
                                     "train/samples_per_s": samples_per_s})
            self.interval_loss, self.interval_steps = 0.0, 0

    def evaluation(self, step, metrics):
        self._scalars(step, {f"eval/{k}": metrics.get(k) for k in EVAL_SCALARS})
        for task, values in metrics.get("tasks", {}).items():
            self._scalars(step, {f"eval/{task}/{k}": values.get(k) for k in TASK_SCALARS})
        self.flush()

    def run_summary(self, summary):
        if self.writer is None:
            return
        for step, loss in zip(summary["loss_trajectory_steps"], summary["loss_trajectory"]):
            self._scalars(step, {"train/loss": loss})
        for step, staleness in zip(summary["loss_trajectory_steps"], summary.get("staleness_max_per_step", [])):
            self._scalars(step, {"train/staleness_max": staleness})
        exchange = summary["exchange"]
        self._scalars(summary["steps"], {
            "train/auc": summary["auc"], "train/samples_per_s_all_ranks": summary["samples_per_s"],
            "exchange/bytes_sent_per_step": exchange["bytes_sent_per_step"],
            "exchange/bytes_received_per_step": exchange["bytes_received_per_step"],
            "train/staleness_mean": summary.get("staleness_mean")})
        self.flush()

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
