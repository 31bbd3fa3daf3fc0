"""Optimisers and learning-rate schedules of SimCLR (paper §B.1 / Appendix B.9), from optax.

LARS (You et al. 2017) with momentum 0.9 and trust coefficient 1e-3; batch-norm parameters and
biases are excluded from both weight decay and the trust-ratio adaptation, as in the official
code. Learning rate: base_lr x B / 256 (linear) or base_lr x sqrt(B) (square root), linear
warmup, then cosine decay to zero.
"""

import math

import jax
import ml_collections
import optax

_OPTIMIZERS = ("lars", "sgd", "adam", "adamw")


def peak_learning_rate(optim_config: ml_collections.ConfigDict, batch_size: int) -> float:
  """The learning rate after warmup, from the scaling rule `optim.lr_scaling`.

  Raises:
    ValueError: unknown `optim.lr_scaling`.
  """
  scaling = optim_config.lr_scaling
  if scaling == "linear":
    return optim_config.base_lr * batch_size / 256
  if scaling == "sqrt":
    return optim_config.base_lr * math.sqrt(batch_size)
  if scaling == "none":
    return optim_config.base_lr
  raise ValueError(f"optim.lr_scaling must be 'linear', 'sqrt' or 'none'; got {scaling!r}")


def warmup_cosine(
  optim_config: ml_collections.ConfigDict, *, batch_size: int, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """Learning rate per step: linear warmup from 0 over `optim.warmup_epochs`, then cosine to 0.

  With `optim.schedule == "constant"` the peak rate throughout (the PyTorch original's Adam).

  Raises:
    ValueError: unknown `optim.schedule`, or warmup longer than the run.
  """
  peak = peak_learning_rate(optim_config, batch_size)
  total_steps = steps_per_epoch * num_epochs
  if optim_config.schedule == "constant":
    return optax.constant_schedule(peak)
  if optim_config.schedule != "warmup_cosine":
    raise ValueError(
      f"optim.schedule must be 'warmup_cosine' or 'constant'; got {optim_config.schedule!r}"
    )
  warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
  if warmup_steps > total_steps:
    raise ValueError(
      f"optim.warmup_epochs={optim_config.warmup_epochs} exceeds num_epochs={num_epochs}"
    )
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=max(total_steps, 1)
  )


def decay_mask(params) -> object:
  """Pytree of bools: True for weights that get weight decay and LARS adaptation.

  Convolution and dense kernels are decayed; batch-norm scales and biases (every leaf named
  `scale` or `bias`) are not, as in the official SimCLR code.
  """

  def is_kernel(path, _):
    name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
    return name not in ("scale", "bias")

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(
  optim_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The optimiser named by `optim.name`: 'lars', 'sgd' (momentum), 'adam' or 'adamw'.

  Weight decay (`optim.weight_decay`) always skips batch-norm parameters and biases. For 'sgd'
  and 'adam' it is L2 regularisation added to the gradient (PyTorch's `weight_decay`, as in
  the PyTorch original); for 'adamw' it is decoupled; for 'lars' it is added before the trust ratio.

  Raises:
    ValueError: unknown optimiser name.
  """
  name, wd = optim_config.name, optim_config.weight_decay
  if name == "lars":
    return optax.lars(
      schedule,
      weight_decay=wd,
      weight_decay_mask=decay_mask,
      trust_coefficient=optim_config.trust_coefficient,
      trust_ratio_mask=decay_mask,
      momentum=optim_config.momentum,
    )
  if name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(wd, mask=decay_mask),
      optax.sgd(schedule, momentum=optim_config.momentum),
    )
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), optax.adam(schedule))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
  raise ValueError(f"optim.name must be one of {_OPTIMIZERS}; got {name!r}")
