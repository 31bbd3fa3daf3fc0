"""The runtime is not the model: a checkpoint written before the `runtime` section existed (speed
settings under `model` and at the top) loads, probes and resumes; probes agree across runtimes."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import probe_helpers
import pytest

from configs import tiny
from simclr_jax import checkpoint, train
from simclr_jax.probe import evaluate


@pytest.fixture(scope="module")
def old_format_run(tmp_path_factory):
  """The colour run, copied, with every checkpoint's metadata rewritten to the old layout."""
  root, workdir = probe_helpers.pretrain_colour_run(tmp_path_factory)
  old = str(tmp_path_factory.mktemp("old_format"))
  shutil.copytree(workdir, old, dirs_exist_ok=True)
  for step in os.listdir(checkpoint.checkpoint_dir(old)):
    path = os.path.join(checkpoint.checkpoint_dir(old), step, "metadata", "metadata")
    with open(path) as f:
      metadata = json.load(f)
    config = metadata["config"]
    runtime = config.pop("runtime")
    config["num_cpu_devices"] = 2
    config["model"].update(conv_impl="onednn", conv_grad_chunk=runtime["conv_grad_chunk"] or 8)
    with open(path, "w") as f:
      json.dump(metadata, f)
  return root, workdir, old


def test_old_checkpoint_loads_with_its_speed_settings_in_runtime(old_format_run):
  _, workdir, old = old_format_run
  loaded = checkpoint.load_pretrained(old)
  assert loaded.config.runtime.to_dict() == {
    "conv_impl": "onednn",
    "conv_grad_chunk": 8,
    "num_cpu_devices": 2,
  }
  assert "conv_impl" not in loaded.config.model and "num_cpu_devices" not in loaded.config
  new = checkpoint.load_pretrained(workdir)
  for a, b in zip(
    jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(loaded.params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_old_checkpoint_probes_like_the_new_one_under_any_runtime(old_format_run, tmp_path):
  """Same top-1, kNN and predictions from the old-format checkpoint probed with flax's ops as
  from the original probed with the CPU kernels' XLA ops."""
  _, workdir, old = old_format_run
  kwargs = dict(batch_size=probe_helpers.BATCH_SIZE, probe_c=1.0)
  new = evaluate.run_linear_probe(
    workdir, conv_impl="xla", output_dir=str(tmp_path / "new"), **kwargs
  )
  probed = evaluate.run_linear_probe(
    old, conv_impl="flax", output_dir=str(tmp_path / "old"), **kwargs
  )
  assert probed["top1"] == new["top1"]
  assert probed["knn"] == new["knn"]
  assert probed["confusion_matrix"] == new["confusion_matrix"]
  assert os.path.exists(tmp_path / "old" / "results.json")


def test_old_checkpoint_resumes_without_listing_the_runtime(old_format_run, caplog):
  root, _, old = old_format_run
  config = tiny.get_config()
  config.data.root = root
  config.num_epochs = 3
  with jax.default_prng_impl("unsafe_rbg"), caplog.at_level(logging.WARNING):
    summary = train.pretrain(config, old)
  assert summary["resumed_from"] == 6 and summary["step"] == 9
  changes = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
  assert len(changes) == 1 and "num_epochs: 2 -> 3" in changes[0]
  for field in ("conv_impl", "conv_grad_chunk", "num_cpu_devices", "runtime"):
    assert field not in changes[0]
