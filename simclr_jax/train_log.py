"""Run outputs in the workdir: the per-step loss history, its plot, and TensorBoard scalars."""

import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HISTORY_FIELDS = ("step", "epoch", "loss", "contrastive_accuracy", "learning_rate")


class LossHistory:
  """`<workdir>/loss_history.csv`, one row per optimiser step, kept consistent across resumes."""

  def __init__(self, workdir: str, *, resume_step: int):
    """Opens the history; rows from steps after `resume_step` (lost with the crash) are dropped."""
    self.path = os.path.join(workdir, "loss_history.csv")
    self.rows: list[dict[str, float]] = []
    if os.path.exists(self.path):
      with open(self.path, newline="") as f:
        for row in csv.DictReader(f):
          if int(row["step"]) <= resume_step:
            self.rows.append({k: float(v) for k, v in row.items()})
    with open(self.path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
      writer.writeheader()
      writer.writerows(self._formatted(self.rows))

  @staticmethod
  def last_row(workdir: str) -> dict[str, float]:
    """The last row of `<workdir>/loss_history.csv` ({} when there is none); read only."""
    path = os.path.join(workdir, "loss_history.csv")
    if not os.path.exists(path):
      return {}
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}

  @staticmethod
  def _formatted(rows):
    return [
      {k: (int(r[k]) if k in ("step", "epoch") else r[k]) for k in HISTORY_FIELDS} for r in rows
    ]

  def append(self, rows: list[dict[str, float]]) -> None:
    """Adds `rows` (one dict per logged step, keys `HISTORY_FIELDS`) to memory and the CSV."""
    self.rows.extend(rows)
    with open(self.path, "a", newline="") as f:
      csv.DictWriter(f, fieldnames=HISTORY_FIELDS).writerows(self._formatted(rows))

  def plot(self, path: str) -> None:
    """Writes the loss curve (per step, and its per-epoch mean) as a PNG, atomically."""
    if not self.rows:
      return
    steps = [r["step"] for r in self.rows]
    loss = [r["loss"] for r in self.rows]
    epochs: dict[int, list[float]] = {}
    for r in self.rows:
      epochs.setdefault(int(r["epoch"]), []).append(r["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="per step")
    last_step = {}
    for r in self.rows:
      last_step[int(r["epoch"])] = r["step"]
    ax.plot(
      [last_step[e] for e in epochs],
      [sum(v) / len(v) for v in epochs.values()],
      lw=1.5,
      label="epoch mean",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("SimCLR pretraining loss")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class ScalarWriter:
  """TensorBoard scalars through tf.summary (under `<workdir>/tensorboard`)."""

  def __init__(self, workdir: str):
    import tensorflow as tf

    self._tf = tf
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """One tf.summary scalar per `scalars` entry (name -> float) at `step` (int)."""
    with self._writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.scalar(name, value, step=step)

  def close(self) -> None:
    """Flushes and closes the event file."""
    self._writer.flush()
    self._writer.close()
