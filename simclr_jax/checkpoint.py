"""Orbax checkpoints of a pretraining run: the training state plus what the probe needs.

Layout: `<workdir>/checkpoints/<step>/{state,metadata}`. `state` holds unreplicated host arrays
(params, batch_stats, opt_state, step), so a checkpoint written on 4 devices restores on 1.
`metadata` (JSON) holds the config and class names, so `run_linear.py` rebuilds the model from
the checkpoint alone. Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a partial checkpoint as the latest step.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  """The absolute path of `<workdir>/checkpoints`, where the Orbax manager keeps the steps."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A CheckpointManager on `<workdir>/checkpoints` keeping the last `max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=("state", "metadata")
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: dict[str, Any],
  *,
  config: ml_collections.ConfigDict,
  class_names: list[str],
) -> None:
  """Saves `state` (a pytree of host or single-device arrays) and the run's metadata at `step`.

  The write is asynchronous; call `manager.wait_until_finished()` before the process exits.
  """
  config_dict = json.loads(config.to_json())
  if config_dict.get("data", {}).get("root"):
    # Absolute, so that run_linear.py finds the data from any working directory.
    config_dict["data"]["root"] = os.path.abspath(os.path.expanduser(config_dict["data"]["root"]))
  metadata = {"config": config_dict, "class_names": list(class_names), "step": step}
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
    ),
  )


def restore_state(manager: ocp.CheckpointManager, target: dict[str, Any], step: int | None = None):
  """Restores the training state of `step` (default: latest) into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: pytree with the structure, shapes and dtypes to restore into (arrays or
      jax.ShapeDtypeStruct); sharding is ignored, arrays come back on the default device.
    step: which step; None for the latest complete one.

  Returns:
    The restored pytree, or None when the directory holds no complete checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(
    lambda x: (
      jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
      if not isinstance(x, jax.ShapeDtypeStruct)
      else x
    ),
    target,
  )
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
  )
  return restored["state"]


def restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON metadata of `step`: {'config': dict, 'class_names': list, 'step': int}.

  Raises:
    FileNotFoundError (from Orbax) if `step` is not a complete checkpoint of `manager`; callers
    that take a step from the user check it first (`load_pretrained`).
  """
  return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


_LEGACY_RUNTIME = {"model.conv_impl": "conv_impl", "model.conv_grad_chunk": "conv_grad_chunk"}
_LEGACY_RUNTIME_TOP = {"num_cpu_devices": "num_cpu_devices"}
_LEGACY_HEAD_PRESETS = {"seed": "pytorch_original"}
# `augment.local_crops` as configs/default.py sets it (no local crops): what a checkpoint saved
# before multi-crop trained with.
_LOCAL_CROPS_OFF = {"num": 0, "size": 32, "crop_area": [0.05, 0.2]}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A checkpoint's saved config in today's field names; the input is not modified.

  Checkpoints written before the `runtime` section kept the speed settings with the model
  (`model.conv_impl`, `model.conv_grad_chunk`) and at the top (`num_cpu_devices`): they move to
  `runtime` (unless it exists). The PyTorch original's head preset, once "seed", is
  "pytorch_original". Checkpoints written before multi-crop lack `augment.local_crops` and
  `augment.local_view`: they get configs/default.py's `local_crops` (0 local crops, what they
  trained with) and a copy of their own `augment.view2` as `local_view`, the default's rule.
  """
  config = json.loads(json.dumps(saved))
  model = config.get("model", {})
  legacy = {
    new: model.pop(old.split(".")[1])
    for old, new in _LEGACY_RUNTIME.items()
    if old.split(".")[1] in model
  }
  legacy.update({new: config.pop(old) for old, new in _LEGACY_RUNTIME_TOP.items() if old in config})
  config.setdefault("runtime", legacy)
  head = model.get("head", {})
  if head.get("preset") in _LEGACY_HEAD_PRESETS:
    head["preset"] = _LEGACY_HEAD_PRESETS[head["preset"]]
  augment = config.get("augment")
  if isinstance(augment, dict):
    augment.setdefault("local_crops", json.loads(json.dumps(_LOCAL_CROPS_OFF)))
    if "view2" in augment:
      augment.setdefault("local_view", json.loads(json.dumps(augment["view2"])))
  return config


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """Fields whose value differs between a checkpoint's saved config and `config`, as text.

  The `runtime` section is left out: it changes how the step runs, not what it computes. A
  field that the checkpoint's config lacks (saved by a version without it) reads
  "<field>: absent from the checkpoint -> <value>"; one that `config` lacks, the other way round.
  """
  old, new = _flatten(upgrade_config(saved)), _flatten(json.loads(config.to_json()))
  old, new = ({k: v for k, v in d.items() if not k.startswith("runtime.")} for d in (old, new))
  if new.get("data.root"):
    new["data.root"] = os.path.abspath(os.path.expanduser(new["data.root"]))

  def show(flat: dict[str, Any], key: str, where: str) -> str:
    return repr(flat[key]) if key in flat else f"absent from {where}"

  return [
    f"{key}: {show(old, key, 'the checkpoint')} -> {show(new, key, 'this config')}"
    for key in sorted(set(old) | set(new))
    if key not in old or key not in new or old[key] != new[key]
  ]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """What the linear probe needs from a pretraining checkpoint."""

  config: ml_collections.ConfigDict
  class_names: list[str]
  params: Any
  batch_stats: Any
  step: int


def load_pretrained(workdir: str, step: int | None = None) -> Pretrained:
  """Loads the encoder and head of a pretraining run, without knowing its config beforehand.

  Args:
    workdir: the pretraining `--workdir`.
    step: a saved step; None for the latest.

  Returns:
    `Pretrained` with host (NumPy) arrays.

  Raises:
    FileNotFoundError: the workdir has no complete checkpoint, or not that step.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory!r} does not exist")
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_names=("state", "metadata"),
  )
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {directory!r}")
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory!r}; saved: {steps}")
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()),
  )
  state, metadata = restored["state"], restored["metadata"]
  manager.close()
  return Pretrained(
    config=ml_collections.ConfigDict(upgrade_config(metadata["config"])),
    class_names=list(metadata["class_names"]),
    params=jax.device_get(state["params"]),
    batch_stats=jax.device_get(state["batch_stats"]),
    step=int(step),
  )
