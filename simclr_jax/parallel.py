"""Devices and hosts: the pmap axis, replicated state and each process's share of the batch.

One `jax.pmap` axis (`AXIS_NAME`) spans every device of every process; a process feeds its local
devices, `batch_size / process_count` examples per step, split evenly over them.
"""

import jax
import numpy as np

AXIS_NAME = "batch"


def local_batch_size(batch_size: int) -> int:
  """Examples of the global `batch_size` that this process feeds per step.

  Raises:
    ValueError: `batch_size` is not a positive multiple of the global device count.
  """
  devices = jax.device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
      f"batch_size={batch_size} must be a positive multiple of the {devices} devices "
      f"({jax.process_count()} host(s) x {jax.local_device_count()} local device(s))."
    )
  return batch_size // jax.process_count()


def replicate(tree, devices=None):
  """Copies a host pytree to each of `devices` (default: all local): leaves [devices, ...]."""
  devices = jax.local_devices() if devices is None else devices
  sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(devices), (AXIS_NAME,)), jax.sharding.PartitionSpec(AXIS_NAME)
  )
  return jax.tree_util.tree_map(
    lambda x: jax.device_put(
      np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), sharding
    ),
    tree,
  )


def unreplicate(tree):
  """The first device's copy of a replicated pytree, as host (NumPy) arrays."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))
