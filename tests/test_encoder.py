"""`simclr_jax.load_encoder`: the probe's features h from a checkpoint alone, in this process and
in a fresh one; normalisation iff the run normalised; clear errors; `import simclr_jax` stays
light; the package version is the one pyproject.toml declares."""

import dataclasses
import os
import subprocess
import sys
import tomllib

import jax
import ml_collections
import numpy as np
import probe_helpers
import pytest
from probe_helpers import BATCH_SIZE, COLOURS, NUM_TEST

import simclr_jax
from simclr_jax import checkpoint, cpu_kernels, encoder, models
from simclr_jax.data import pipeline
from simclr_jax.probe import features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  return probe_helpers.pretrain_colour_run(tmp_path_factory)


def _probe_h(workdir, config=None):
  """h of every test image as `run_linear.py` extracts it, and the images it saw."""
  pretrained = checkpoint.load_pretrained(workdir)
  config = config or pretrained.config
  ops = cpu_kernels.make_ops(ml_collections.ConfigDict(dict(conv_impl="auto")))
  model = models.build_model(config.model, image_size=config.data.image_size, ops=ops)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  layers, _ = features.extract_features(model, variables, config, "test", batch_size=BATCH_SIZE)
  ds, _, _ = pipeline.eval_dataset(config, "test", batch_size=BATCH_SIZE)
  images = np.concatenate(
    [b["image"].reshape(-1, 32, 32, 3)[b["mask"].reshape(-1)] for b in ds.as_numpy_iterator()]
  )
  return layers[0], images


def _assert_close(actual, expected):
  # The probe's pmap and this jit may pick different kernels by shape: ~1e-7 relative.
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_apply_equals_probe_features(pretrained_run):
  _, workdir = pretrained_run
  expected, images = _probe_h(workdir)
  assert len(images) == len(COLOURS) * NUM_TEST

  enc = simclr_jax.load_encoder(workdir)
  pretrained = checkpoint.load_pretrained(workdir)
  assert isinstance(enc, simclr_jax.Encoder)
  assert enc.step == pretrained.step == 6
  assert (enc.image_size, enc.crop_fraction, enc.normalize) == (32, 1.0, False)
  assert enc.feature_dim == models.feature_dim(pretrained.config.model) == expected.shape[1]
  assert enc.conv_impl in ("xla", "onednn")
  jax.tree_util.tree_map(np.testing.assert_array_equal, enc.params, pretrained.params["encoder"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, enc.batch_stats, pretrained.batch_stats["encoder"]
  )

  h = enc.apply(images)
  assert h.shape == expected.shape and h.dtype == np.float32
  _assert_close(np.asarray(h), expected)
  # Batched with a padded last batch; float64 input is cast; one image alone.
  _assert_close(np.asarray(enc.apply(images.astype(np.float64), batch_size=5)), expected)
  _assert_close(np.asarray(enc(images[3:4])), expected[3:4])
  assert enc.apply(images[:0]).shape == (0, enc.feature_dim)
  # The reference flax ops give the same features.
  flax_h = simclr_jax.load_encoder(workdir, step=6, conv_impl="flax").apply(images)
  _assert_close(np.asarray(flax_h), expected)


def test_normalizes_iff_the_run_did(pretrained_run, monkeypatch):
  _, workdir = pretrained_run
  load = checkpoint.load_pretrained

  def normalized(*args, **kwargs):
    pretrained = load(*args, **kwargs)
    config = ml_collections.ConfigDict(pretrained.config.to_dict())
    config.augment.normalize = True
    return dataclasses.replace(pretrained, config=config)

  plain = simclr_jax.load_encoder(workdir)
  monkeypatch.setattr(checkpoint, "load_pretrained", normalized)
  expected, images = _probe_h(workdir, normalized(workdir).config)
  enc = simclr_jax.load_encoder(workdir)
  assert enc.normalize and not plain.normalize
  h = np.asarray(enc.apply(images))
  _assert_close(h, expected)
  assert np.abs(h - np.asarray(plain.apply(images))).max() > 1e-3 * np.abs(h).max()


def test_fresh_process_needs_only_the_workdir(pretrained_run, tmp_path):
  _, workdir = pretrained_run
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  script = (
    "import sys, numpy as np, simclr_jax\n"
    "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules\n"
    "enc = simclr_jax.load_encoder(sys.argv[1])\n"
    "np.save(sys.argv[3], np.asarray(enc.apply(np.load(sys.argv[2]))))\n"
    "assert 'tensorflow' not in sys.modules, 'the encoder imported TensorFlow'\n"
  )
  out = tmp_path / "h.npy"
  subprocess.run(
    [sys.executable, "-c", script, workdir, str(tmp_path / "images.npy"), str(out)],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])},
    check=True,
    timeout=300,
  )
  _assert_close(np.load(out), np.asarray(simclr_jax.load_encoder(workdir).apply(images)))


def test_missing_checkpoints_raise_file_not_found(pretrained_run, tmp_path):
  _, workdir = pretrained_run
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*checkpoints.* does not exist"):
    simclr_jax.load_encoder(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
    simclr_jax.load_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*saved: \[3, 6\]"):
    simclr_jax.load_encoder(workdir, step=5)


def test_apply_rejects_bad_images(pretrained_run):
  enc = simclr_jax.load_encoder(pretrained_run[1], conv_impl="xla")
  pixels = np.zeros((2, 32, 32, 3), np.uint8)
  with pytest.raises(TypeError, match="divide uint8 pixels by 255"):
    enc.apply(pixels)
  for shape in ((32, 32, 3), (2, 32, 32, 1), (2, 3, 32, 32)):
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\]"):
      enc.apply(np.zeros(shape, np.float32))
  with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
    enc.apply(pixels / 255.0, batch_size=0)
  with pytest.raises(ValueError, match="conv_impl='fast' is not one of"):
    simclr_jax.load_encoder(pretrained_run[1], conv_impl="fast")


def test_import_is_light_and_version_matches_pyproject():
  # `import simclr_jax` loads no JAX or TensorFlow; `load_encoder` resolves on first access.
  script = (
    "import sys, simclr_jax\n"
    "heavy = sorted({'jax', 'flax', 'tensorflow'} & set(sys.modules))\n"
    "assert not heavy, heavy\n"
    "assert callable(simclr_jax.load_encoder) and 'tensorflow' not in sys.modules\n"
  )
  subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
  assert simclr_jax.load_encoder is encoder.load_encoder
  assert {"Encoder", "load_encoder"} <= set(dir(simclr_jax))
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    simclr_jax.nope  # noqa: B018
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["version"] == simclr_jax.__version__
