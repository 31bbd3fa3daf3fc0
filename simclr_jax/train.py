"""SimCLR pretraining: the pmapped train step and the training loop (paper §2, Algorithm 1).

One `jax.pmap` call site over all local devices (axis name `batch`): both views of the local
batch go through the encoder as one batch (multi-crop's smaller local views, SwAV §3.2, as a
second one), batch-norm statistics are synced across devices, the NT-Xent loss takes its
negatives from the global batch, gradients are averaged with `lax.pmean`, and the state is
donated. The augmentation key of each image is folded from the step and its index in the global
batch, so the draws depend neither on the device count nor on the process count, and a resumed
run continues the same random stream.

On several processes (`run_pretrain.py --multihost`) every process runs this same loop on its
share of each batch: all of them compile the step and wait for each other before the first one
(`parallel.sync_processes`), and save each checkpoint together (only process 0 writes the training
log), each save under `parallel.watchdog`, so a process that never arrives stops the others with
an error instead of a silent wait.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax.training import train_state

from simclr_jax import augment, checkpoint, cpu_kernels, losses, models, optim, parallel, train_log
from simclr_jax.data import pipeline, resolution, sources


class TrainState(train_state.TrainState):
  """Optimiser state and parameters, plus the batch-norm running statistics."""

  batch_stats: Any = None


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """Optimiser steps in one epoch (the last partial batch is dropped).

  Raises:
    ValueError: `batch_size` exceeds the number of training images.
  """
  steps = num_train_examples // config.batch_size
  if steps == 0:
    raise ValueError(
      f"batch_size={config.batch_size} exceeds the {num_train_examples} training images"
    )
  return steps


def create_train_state(
  config: ml_collections.ConfigDict, model, rng: jax.Array, schedule: optax.Schedule
) -> TrainState:
  """Initialises parameters and batch statistics on a dummy batch; host-side, unreplicated."""
  size = config.data.image_size
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((2, size, size, 3)), train=False))(rng)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optim.create_optimizer(config.optim, schedule),
  )


def augment_step_views(
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  step: jax.Array,
  batch: dict[str, jax.Array],
  *,
  loop: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The two augmented views of one device's share of a step's batch; call inside the pmap.

  Each example's draws are keyed by ``(rng, step, its index in the global batch)`` only, so an
  image gets the same views on 1 device, N devices or N processes (SimCLR Appendix A's
  augmentations, `augment.augment_views`).

  Args:
    config: full config; reads ``augment``.
    rng: the run's augmentation key, the same on every device.
    step: int scalar, the optimiser step about to be taken (0 for the first).
    batch: ``view1``, ``view2`` float32 ``[per_device, H, W, 3]`` in [0, 1] and ``example_id``
      int32 ``[per_device]`` (the pipeline's, `parallel.example_ids`). Without ``example_id``
      the one-process layout is assumed: device ``axis_index`` holds examples
      ``axis_index * per_device + i``.
    loop: `augment.augment_batch`'s ``loop`` (speed only).

  Returns:
    ``(view1, view2)``, float32 ``[per_device, H, W, 3]``.

  Raises:
    ValueError: no ``example_id`` in a run of several processes (when traced).
  """
  return augment.augment_views(
    jax.random.fold_in(rng, step),
    batch["view1"],
    batch["view2"],
    config.augment,
    example_ids=_example_ids(batch),
    loop=loop,
  )


def augment_step_local_views(
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  step: jax.Array,
  batch: dict[str, jax.Array],
  *,
  loop: bool = False,
) -> jax.Array:
  """The augmented local views (multi-crop, SwAV §3.2) of one device's share; inside the pmap.

  Keyed as `augment_step_views` keys the two global views, plus each local view's index
  (`augment.augment_local_views`), so they too are the same on any device or process count.

  Args:
    config: full config; reads ``augment``.
    rng, step, loop: as `augment_step_views`.
    batch: as `augment_step_views`, plus ``local_views`` float32 ``[per_device, K, s, s, 3]``
      in [0, 1].

  Returns:
    float32 ``[per_device, K, s, s, 3]``.
  """
  return augment.augment_local_views(
    jax.random.fold_in(rng, step),
    batch["local_views"],
    config.augment,
    example_ids=_example_ids(batch),
    loop=loop,
  )


def _example_ids(batch: dict[str, jax.Array]) -> jax.Array:
  """The batch's ``example_id``, or the one-process layout's global indices without it."""
  ids = batch.get("example_id")
  if ids is None:
    if jax.process_count() > 1:
      raise ValueError("with several processes the batch must carry 'example_id'")
    per_device = batch["view1"].shape[0]
    ids = jax.lax.axis_index(parallel.AXIS_NAME) * per_device + jnp.arange(per_device)
  return ids


def make_train_step(
  config: ml_collections.ConfigDict,
  schedule: optax.Schedule,
  devices=None,
  *,
  sequential_augment: bool = False,
):
  """Returns `p_train_step(state, batch, rng) -> (state, metrics)`, pmapped over `devices`.

  `devices` defaults to all local devices; `sequential_augment` is `augment.augment_batch`'s
  `loop` (speed only: `cpu_kernels.Ops.sequential_augment`).

  `state` is replicated ([devices, ...] leaves) and donated; `batch` holds `view1`, `view2`:
  float32 [devices, per_device, H, W, 3] in [0, 1], and `example_id` int32 [devices, per_device]
  (optional on one process, see `augment_step_views`); `rng` is one key shared by all devices.
  Metrics are global-batch scalars, identical on every device: `loss`,
  `contrastive_accuracy`, `positive_similarity`, `negative_similarity`, `learning_rate`.
  The leading batch axis must equal the number of devices (pmap raises a ValueError otherwise);
  `data.pipeline` checks earlier that `batch_size` is a multiple of the device count.

  Multi-crop (``augment.local_crops.num`` K > 0; SwAV §3.2): `batch` also holds `local_views`,
  float32 [devices, per_device, K, s, s, 3] in [0, 1]. The model then runs a second time, on the
  K * per_device local views (another spatial size), and the loss is `losses.nt_xent_multi` over
  [view1, view2, local 1..K]; the metrics stay those of view1 against view2. The batch-norm
  running statistics kept in the state come from the global views alone, as the probe reads
  whole images like them; the local call normalises by its own batch statistics (train mode,
  synced over devices) and its running statistics are dropped. With K = 0 the step is the
  two-view step above, unchanged.

  Raises:
    ValueError (when traced): K > 0 and `batch` has no `local_views`, or not K of them.
  """
  num_local = pipeline.num_local_crops(config)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    view1, view2 = augment_step_views(config, rng, state.step, batch, loop=sequential_augment)
    images = jnp.concatenate([view1, view2], axis=0)
    if num_local:
      local_images = _local_images(config, rng, state.step, batch, num_local, sequential_augment)

    def loss_fn(params):
      (projection, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
      )
      z1, z2 = jnp.split(projection, 2, axis=0)
      if not num_local:
        loss, metrics = losses.nt_xent(
          z1, z2, temperature=config.temperature, axis_name=parallel.AXIS_NAME
        )
        return loss, (metrics, updates["batch_stats"])
      # Train-mode BN on the local views' own statistics; their running statistics are dropped.
      (local_projection, _), _ = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        local_images,
        train=True,
        mutable=["batch_stats"],
      )
      z_local = local_projection.reshape(num_local, z1.shape[0], -1)
      loss, metrics = losses.nt_xent_multi(
        jnp.concatenate([z1[None], z2[None], z_local], axis=0),
        temperature=config.temperature,
        axis_name=parallel.AXIS_NAME,
      )
      return loss, (metrics, updates["batch_stats"])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS_NAME)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step))
    return new_state, metrics

  return jax.pmap(
    train_step,
    axis_name=parallel.AXIS_NAME,
    in_axes=(0, 0, None),
    donate_argnums=(0,),
    devices=devices,
  )


def _local_images(config, rng, step, batch, num_local, loop) -> jax.Array:
  """The augmented local views as one view-major batch: float32 [K * per_device, s, s, 3]."""
  if batch.get("local_views") is None or batch["local_views"].shape[1] != num_local:
    shape = None if batch.get("local_views") is None else batch["local_views"].shape
    raise ValueError(
      f"config.augment.local_crops.num={num_local} needs batch['local_views'] of "
      f"[per_device, {num_local}, s, s, 3] on each device; got {shape}"
    )
  local = augment_step_local_views(config, rng, step, batch, loop=loop)
  return jnp.swapaxes(local, 0, 1).reshape(-1, *local.shape[2:])


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
  }


SYNC_TIMEOUT_S = 600.0
"""Default seconds `pretrain` waits at a point every process must reach together."""


def pretrain(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  sync_timeout_s: float | None = SYNC_TIMEOUT_S,
) -> dict[str, Any]:
  """Pretrains (or resumes) a SimCLR model as configured; writes everything under `workdir`.

  Writes: `checkpoints/` (Orbax, every `checkpoint_every_epochs` and at the end),
  `loss_history.csv`, `training_losses.png`, `tensorboard/` (the last three on process 0 only).
  Every process must call it with the same config and workdir; each returns the same summary.

  Args:
    config: full config (`configs/default.py`).
    workdir: where everything goes; shared by all processes.
    sync_timeout_s: seconds allowed for each step that all processes take together: each
      checkpoint step (opening the manager, restoring, each save, the final wait), after which
      the process stops with exit status `parallel.WATCHDOG_EXIT_CODE` and its thread stacks on
      stderr; and the waits for every process before the checkpoints are opened and before the
      first train step of each image size, after which it raises TimeoutError. None or 0: no
      limit.

  Returns:
    A summary: `step`, `epoch`, final `loss` and `contrastive_accuracy`, `resumed_from` (the
    checkpoint step resumed from, or None), and `already_complete` (True when the latest
    checkpoint had already reached `num_epochs`, so nothing was trained).

  Raises:
    ValueError: bad data or config values (see `data.pipeline`, `optim`, `models`, and
      `data.resolution.final_phase_start` for ``data.final_*``), before anything is written.
    FloatingPointError: the loss became NaN or Inf; names the step. The last good checkpoint
      stays the latest on disk.
    TimeoutError: some process did not reach the checkpoints or the first train step within
      `sync_timeout_s`.
  """
  is_main = jax.process_index() == 0
  # Validates data.final_* before anything is written.
  switch_epoch = resolution.final_phase_start(config)
  class_names = sources.get_class_names(config.data)
  num_train = sources.num_examples(config.data, config.data.train_split)
  spe = steps_per_epoch(config, num_train)
  total_steps = spe * config.num_epochs
  schedule = optim.warmup_cosine(
    config.optim, batch_size=config.batch_size, steps_per_epoch=spe, num_epochs=config.num_epochs
  )

  def watchdog(what: str):
    return parallel.watchdog(sync_timeout_s, what)

  # Orbax's barriers are collectives: their first use must find every process ready.
  parallel.sync_processes("opening the checkpoints", sync_timeout_s)
  with watchdog(f"Opening the checkpoints in {workdir}"):
    manager = checkpoint.create_manager(workdir, max_to_keep=config.keep_checkpoints)
    resumed_from = manager.latest_step()
    saved_config = None
    if resumed_from is not None:
      saved_config = checkpoint.restore_metadata(manager, resumed_from)["config"]
  start_step = resumed_from or 0
  if resumed_from is not None:
    changes = checkpoint.config_changes(saved_config, config)
    if changes:
      logging.warning(
        "Resuming step %d of %s with a changed config (the schedule follows the new one): %s",
        resumed_from,
        workdir,
        "; ".join(changes),
      )
  if start_step >= total_steps:
    with watchdog("Closing the checkpoint manager"):
      manager.close()
    logging.warning(
      "%s already holds the checkpoint of step %d and this config trains %d steps (%d epochs): "
      "nothing to do. Raise num_epochs to train on, or use another workdir.",
      workdir,
      start_step,
      total_steps,
      config.num_epochs,
    )
    last_row = train_log.LossHistory.last_row(workdir)
    return {
      "step": start_step,
      "epoch": start_step // spe,
      "loss": last_row.get("loss", float("nan")),
      "contrastive_accuracy": last_row.get("contrastive_accuracy", float("nan")),
      "resumed_from": resumed_from,
      "already_complete": True,
    }
  # Built before the model so that bad data or batch settings fail before any compilation.
  batches = pipeline.create_pretrain_iterator(
    resolution.config_for_epoch(config, start_step // spe),
    seed=config.seed,
    start_epoch=start_step // spe,
  )
  ops = cpu_kernels.make_ops(config.runtime, dtype=config.model.dtype)
  model = models.build_model(
    config.model, image_size=config.data.image_size, axis_name=parallel.AXIS_NAME, ops=ops
  )
  rng = jax.random.PRNGKey(config.seed)
  init_rng, augment_rng = jax.random.split(rng)
  state = create_train_state(config, model, init_rng, schedule)
  if resumed_from is not None:
    with watchdog(f"Restoring the checkpoint of step {resumed_from}"):
      restored = checkpoint.restore_state(manager, _checkpoint_tree(state), resumed_from)
    state = state.replace(**restored)
    logging.info("Resuming from the checkpoint of step %d in %s", resumed_from, workdir)
  if int(state.step) != start_step:
    raise ValueError(f"checkpoint {resumed_from} in {workdir} holds step {int(state.step)}")
  for _ in range(start_step % spe):
    next(batches)

  history = train_log.LossHistory(workdir, resume_step=start_step) if is_main else None
  writer = train_log.ScalarWriter(workdir) if is_main else None

  p_train_step = make_train_step(config, schedule, sequential_augment=ops.sequential_augment)
  p_state = parallel.replicate(state)
  del state
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last = {"loss": float("nan"), "contrastive_accuracy": float("nan")}
  progress = tqdm.tqdm(
    total=total_steps, initial=start_step, disable=not is_main, unit="step", dynamic_ncols=True
  )
  timer_start, timer_steps = time.perf_counter(), 0

  def flush(step: int) -> None:
    """Brings pending metrics to the host (one transfer per log interval, not per step)."""
    nonlocal timer_start, timer_steps
    steps, metrics = [s for s, _ in pending], parallel.unreplicate([m for _, m in pending])
    fetched = list(zip(steps, metrics, strict=True))
    pending.clear()
    elapsed = time.perf_counter() - timer_start
    pairs_per_s = timer_steps * config.batch_size / max(elapsed, 1e-9)
    timer_start, timer_steps = time.perf_counter(), 0
    # Counted when their results arrive, not when dispatched, so the bar's rate and ETA hold.
    progress.update(len(fetched))
    for s, m in fetched:
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(
          f"loss is {float(m['loss'])} at step {s}; stopping. The last good checkpoint "
          f"(step {manager.latest_step()}) in {checkpoint.checkpoint_dir(workdir)} is kept."
        )
    if not fetched:
      return
    rows = [
      {
        "step": s,
        "epoch": (s - 1) // spe + 1,
        "loss": float(m["loss"]),
        "contrastive_accuracy": float(m["contrastive_accuracy"]),
        "learning_rate": float(m["learning_rate"]),
      }
      for s, m in fetched
    ]
    last.update(rows[-1])
    if not is_main:
      return
    history.append(rows)
    scalars = {k: float(v) for k, v in fetched[-1][1].items()}
    writer.write(step, dict(scalars, pairs_per_second=pairs_per_s))
    progress.set_postfix(
      epoch=f"{rows[-1]['epoch']}/{config.num_epochs}",
      loss=f"{last['loss']:.4f}",
      acc=f"{last['contrastive_accuracy']:.3f}",
      lr=f"{last['learning_rate']:.3g}",
      pairs_s=f"{pairs_per_s:.1f}",
    )
    if step % config.plot_every_steps < len(rows) or step == total_steps:
      history.plot(f"{workdir}/training_losses.png")

  def compile_step(batch) -> None:
    """Compiles the step for `batch`'s shapes (the next call reuses it), then waits until every
    process has, so that they start the step's collectives together."""
    start = time.perf_counter()
    p_train_step.lower(p_state, batch, augment_rng).compile()
    size = "x".join(map(str, batch["view1"].shape[-3:-1]))
    logging.info("Train step compiled for %s px in %.1f s", size, time.perf_counter() - start)
    parallel.sync_processes(f"the first train step at {size} px", sync_timeout_s)

  compiled = False
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(batches)
      if not compiled:
        compile_step(batch)
        compiled = True
      p_state, metrics = p_train_step(p_state, batch, augment_rng)
      pending.append((step, metrics))
      timer_steps += 1
      epoch_done = step % spe == 0
      if step % config.log_every_steps == 0 or epoch_done:
        flush(step)
      if epoch_done:
        epoch = step // spe
        if epoch % config.checkpoint_every_epochs == 0 or step == total_steps:
          with watchdog(f"Saving the checkpoint of step {step}"):
            checkpoint.save(
              manager,
              step,
              parallel.unreplicate(_checkpoint_tree(p_state)),
              config=config,
              class_names=class_names,
            )
        if epoch == switch_epoch and step < total_steps:
          # Progressive resizing: a new stream of larger crops from this epoch on (the step
          # compiles once more for the new shape); the same stream a run resumed here reads.
          # A new cache side decodes the split again (the previous cache stays in memory).
          final = resolution.config_for_epoch(config, epoch)
          switch_start = time.perf_counter()
          batches = pipeline.create_pretrain_iterator(final, seed=config.seed, start_epoch=epoch)
          compiled = False
          progress.clear()  # the message gets its own line, not the bar's
          logging.info(
            "Epoch %d on: %d px crops (cache %d px); new stream in %.1f s",
            epoch + 1,
            final.data.image_size,
            final.data.cache_shorter_side,
            time.perf_counter() - switch_start,
          )
    flush(total_steps)
  finally:
    progress.close()
    with watchdog("Finishing the checkpoint writes"):
      manager.wait_until_finished()
      manager.close()
    if writer is not None:
      writer.close()
  if history is not None:
    history.plot(f"{workdir}/training_losses.png")
  return {
    "step": total_steps,
    "epoch": config.num_epochs,
    "loss": last["loss"],
    "contrastive_accuracy": last["contrastive_accuracy"],
    "resumed_from": resumed_from,
    "already_complete": False,
  }
