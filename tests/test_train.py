"""Training: 1 device == 4 devices, synced BN, resume == uninterrupted, NaN stop, the CLI."""

import functools
import logging
import os
import subprocess
import sys

import image_trees
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from simclr_jax import checkpoint, losses, models, optim, parallel, train
from simclr_jax.data import resolution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "stripes", "noise")


def _shape_image(kind: str, rng: np.random.Generator, size=(40, 36)) -> Image.Image:
  h, w = size
  image = np.full((h, w, 3), rng.integers(0, 80, size=3), np.uint8)
  color = rng.integers(120, 256, size=3).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  if kind == "circle":
    image[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2] = color
  elif kind == "square":
    image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = color
  elif kind == "stripes":
    image[(xx // 4) % 2 == 0] = color
  else:
    image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
  return Image.fromarray(image)


def make_folder(root, per_class_train=8, per_class_test=2, seed=0) -> str:
  """root/{train,test}/<class>/<i>.png with a simple visual rule per class."""
  rng = np.random.default_rng(seed)
  for split, count in (("train", per_class_train), ("test", per_class_test)):
    for kind in CLASSES:
      os.makedirs(os.path.join(root, split, kind), exist_ok=True)
      for i in range(count):
        _shape_image(kind, rng).save(os.path.join(root, split, kind, f"{i}.png"))
  return str(root)


def tiny_config(data_root: str, **overrides):
  config = tiny.get_config()
  config.data.root = data_root
  config.num_epochs = 2
  config.log_every_steps = 1
  return image_trees.override(config, overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("shapes"))


# ----------------------------------------------------------------------------- one step


@functools.cache
def _one_step(num_local: int):
  """One SGD step of the tiny model on the same 8 images on 1 and on 4 devices.

  With `num_local` > 0, K local crops of 16 px per image too. Returns the initial state and
  {device count: (new state, metrics)}, host arrays.
  """
  config = tiny_config("unused")
  # Augmentation on: each image's key depends on its global index, not on the device count.
  config.optim.name = "sgd"
  config.optim.base_lr = 0.1
  config.optim.schedule = "constant"
  config.augment.local_crops.num, config.augment.local_crops.size = num_local, 16
  global_batch, size = 8, config.data.image_size
  rng = np.random.default_rng(0)
  view1 = rng.uniform(size=(global_batch, size, size, 3)).astype(np.float32)
  view2 = np.clip(view1 + 0.2 * rng.normal(size=view1.shape), 0, 1).astype(np.float32)
  local = rng.uniform(size=(global_batch, num_local, 16, 16, 3)).astype(np.float32)
  schedule = optim.warmup_cosine(config.optim, batch_size=8, steps_per_epoch=1, num_epochs=1)
  model = models.build_model(config.model, image_size=size, axis_name=parallel.AXIS_NAME)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0), schedule)

  results = {}
  for n in (1, 4):
    devices = jax.local_devices()[:n]
    step = train.make_train_step(config, schedule, devices=devices)
    batch = {
      "view1": view1.reshape(n, global_batch // n, size, size, 3),
      "view2": view2.reshape(n, global_batch // n, size, size, 3),
    }
    if num_local:
      batch["local_views"] = local.reshape(n, global_batch // n, *local.shape[1:])
    new_state, metrics = step(parallel.replicate(state, devices), batch, jax.random.PRNGKey(1))
    results[n] = (jax.device_get(new_state), jax.device_get(metrics))
  return jax.device_get(state), results


@pytest.mark.parametrize("num_local", [0, 2])
def test_one_step_on_one_device_equals_four_devices(num_local):
  state, results = _one_step(num_local)
  (state1, metrics1), (state4, metrics4) = results[1], results[4]
  np.testing.assert_allclose(metrics4["loss"], metrics1["loss"][0], rtol=1e-5)
  # BN statistics: identical on every replica, and equal to the single-device ones.
  for leaf4, leaf1 in zip(
    jax.tree_util.tree_leaves(state4.batch_stats),
    jax.tree_util.tree_leaves(state1.batch_stats),
    strict=True,
  ):
    for replica in range(1, 4):
      np.testing.assert_array_equal(leaf4[replica], leaf4[0])
    np.testing.assert_allclose(leaf4[0], leaf1[0], rtol=1e-4, atol=1e-5)
  # Parameters after the SGD step: the same update on every replica and as on one device.
  moved = 0
  for new4, new1, old in zip(
    jax.tree_util.tree_leaves(state4.params),
    jax.tree_util.tree_leaves(state1.params),
    jax.tree_util.tree_leaves(state.params),
    strict=True,
  ):
    np.testing.assert_array_equal(new4[3], new4[0])
    np.testing.assert_allclose(new4[0] - old, new1[0] - old, rtol=1e-3, atol=1e-6)
    moved += int(np.any(new1[0] != old))
  assert moved > 10  # the step did update the network


def test_multi_crop_step_keeps_the_global_views_statistics_and_accuracy():
  """Local crops change the loss and the update, not the BN running statistics (global views
  only) nor the metrics (view1 against view2)."""
  two_views, multi_crop = _one_step(0)[1][4], _one_step(2)[1][4]
  for a, b in zip(
    jax.tree_util.tree_leaves(two_views[0].batch_stats),
    jax.tree_util.tree_leaves(multi_crop[0].batch_stats),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for name in ("contrastive_accuracy", "positive_similarity", "negative_similarity"):
    np.testing.assert_allclose(multi_crop[1][name], two_views[1][name], rtol=1e-5, atol=1e-6)
  assert abs(float(multi_crop[1]["loss"][0]) - float(two_views[1]["loss"][0])) > 1e-3
  differences = [
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(two_views[0].params),
      jax.tree_util.tree_leaves(multi_crop[0].params),
      strict=True,
    )
  ]
  assert max(differences) > 1e-6


def test_multi_crop_step_is_the_multi_positive_loss_of_both_model_calls():
  """The step's loss and update equal nt_xent_multi over [view1, view2, local 1..K] computed by
  hand: the locals in train mode, view-major, local k of image i paired with view1[i]."""
  config = tiny_config("unused")
  config.augment.enabled = False  # the views pass through, so the hand computation sees them
  config.optim.name, config.optim.base_lr, config.optim.weight_decay = "sgd", 0.1, 0.0
  config.optim.schedule = "constant"
  num_local, per_device, size = 3, 4, config.data.image_size
  config.augment.local_crops.num, config.augment.local_crops.size = num_local, 16
  rng = np.random.default_rng(3)
  view1 = rng.uniform(size=(per_device, size, size, 3)).astype(np.float32)
  view2 = np.clip(view1 + 0.2 * rng.normal(size=view1.shape), 0, 1).astype(np.float32)
  local = rng.uniform(size=(per_device, num_local, 16, 16, 3)).astype(np.float32)
  schedule = optim.warmup_cosine(config.optim, batch_size=4, steps_per_epoch=1, num_epochs=1)
  model = models.build_model(config.model, image_size=size, axis_name=parallel.AXIS_NAME)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0), schedule)
  devices = jax.local_devices()[:1]
  step = train.make_train_step(config, schedule, devices=devices)
  batch = {"view1": view1[None], "view2": view2[None], "local_views": local[None]}
  new_state, metrics = step(parallel.replicate(state, devices), batch, jax.random.PRNGKey(1))

  def hand_loss(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (z, _), _ = model.apply(
      variables, np.concatenate([view1, view2]), train=True, mutable=["batch_stats"]
    )
    view_major = np.swapaxes(local, 0, 1).reshape(-1, 16, 16, 3)  # [K * B]: local k, image i
    (z_local, _), _ = model.apply(variables, view_major, train=True, mutable=["batch_stats"])
    z_views = jnp.concatenate(
      [z.reshape(2, per_device, -1), z_local.reshape(num_local, per_device, -1)]
    )
    return losses.nt_xent_multi(
      z_views, temperature=config.temperature, axis_name=parallel.AXIS_NAME
    )[0]

  loss, grads = jax.pmap(
    jax.value_and_grad(hand_loss), axis_name=parallel.AXIS_NAME, devices=devices
  )(parallel.replicate(state.params, devices))
  np.testing.assert_allclose(float(metrics["loss"][0]), float(loss[0]), rtol=1e-5)
  # First SGD step without weight decay: the update is -lr * gradient.
  for new, old, grad in zip(
    jax.tree_util.tree_leaves(jax.device_get(new_state.params)),
    jax.tree_util.tree_leaves(state.params),
    jax.tree_util.tree_leaves(jax.device_get(grads)),
    strict=True,
  ):
    np.testing.assert_allclose(new[0] - old, -0.1 * grad[0], rtol=1e-3, atol=1e-6)


def test_multi_crop_step_needs_the_local_views():
  config = tiny_config("unused")
  config.augment.local_crops.num = 2
  schedule = optim.warmup_cosine(config.optim, batch_size=8, steps_per_epoch=1, num_epochs=1)
  size = config.data.image_size
  model = models.build_model(config.model, image_size=size, axis_name=parallel.AXIS_NAME)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0), schedule)
  devices = jax.local_devices()[:1]
  step = train.make_train_step(config, schedule, devices=devices)
  views = np.zeros((1, 2, size, size, 3), np.float32)
  for local in (None, np.zeros((1, 2, 3, 16, 16, 3), np.float32)):
    batch = {"view1": views, "view2": views}
    if local is not None:
      batch["local_views"] = local
    with pytest.raises(ValueError, match="local_crops.num=2"):
      step(parallel.replicate(state, devices), batch, jax.random.PRNGKey(1))


# ----------------------------------------------------------------------------- the loop


def _workdir_holding(tmp_path, name, source_workdir, step) -> str:
  """A fresh workdir whose only checkpoint is `step` of `source_workdir` (a crash after it)."""
  run = str(tmp_path / name)
  os.makedirs(checkpoint.checkpoint_dir(run))
  os.symlink(
    os.path.join(checkpoint.checkpoint_dir(source_workdir), str(step)),
    os.path.join(checkpoint.checkpoint_dir(run), str(step)),
  )
  return run


def _history(workdir):
  with open(os.path.join(workdir, "loss_history.csv")) as f:
    return f.read().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
  """Two epochs (4 steps at batch 16 on 32 images) on the 4 fake devices."""
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = train.pretrain(tiny_config(data_root), workdir)
  return workdir, summary


def test_pretrain_writes_outputs(trained):
  workdir, summary = trained
  assert summary["step"] == 4 and summary["resumed_from"] is None
  assert np.isfinite(summary["loss"])
  assert sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(workdir))) == [2, 4]
  history = _history(workdir)
  assert history[0] == "step,epoch,loss,contrastive_accuracy,learning_rate"
  assert [int(row.split(",")[0]) for row in history[1:]] == [1, 2, 3, 4]
  assert [int(row.split(",")[1]) for row in history[1:]] == [1, 1, 2, 2]
  assert os.path.getsize(os.path.join(workdir, "training_losses.png")) > 1000
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_pretrain_with_local_crops(tmp_path, data_root):
  """The loop feeds the pipeline's local views to the step; the checkpoint records them."""
  overrides = {"num_epochs": 1, "augment.local_crops.num": 2, "augment.local_crops.size": 16}
  summary = train.pretrain(tiny_config(data_root, **overrides), str(tmp_path))
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  assert checkpoint.load_pretrained(str(tmp_path)).config.augment.local_crops.num == 2


def test_resume_equals_uninterrupted(trained, tmp_path, data_root):
  """Crash after epoch 1 (only its checkpoint survives), rerun: the same final state."""
  workdir, _ = trained
  resumed = _workdir_holding(tmp_path, "resumed", workdir, 2)
  summary = train.pretrain(tiny_config(data_root), resumed)
  assert summary["resumed_from"] == 2
  full, after_resume = checkpoint.load_pretrained(workdir), checkpoint.load_pretrained(resumed)
  for a, b in zip(
    jax.tree_util.tree_leaves((full.params, full.batch_stats)),
    jax.tree_util.tree_leaves((after_resume.params, after_resume.batch_stats)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  full_rows, resumed_rows = _history(workdir), _history(resumed)
  assert [r.split(",")[0] for r in resumed_rows[1:]] == ["3", "4"]
  for a, b in zip(full_rows[3:], resumed_rows[1:], strict=True):
    np.testing.assert_allclose(
      [float(x) for x in a.split(",")], [float(x) for x in b.split(",")], rtol=1e-5
    )


def test_resume_under_another_runtime_equals_uninterrupted(trained, tmp_path, data_root, caplog):
  """A checkpoint trained with one runtime (cpu_kernels' XLA ops) resumes under another (flax's
  own ops) with no rewriting and no config-change warning, to the same final state."""
  workdir, _ = trained
  resumed = _workdir_holding(tmp_path, "other_runtime", workdir, 2)
  config = tiny_config(data_root)
  assert config.runtime.conv_impl == "xla"
  config.runtime.conv_impl, config.runtime.conv_grad_chunk = "flax", 3
  with caplog.at_level(logging.WARNING):
    summary = train.pretrain(config, resumed)
  assert summary["resumed_from"] == 2
  assert "changed config" not in caplog.text
  full, after_resume = checkpoint.load_pretrained(workdir), checkpoint.load_pretrained(resumed)
  assert after_resume.config.runtime.conv_impl == "flax"
  for a, b in zip(
    jax.tree_util.tree_leaves((full.params, full.batch_stats)),
    jax.tree_util.tree_leaves((after_resume.params, after_resume.batch_stats)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path, data_root):
  workdir, _ = trained
  run = _workdir_holding(tmp_path, "nan", workdir, 4)
  config = tiny_config(data_root, num_epochs=3, temperature=0.0)  # logits become inf/nan
  with pytest.raises(FloatingPointError, match="at step 5.*step 4"):
    train.pretrain(config, run)
  assert checkpoint.load_pretrained(run).step == 4


# ----------------------------------------------------------------------------- progressive resizing

# The stem is built once; 32 -> 48 px crosses the automatic CIFAR-stem threshold, so it is fixed.
FINAL_PHASE = {"data.final_size_epochs": 1, "data.final_image_size": 48, "model.cifar_stem": True}


def test_bad_final_phase_fails_before_anything_is_written(data_root, tmp_path):
  # Every data.final_* error is `resolution.final_phase_start`'s (tests/test_data_resolution.py).
  overrides = {"data.final_size_epochs": 1, "data.final_image_size": 48}  # cifar_stem: auto
  with pytest.raises(ValueError, match="cifar_stem=None picks"):
    train.pretrain(tiny_config(data_root, **overrides), str(tmp_path / "run"))
  assert not os.path.exists(checkpoint.checkpoint_dir(str(tmp_path / "run")))


def test_final_phase_equals_resuming_at_the_larger_size(trained, tmp_path, data_root, monkeypatch):
  """Two epochs at 32 px with the last at 48 px == stopping the 32 px run after epoch 1 and
  resuming it by hand with data.image_size=48; and != the run that stayed at 32 px."""
  workdir, _ = trained
  streams = []
  create = train.pipeline.create_pretrain_iterator

  def spy(config, *, seed, start_epoch=0):
    streams.append((config.data.image_size, start_epoch))
    return create(config, seed=seed, start_epoch=start_epoch)

  monkeypatch.setattr(train.pipeline, "create_pretrain_iterator", spy)
  progressive = str(tmp_path / "progressive")
  train.pretrain(tiny_config(data_root, **FINAL_PHASE), progressive)
  assert streams == [(32, 0), (48, 1)]
  by_hand = _workdir_holding(tmp_path, "by_hand", workdir, 2)
  # The same stem as FINAL_PHASE's, by hand.
  train.pretrain(
    tiny_config(data_root, **{"data.image_size": 48, "model.cifar_stem": True}), by_hand
  )
  assert streams[2:] == [(48, 1)]

  def leaves(run, step=None):
    pretrained = checkpoint.load_pretrained(run, step)
    return jax.tree_util.tree_leaves((pretrained.params, pretrained.batch_stats))

  for a, b in zip(leaves(progressive, 2), leaves(workdir, 2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # epoch 1: 32 px in both
  for a, b in zip(leaves(progressive), leaves(by_hand), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  differences = [
    float(np.max(np.abs(a - b))) for a, b in zip(leaves(progressive), leaves(workdir), strict=True)
  ]
  assert max(differences) > 1e-3  # epoch 2 at 48 px is not epoch 2 at 32 px
  # The probe's default test view is the last crops' size.
  saved = checkpoint.load_pretrained(progressive).config
  assert resolution.eval_image_size(saved.data) == 48

  # A crash at the boundary: the progressive config resumes on the 48 px stream, same result.
  resumed = _workdir_holding(tmp_path, "resumed", progressive, 2)
  train.pretrain(tiny_config(data_root, **FINAL_PHASE), resumed)
  assert streams[3:] == [(48, 1)]
  for a, b in zip(leaves(progressive), leaves(resumed), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_all_epochs_at_the_final_size_start_on_it(data_root, tmp_path, monkeypatch):
  streams = []

  def spy(config, *, seed, start_epoch=0):
    streams.append((config.data.image_size, start_epoch))
    raise InterruptedError  # enough seen: stop before compiling

  monkeypatch.setattr(train.pipeline, "create_pretrain_iterator", spy)
  config = tiny_config(data_root, **FINAL_PHASE)
  config.data.final_size_epochs = config.num_epochs
  with pytest.raises(InterruptedError):
    train.pretrain(config, str(tmp_path / "run"))
  assert streams == [(48, 0)]


# ----------------------------------------------------------------------------- the CLI


def _cli(workdir, data_root, devices, *extra) -> subprocess.CompletedProcess:
  """run_pretrain.py on configs/tiny.py with `devices` fake CPU devices (XLA_FLAGS)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  command = [
    sys.executable,
    os.path.join(REPO, "run_pretrain.py"),
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--workdir",
    workdir,
    f"--config.data.root={data_root}",
    *extra,
  ]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _run_cli(workdir, data_root, devices, *extra):
  result = _cli(workdir, data_root, devices, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_cli_end_to_end_and_resume_on_fewer_devices(tmp_path, data_root):
  """run_pretrain.py on 4 devices writes everything; a second call on 1 device resumes.

  The 4 devices come from config.runtime.num_cpu_devices, which overrides XLA_FLAGS' count of 1.
  The runtime is not the model: the resume does not list its change.
  """
  workdir = str(tmp_path / "cli")
  out = _run_cli(
    workdir, data_root, 1, "--config.num_epochs=1", "--config.runtime.num_cpu_devices=4"
  )
  devices = ", ".join(f"CpuDevice(id={i})" for i in range(4))
  assert f"local devices: [{devices}]" in out
  assert "Pretraining finished at step 2" in out
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["2"]
  assert os.path.exists(os.path.join(workdir, "training_losses.png"))
  assert len(_history(workdir)) == 1 + 2

  out = _run_cli(workdir, data_root, 1, "--config.num_epochs=2")
  assert "local devices: [CpuDevice(id=0)]" in out
  assert "Resuming from the checkpoint of step 2" in out
  assert "changed config" in out and "num_epochs: 1 -> 2" in out
  assert "runtime" not in out.split("changed config")[1].splitlines()[0]
  assert "Pretraining finished at step 4" in out
  assert [r.split(",")[0] for r in _history(workdir)[1:]] == ["1", "2", "3", "4"]
  assert checkpoint.load_pretrained(workdir).step == 4


def test_finished_run_is_not_retrained(trained, data_root):
  """Re-running a finished command is a no-op (so `pretrain && probe` chains still work)."""
  workdir, summary = trained
  history_before = _history(workdir)
  again = train.pretrain(tiny_config(data_root), workdir)
  assert again["already_complete"] and again["step"] == 4 and again["resumed_from"] == 4
  np.testing.assert_allclose(again["loss"], summary["loss"], rtol=1e-6)
  assert _history(workdir) == history_before
  assert checkpoint.load_pretrained(workdir).step == 4


def test_bad_batch_size_is_a_clear_error(data_root, tmp_path):
  config = tiny_config(data_root, batch_size=10)  # not a multiple of the 4 devices
  with pytest.raises(ValueError, match="batch_size=10"):
    train.pretrain(config, str(tmp_path))


def test_negative_cpu_device_count_is_a_clear_error(tmp_path, data_root):
  workdir = str(tmp_path / "run")
  result = _cli(workdir, data_root, 1, "--config.runtime.num_cpu_devices=-1")
  assert result.returncode != 0
  assert "config.runtime.num_cpu_devices must be >= 0, got -1" in result.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
