"""The PyTorch original's train step on this machine: the reference for the JAX step.

Not part of simclr-jax and not a dependency: it needs `torch` (CPU build), which the project never
installs. Run it from a separate environment, e.g.

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch   # a CPU wheel
    /tmp/torchenv/bin/python benchmarks/pytorch_reference.py --px 96 --pairs 64

The step is the PyTorch original's: ResNet-18 (He et al. 2016, ImageNet stem, BN in training mode,
no fc), projection head 512-100-100-100 (plain MLP with biases, ReLU between layers), NT-Xent over
the 2N views at temperature 0.05 (SimCLR eq. 1), Adam 1e-3. It prints the median seconds of the
forward pass (without autograd, BN in training mode) and of the whole step (forward, backward, Adam)
on a fixed random batch, so data loading and augmentation are not measured (the JAX benchmark
likewise excludes the input pipeline and, with `--noaugment`, its on-device augmentation; see
docs/benchmarks.md). Both memory formats are worth trying: oneDNN is faster on channels-last.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.shortcut = nn.Sequential()
    if stride != 1 or c_in != c_out:
      self.shortcut = nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18() -> nn.Module:
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
  layers.append(nn.MaxPool2d(3, 2, 1))
  c_in = 64
  for c_out in (64, 128, 256, 512):  # four stages of two blocks; stages 2-4 start with stride 2
    for stride in (1 if c_out == 64 else 2, 1):
      layers.append(BasicBlock(c_in, c_out, stride))
      c_in = c_out
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  return nn.Sequential(*layers)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
  """z: [2N, D], rows i and i + N are the two views of example i."""
  z = F.normalize(z, dim=1)
  logits = z @ z.t() / temperature
  logits.fill_diagonal_(float("-inf"))
  n = z.shape[0] // 2
  positives = (torch.arange(2 * n) + n) % (2 * n)
  return F.cross_entropy(logits, positives)


def median_seconds(fn, steps: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(memory_format: str, px: int, pairs: int, steps: int) -> tuple[float, float]:
  """Median seconds of the forward pass and of the whole train step."""
  fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[memory_format]
  head = nn.Sequential(
    nn.Linear(512, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100)
  )
  model = nn.Sequential(resnet18(), head).to(memory_format=fmt).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  images = torch.randn(2 * pairs, 3, px, px).contiguous(memory_format=fmt)

  def forward():
    with torch.no_grad():
      model(images)

  def step():
    optimizer.zero_grad()
    nt_xent(model(images), 0.05).backward()
    optimizer.step()

  return median_seconds(forward, steps), median_seconds(step, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--px", type=int, default=96)
  parser.add_argument("--pairs", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--memory_format", choices=["channels_last", "contiguous"], default=None)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  formats = [args.memory_format] if args.memory_format else ["contiguous", "channels_last"]
  for name in formats:
    forward_s, step_s = measure(name, args.px, args.pairs, args.steps)
    print(
      f"torch {torch.__version__}, {torch.get_num_threads()} threads, {name}, ResNet-18 "
      f"{args.px} px, {args.pairs} pairs: forward {forward_s:.3f} s, step {step_s:.3f} s = "
      f"{args.pairs / step_s:.1f} pairs/s"
    )


if __name__ == "__main__":
  main()
