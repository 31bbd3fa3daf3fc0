"""Devices and hosts: the pmap axis, replicated state, each process's share of the batch.

One `jax.pmap` axis (`AXIS_NAME`) spans every device of every process; a process feeds its local
devices `batch_size / process_count` examples per step, split evenly over them. Process ``h`` of
``P`` reads every P-th example of the epoch's stream (`data.sources`), so its k-th example of a
step is example ``h + P k`` of the global batch (`example_ids`).
"""

import contextlib
import faulthandler
import itertools
import os
import sys
import threading

import jax
import numpy as np
from absl import logging

AXIS_NAME = "batch"

WATCHDOG_EXIT_CODE = 75
"""Exit status of a process that `watchdog` stopped (EX_TEMPFAIL: rerunning resumes)."""


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


def example_ids(batch_size: int) -> np.ndarray:
  """Each local example's index in the global batch, as this process's batches are laid out.

  Process ``h`` of ``P`` holds global examples ``h, h + P, h + 2P, ...`` of every step, its
  local devices consecutive runs of them: the same image has the same index on 1 device, N
  devices or N processes, so keys folded from it give it the same augmentation.

  Returns:
    int32 ``[local_devices, batch_size / device_count]``, values in ``[0, batch_size)``.

  Raises:
    ValueError: as `local_batch_size`.
  """
  local = local_batch_size(batch_size)
  ids = jax.process_index() + jax.process_count() * np.arange(local, dtype=np.int32)
  return ids.reshape(jax.local_device_count(), -1)


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
  """The first local device's copy of a replicated pytree, as host (NumPy) arrays.

  Leaves are ``[local devices, ...]`` (pmap's outputs, `replicate`'s). Each is read from its
  first addressable shard, a device-to-host copy: no device program runs, so every process can
  call this at any time, in any order. (Indexing, ``x[0]``, compiles a gather over the local
  devices for every leaf; on the CPU backend a burst of hundreds of such small collective
  programs can deadlock the runtime, docs/multi_gpu.md.)
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  first = [x.addressable_shards[0].data if isinstance(x, jax.Array) else x for x in leaves]
  return treedef.unflatten([np.asarray(x)[0] for x in jax.device_get(first)])


_barrier_count = itertools.count()


def sync_processes(name: str, timeout_s: float | None = None) -> None:
  """Returns once every process has called it; all must call it in the same order.

  A barrier of JAX's coordination service (the one `jax.distributed.initialize` starts), not a
  device program, so it never waits behind queued device work. Before the first use of a
  collective over several processes it keeps them in step: gloo (the CPU backend's collectives)
  gives up when processes reach a new collective more than 30 s apart. A no-op on one process.

  Raises:
    TimeoutError: some process did not arrive within `timeout_s` seconds (None or <= 0: a day).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the public multihost_utils barrier is a device program

  timeout_ms = int(1000 * timeout_s) if timeout_s and timeout_s > 0 else 86_400_000
  key = f"simclr_jax/{next(_barrier_count)}/{name}"
  try:
    distributed.global_state.client.wait_at_barrier(key, timeout_in_ms=timeout_ms)
  except Exception as e:  # the client raises its runtime's error type
    raise TimeoutError(
      f"process {jax.process_index()} of {jax.process_count()}: not every process reached "
      f"{name!r} within {timeout_ms / 1000:.0f} s ({e})"
    ) from e


@contextlib.contextmanager
def watchdog(seconds: float | None, what: str):
  """Stops this process if the block does not finish within `seconds`.

  Meant for steps that every process must reach together (checkpoint saves, restores): if one
  process never arrives, the others would wait for ever. On expiry it logs an error naming
  `what`, the process and the limit, writes every thread's Python stack to stderr, and exits
  with `WATCHDOG_EXIT_CODE` without cleanup. None or <= 0: no limit.
  """
  if not seconds or seconds <= 0:
    yield
    return
  done = threading.Event()

  def expire():
    if done.wait(seconds):
      return
    logging.error(
      "%s did not finish within %.0f s on process %d of %d: stopping it (exit %d). A process "
      "that never reached it, or died, is the usual cause; the thread stacks follow.",
      what,
      seconds,
      jax.process_index(),
      jax.process_count(),
      WATCHDOG_EXIT_CODE,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_CODE)

  thread = threading.Thread(target=expire, name="simclr-watchdog", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()
