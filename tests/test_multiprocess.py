"""Several processes: 2 processes x 2 CPU devices compute what 1 process x 4 devices computes.

Each test starts real processes on this host (`jax.distributed` over localhost, gloo
collectives), each with 2 CPU devices, under a hard time limit after which all of them are
killed. Augmentation is on throughout: an image gets the same views in 1 and 2 processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import multiprocess_worker
import numpy as np
import pytest
from test_train import make_folder, tiny_config

from simclr_jax import checkpoint, parallel, train
from simclr_jax.probe import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 300  # per launch: a run that hangs fails the test instead of the CI job


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_processes(tmp_path, name: str, commands: list[list[str]], **env) -> list[str]:
  """Starts `commands` together (one process each), waits for all; returns their outputs.

  Fails the test if one exits non-zero, or if any is still running after LIMIT_S seconds (then
  every one of them is killed first).
  """
  environment = dict(os.environ, **env)
  environment.pop("XLA_FLAGS", None)  # each process sets its own device count
  logs = [tmp_path / f"{name}{i}.log" for i in range(len(commands))]
  procs = []
  for command, log in zip(commands, logs, strict=True):
    with open(log, "w") as f:
      procs.append(
        subprocess.Popen(
          command,
          cwd=REPO,
          env=environment,
          stdout=f,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
  deadline = time.monotonic() + LIMIT_S
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    hung = [p.poll() is None for p in procs]
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outputs = [log.read_text() for log in logs]
  if any(hung) or any(p.returncode for p in procs):
    what = f"still running after {LIMIT_S} s" if any(hung) else "failed"
    tails = "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    pytest.fail(f"{name}: {what} (exit codes {[p.returncode for p in procs]})\n{tails}")
  return outputs


def _multihost_flags(port: int, process_id: int) -> list[str]:
  return [
    "--multihost",
    f"--coordinator_address=localhost:{port}",
    "--num_processes=2",
    f"--process_id={process_id}",
  ]


def _pretrain_two_processes(tmp_path, name, workdir, data_root) -> list[str]:
  port = _free_port()
  commands = [
    [
      sys.executable,
      os.path.join(REPO, "run_pretrain.py"),
      f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
      f"--workdir={workdir}",
      f"--config.data.root={data_root}",
      "--config.runtime.num_cpu_devices=2",
      *_multihost_flags(port, i),
    ]
    for i in range(2)
  ]
  return _run_processes(tmp_path, name, commands)


def _history(workdir) -> np.ndarray:
  return np.loadtxt(os.path.join(workdir, "loss_history.csv"), delimiter=",", skiprows=1)


def _assert_same_checkpoint(workdir_a, workdir_b, step=None):
  a, b = checkpoint.load_pretrained(workdir_a, step), checkpoint.load_pretrained(workdir_b, step)
  assert a.step == b.step
  leaves_a = jax.tree_util.tree_leaves((a.params, a.batch_stats))
  leaves_b = jax.tree_util.tree_leaves((b.params, b.batch_stats))
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- parallel's pieces


def test_example_ids_follow_the_pipeline_layout_on_one_process():
  np.testing.assert_array_equal(parallel.example_ids(16), np.arange(16).reshape(4, 4))
  with pytest.raises(ValueError, match="batch_size=10"):
    parallel.example_ids(10)
  parallel.sync_processes("nothing to wait for", timeout_s=1)  # one process: returns at once


def test_unreplicate_reads_the_first_replica_to_the_host():
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
  replicated = parallel.replicate(tree)
  assert replicated["w"].shape == (4, 2, 3)
  back = parallel.unreplicate(replicated)
  assert isinstance(back["w"], np.ndarray) and back["w"].dtype == np.float32
  np.testing.assert_array_equal(back["w"], tree["w"])
  assert back["step"].shape == () and back["step"] == 7


def test_watchdog_stops_a_stuck_process_with_its_stacks():
  with parallel.watchdog(60, "a prompt block"):
    pass  # returns at once, and so does its thread
  code = (
    "import time\nfrom simclr_jax import parallel\n"
    "with parallel.watchdog(1, 'Saving the checkpoint of step 7'):\n  time.sleep(60)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == parallel.WATCHDOG_EXIT_CODE
  assert "Saving the checkpoint of step 7 did not finish within 1 s on process 0 of 1" in (
    result.stderr
  )
  assert 'File "<string>", line 4 in <module>' in result.stderr  # the stuck thread's stack


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_root):
  """configs/tiny.py for 2 epochs (4 steps of 16 pairs) in this process, on its 4 devices."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  train.pretrain(tiny_config(data_root), workdir)
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_root):
  """The same run as `one_process`, by run_pretrain.py in 2 processes x 2 devices."""
  tmp = tmp_path_factory.mktemp("two_processes")
  workdir = str(tmp / "run")
  return workdir, _pretrain_two_processes(tmp, "pretrain", workdir, data_root)


def test_two_processes_train_as_one(one_process, two_processes):
  workdir, outputs = two_processes
  np.testing.assert_allclose(_history(workdir), _history(one_process), rtol=1e-5)
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["2", "4"]
  _assert_same_checkpoint(workdir, one_process)
  # Both processes end with the run's summary (the second used to print nan).
  final_loss = _history(workdir)[-1, 2]
  for out in outputs:
    assert f"Pretraining finished at step 4 (epoch 2): loss {final_loss:.4f}," in out


def test_two_processes_resume_as_uninterrupted(two_processes, tmp_path, data_root):
  """A crash after epoch 1 (only its checkpoint survives); rerunning in 2 processes ends where the
  uninterrupted 2-process run ended."""
  full, _ = two_processes
  resumed = str(tmp_path / "resumed")
  os.makedirs(checkpoint.checkpoint_dir(resumed))
  os.symlink(
    os.path.join(checkpoint.checkpoint_dir(full), "2"),
    os.path.join(checkpoint.checkpoint_dir(resumed), "2"),
  )
  outputs = _pretrain_two_processes(tmp_path, "resume", resumed, data_root)
  for out in outputs:
    assert "Resuming from the checkpoint of step 2" in out
  _assert_same_checkpoint(resumed, full)
  np.testing.assert_allclose(_history(resumed), _history(full)[2:], rtol=1e-5)


def test_run_linear_in_two_processes_as_in_one(two_processes, tmp_path):
  workdir, _ = two_processes
  probe = ["--label_fraction=0.25", "--probe_c=1", "--conv_impl=xla"]  # 2 labels per class
  one = evaluate.run_linear_probe(
    workdir, label_fraction=0.25, probe_c=1.0, conv_impl="xla", output_dir=str(tmp_path / "one")
  )
  port = _free_port()
  commands = [
    [
      sys.executable,
      os.path.join(REPO, "run_linear.py"),
      f"--workdir={workdir}",
      f"--output_dir={tmp_path / 'two'}",
      *probe,
      *_multihost_flags(port, i),
    ]
    for i in range(2)
  ]
  _run_processes(tmp_path, "linear", commands, JAX_NUM_CPU_DEVICES="2")
  with open(tmp_path / "two" / "results.json") as f:
    two = json.load(f)
  assert two["settings"]["num_train"] == one["settings"]["num_train"] == 32
  assert two["top1"] == one["top1"]
  assert two["knn"] == one["knn"]
  assert two["confusion_matrix"] == one["confusion_matrix"]


def test_same_views_and_features_on_1_and_4_devices_and_2_processes(tmp_path, data_root):
  """Each image's crops and augmented views are the same on 1 device, 4 devices and 2 processes
  (keyed by its index in the global batch, not by its device), and the probe's features come
  back in the same order."""
  port = _free_port()
  worker = os.path.join(REPO, "tests", "multiprocess_worker.py")
  commands = [
    [sys.executable, worker, str(tmp_path), data_root, f"localhost:{port}", "2", str(i)]
    for i in range(2)
  ]
  _run_processes(tmp_path, "worker", commands)
  config = multiprocess_worker.config_for(data_root)
  runs = {
    "4 devices": multiprocess_worker.first_batch_views(config),
    "1 device": multiprocess_worker.first_batch_views(config, jax.local_devices()[:1]),
  }
  processes = [dict(np.load(tmp_path / f"views{i}.npz")) for i in range(2)]
  # Process h holds every other example of the global batch, starting at h.
  for h, views in enumerate(processes):
    np.testing.assert_array_equal(views["example_id"], np.arange(h, 16, 2))
  runs["2 processes"] = {k: np.concatenate([p[k] for p in processes]) for k in processes[0]}
  by_id = {
    name: {k: v[np.argsort(run["example_id"])] for k, v in run.items()}
    for name, run in runs.items()
  }
  reference = by_id["4 devices"]
  np.testing.assert_array_equal(reference["example_id"], np.arange(16))
  for name in ("1 device", "2 processes"):
    np.testing.assert_array_equal(by_id[name]["crop1"], reference["crop1"], err_msg=name)
    np.testing.assert_array_equal(by_id[name]["crop2"], reference["crop2"], err_msg=name)
    for view in ("view1", "view2"):
      np.testing.assert_allclose(by_id[name][view], reference[view], atol=1e-6, err_msg=name)
  # The views are augmented: not the crops, and two images' draws differ.
  assert np.abs(reference["view1"] - reference["crop1"]).max() > 0.1
  assert not np.allclose(reference["view1"][0], reference["view1"][1])

  saved = np.load(tmp_path / "features.npz")
  h, labels = multiprocess_worker.train_features(config)
  np.testing.assert_array_equal(saved["labels"], labels)
  np.testing.assert_allclose(saved["h"], h, rtol=1e-5, atol=1e-6)
