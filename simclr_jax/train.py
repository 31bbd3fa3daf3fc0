"""SimCLR pretraining: the pmapped train step and the training loop (paper §2, Algorithm 1).

One `jax.pmap` call site over all local devices (axis name `batch`): both views of the local
batch go through the encoder as one batch, batch-norm statistics are synced across devices,
the NT-Xent loss takes its negatives from the global batch, gradients are averaged with
`lax.pmean`, and the state is donated. The augmentation key of each image is folded from the step
and its index in the global batch, so the draws do not depend on the device count and a resumed
run continues the same random stream.
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

from simclr_jax import (
  augment,
  checkpoint,
  input_pipeline,
  losses,
  models,
  optim,
  parallel,
  train_log,
)


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


def final_phase_start(config: ml_collections.ConfigDict) -> int | None:
  """The first (0-based) epoch cropped at ``data.final_image_size``, or None without that phase.

  Progressive resizing (Tan & Le 2021, "EfficientNetV2", §4: small images early, larger late):
  most epochs run on small, cheap crops, the last ``data.final_size_epochs`` on larger ones, under
  one learning-rate schedule, so the encoder ends at the resolution that the probe's larger test
  view shows it (FixRes, Touvron et al. 2019, §3). The boundary is counted from ``num_epochs``:
  resuming with a larger ``num_epochs`` moves it.

  Raises:
    ValueError: ``data.final_size_epochs`` outside [0, num_epochs]; > 0 with
      ``data.final_image_size`` <= 0; ``data.final_image_size`` or
      ``data.final_cache_shorter_side`` set while ``data.final_size_epochs`` is 0 (they would be
      ignored); a negative ``data.final_cache_shorter_side``; or ``model.cifar_stem`` left to
      the automatic choice (None) when ``data.image_size`` and ``data.final_image_size`` fall on
      different sides of 32 px (the stem is built once, from ``data.image_size``).
  """
  data = config.data
  epochs = int(data.get("final_size_epochs", 0) or 0)
  size = int(data.get("final_image_size", 0) or 0)
  cache_side = int(data.get("final_cache_shorter_side", 0) or 0)
  if not 0 <= epochs <= config.num_epochs:
    raise ValueError(
      f"config.data.final_size_epochs={epochs} must be in [0, num_epochs={config.num_epochs}]."
    )
  if cache_side < 0:
    raise ValueError(
      f"config.data.final_cache_shorter_side={cache_side} must be >= 0 (0: cache_shorter_side)."
    )
  if not epochs:
    if size or cache_side:
      raise ValueError(
        f"config.data.final_image_size={size} / final_cache_shorter_side={cache_side} are set "
        "but config.data.final_size_epochs=0, so no epoch would use them; set the number of "
        "final epochs, or 0 for both."
      )
    return None
  if size <= 0:
    raise ValueError(
      f"config.data.final_size_epochs={epochs} needs config.data.final_image_size > 0 (px), "
      f"got {size}."
    )
  if config.model.get("cifar_stem") is None and (data.image_size <= 32) != (size <= 32):
    raise ValueError(
      f"config.model.cifar_stem=None picks the stem from data.image_size={data.image_size} "
      f"(CIFAR stem iff <= 32 px), which does not suit data.final_image_size={size}; set "
      "config.model.cifar_stem to True or False."
    )
  return config.num_epochs - epochs


def config_for_epoch(config: ml_collections.ConfigDict, epoch: int) -> ml_collections.ConfigDict:
  """`config` with the crop size (and cache side) that pretraining uses in 0-based `epoch`.

  Before `final_phase_start` (or without a final phase) this is `config` itself; from it on, a
  copy whose ``data.image_size`` is ``data.final_image_size`` and, if set,
  ``data.cache_shorter_side`` is ``data.final_cache_shorter_side``.

  Raises:
    ValueError: see `final_phase_start`.
  """
  start = final_phase_start(config)
  if start is None or epoch < start:
    return config
  phase = config.copy_and_resolve_references()
  phase.data.image_size = config.data.final_image_size
  if config.data.final_cache_shorter_side:
    phase.data.cache_shorter_side = config.data.final_cache_shorter_side
  return phase


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


def make_train_step(config: ml_collections.ConfigDict, schedule: optax.Schedule, devices=None):
  """Returns `p_train_step(state, batch, rng) -> (state, metrics)`, pmapped over `devices`.

  `devices` defaults to all local devices.

  `state` is replicated ([devices, ...] leaves) and donated; `batch` holds `view1`, `view2`:
  float32 [devices, per_device, H, W, 3] in [0, 1]; `rng` is one key shared by all devices.
  Metrics are global-batch scalars, identical on every device: `loss`,
  `contrastive_accuracy`, `positive_similarity`, `negative_similarity`, `learning_rate`.
  The leading batch axis must equal the number of devices (pmap raises a ValueError otherwise);
  `input_pipeline` checks earlier that `batch_size` is a multiple of the device count.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    # Keys per (step, global example index): the same draws however the batch is split over
    # devices or hosts, so a run resumed on another device count continues the same stream.
    per_device = batch["view1"].shape[0]
    first = jax.lax.axis_index(parallel.AXIS_NAME) * per_device  # pmap's axis spans every host
    view1, view2 = augment.augment_views(
      jax.random.fold_in(rng, state.step),
      batch["view1"],
      batch["view2"],
      config.augment,
      example_ids=first + jnp.arange(per_device),
    )
    images = jnp.concatenate([view1, view2], axis=0)

    def loss_fn(params):
      (projection, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
      )
      z1, z2 = jnp.split(projection, 2, axis=0)
      loss, metrics = losses.nt_xent(
        z1, z2, temperature=config.temperature, axis_name=parallel.AXIS_NAME
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


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
  }


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (or resumes) a SimCLR model as configured; writes everything under `workdir`.

  Writes: `checkpoints/` (Orbax, every `checkpoint_every_epochs` and at the end),
  `loss_history.csv`, `training_losses.png`, `tensorboard/`.

  Returns:
    A summary: `step`, `epoch`, final `loss` and `contrastive_accuracy`, `resumed_from` (the
    checkpoint step resumed from, or None), and `already_complete` (True when the latest
    checkpoint had already reached `num_epochs`, so nothing was trained).

  Raises:
    ValueError: bad data or config values (see `input_pipeline`, `optim`, `models`, and
      `final_phase_start` for ``data.final_*``), before anything is written.
    FloatingPointError: the loss became NaN or Inf; names the step. The last good checkpoint
      stays the latest on disk.
  """
  is_main = jax.process_index() == 0
  switch_epoch = final_phase_start(config)  # validates data.final_* before anything is written
  class_names = input_pipeline.get_class_names(config.data)
  num_train = input_pipeline.num_examples(config.data, config.data.train_split)
  spe = steps_per_epoch(config, num_train)
  total_steps = spe * config.num_epochs
  schedule = optim.warmup_cosine(
    config.optim, batch_size=config.batch_size, steps_per_epoch=spe, num_epochs=config.num_epochs
  )
  manager = checkpoint.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  resumed_from = manager.latest_step()
  start_step = resumed_from or 0
  if resumed_from is not None:
    changes = checkpoint.config_changes(
      checkpoint.restore_metadata(manager, resumed_from)["config"], config
    )
    if changes:
      logging.warning(
        "Resuming step %d of %s with a changed config (the schedule follows the new one): %s",
        resumed_from,
        workdir,
        "; ".join(changes),
      )
  if start_step >= total_steps:
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
  batches = input_pipeline.create_pretrain_iterator(
    config_for_epoch(config, start_step // spe), seed=config.seed, start_epoch=start_step // spe
  )
  model = models.build_model(
    config.model, image_size=config.data.image_size, axis_name=parallel.AXIS_NAME
  )
  rng = jax.random.PRNGKey(config.seed)
  init_rng, augment_rng = jax.random.split(rng)
  state = create_train_state(config, model, init_rng, schedule)
  if resumed_from is not None:
    state = state.replace(
      **checkpoint.restore_state(manager, _checkpoint_tree(state), resumed_from)
    )
    logging.info("Resuming from the checkpoint of step %d in %s", resumed_from, workdir)
  if int(state.step) != start_step:
    raise ValueError(f"checkpoint {resumed_from} in {workdir} holds step {int(state.step)}")
  for _ in range(start_step % spe):
    next(batches)

  history = train_log.LossHistory(workdir, resume_step=start_step) if is_main else None
  writer = train_log.ScalarWriter(workdir) if is_main else None

  p_train_step = make_train_step(config, schedule)
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
    fetched = jax.device_get([(s, jax.tree_util.tree_map(lambda x: x[0], m)) for s, m in pending])
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
    if not fetched or not is_main:
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
    history.append(rows)
    last.update(rows[-1])
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

  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(batches)
      p_state, metrics = p_train_step(p_state, batch, augment_rng)
      pending.append((step, metrics))
      timer_steps += 1
      epoch_done = step % spe == 0
      if step % config.log_every_steps == 0 or epoch_done:
        flush(step)
      if epoch_done:
        epoch = step // spe
        if epoch % config.checkpoint_every_epochs == 0 or step == total_steps:
          checkpoint.save(
            manager,
            step,
            _checkpoint_tree(parallel.unreplicate(p_state)),
            config=config,
            class_names=class_names,
          )
        if epoch == switch_epoch and step < total_steps:
          # Progressive resizing: a new stream of larger crops from this epoch on (the step
          # compiles once more for the new shape); the same stream a run resumed here reads.
          # A new cache side decodes the split again (the previous cache stays in memory).
          final = config_for_epoch(config, epoch)
          switch_start = time.perf_counter()
          batches = input_pipeline.create_pretrain_iterator(
            final, seed=config.seed, start_epoch=epoch
          )
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
