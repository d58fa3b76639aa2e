"""Times DTM morphing + group means + loss on the CPU: jitted JAX vs the loop reference vs a PyTorch version.

  python benchmarks/morphing.py            # B=64, N=196, D=512, L=2 schedules, 10 timed schedule draws

Prints a markdown table of milliseconds per step (median over the same schedule draws for JAX and PyTorch; wall
clock and process CPU time, which sums all threads and so is steadier on a shared machine), the partitions' agreement
between the JAX and PyTorch versions, the share of a ViT-B/16 DTM step's FLOPs that morphing + loss represent, and
the time the token Gram matmul takes at this machine's measured matmul rate.

The PyTorch version follows the released code's algorithm (ToMe-style bipartite soft matching, size-weighted
merging, a [B, slots, N] source matrix for the groups, one schedule shared by the batch), written from docs/METHOD.md
§3; it runs on 2 threads. The loop reference (tests/morphing_reference.py) runs on a few images and is scaled to B.
"""
import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from dtm_jax.runtime import cpu_host  # pylint: disable=g-import-not-at-top

cpu_host.configure()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import morphing_reference as reference
import numpy as np
import torch

from dtm_jax import losses, morphing


# ----------------------------------------------------------------------------------------------------------------
# PyTorch version of the released code's algorithm.
# ----------------------------------------------------------------------------------------------------------------
def torch_morph(tokens, num_merge, num_iters, protect_first=True):
  """Slot means [B, t, D], sizes [B, t, 1] and the source matrix [B, t, N] after one shared schedule."""
  batch, num_tokens, _ = tokens.shape
  protected = int(protect_first)
  r = reference.merges_per_round(num_merge, num_iters, num_tokens)
  x = tokens
  size = torch.ones(batch, num_tokens, 1)
  source = torch.eye(num_tokens).expand(batch, num_tokens, num_tokens)
  for _ in range(num_iters if num_merge > 0 else 0):
    merges = min(r, (x.shape[1] - protected) // 2)
    if merges <= 0:
      break
    metric = x / x.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if protected:
      scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True, stable=True)[..., None]
    unmerged, sources = ranked[:, merges:], ranked[:, :merges]
    if protected:
      unmerged = unmerged.sort(dim=1).values
    destinations = partner[..., None].gather(1, sources)

    def merge(values, reduce):
      a, b = values[:, ::2], values[:, 1::2]
      width = values.shape[-1]
      kept = a.gather(1, unmerged.expand(-1, -1, width))
      moved = a.gather(1, sources.expand(-1, -1, width))
      return torch.cat([kept, b.scatter_reduce(1, destinations.expand(-1, -1, width), moved, reduce=reduce)], dim=1)

    x = merge(x * size, "sum")
    size = merge(size, "sum")
    x = x / size
    source = merge(source, "amax")
  return x, size, source


def torch_step(student, target, schedules):
  """Morph + group means + smooth-L1 (β = 2) averaged over schedules, as the released training step computes it."""
  total = 0.0
  for num_merge, num_iters in schedules:
    slot_means, size, source = torch_morph(target, num_merge, num_iters)
    morphed_target = source.transpose(1, 2) @ slot_means
    morphed_student = source.transpose(1, 2) @ ((source @ student) / size)
    total = total + torch.nn.functional.smooth_l1_loss(morphed_student, morphed_target, beta=2.0)
  return total / len(schedules)


def torch_groups(source):
  """Group id of every token from a source matrix [B, t, N]."""
  return source.argmax(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------------------------------------------
def vit_forward_flops(tokens, width, depth, mlp_dim, patch_pixels, out_dim):
  """2 × multiply-adds of a pre-LN ViT on `tokens` tokens (CLS included): projections, attention, MLP, embed, head."""
  per_block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp_dim
  embed = (tokens - 1) * patch_pixels * width
  head = (tokens - 1) * width * out_dim
  return 2.0 * (depth * per_block + embed + head)


def morphing_flops(num_tokens, dim, draws, protect_first=True):
  """(Gram, total) FLOPs per image and step, averaged over the draws (lists of (num_merge, num_iters)).

  dtm_jax.morphing computes the token Gram matrix once (2·N²·D, shared by the schedules); a round then reads the
  ⌈t/2⌉×⌊t/2⌋ slot similarities (t slots left; about 4 FLOPs each) and merges each source in 4·N additions. The
  loss adds, per schedule, the group sums of student − target and the elementwise loss (about 6·N·D).
  """
  gram = 2.0 * num_tokens * num_tokens * dim
  other = 0.0
  for num_merge, num_iters in (schedule for schedules in draws for schedule in schedules):
    count = num_tokens
    r = reference.merges_per_round(num_merge, num_iters, num_tokens) if num_merge else 0
    for _ in range(num_iters):
      merges = min(r, (count - int(protect_first)) // 2)
      if merges <= 0:
        break
      other += 4.0 * math.ceil(count / 2) * (count // 2) + 4.0 * merges * num_tokens
      count -= merges
    other += 6.0 * num_tokens * dim
  other = other / len(draws) + num_tokens * dim  # and student − target, once
  return gram, gram + other


# ----------------------------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------------------------
def timed(fn):
  """(wall ms, process CPU ms, result) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3, result


def matmul_rate(batch, num_tokens, dim):
  """Measured float32 FLOPs per wall-clock second of morphing.token_gram (the batched N×D×N Gram matmul)."""
  x = jnp.ones((batch, num_tokens, dim), jnp.float32)
  gram = jax.jit(morphing.token_gram)
  jax.block_until_ready(gram(x))
  seconds = statistics.median(timed(lambda: jax.block_until_ready(gram(x)))[0] for _ in range(10)) / 1e3
  return 2.0 * batch * num_tokens * num_tokens * dim / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=196)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--schedules", type=int, default=2)
  parser.add_argument("--runs", type=int, default=10, help="timed schedule draws (after one warm-up call)")
  parser.add_argument("--reference_images", type=int, default=2, help="images the loop reference runs on")
  args = parser.parse_args()
  torch.set_num_threads(2)

  rng = np.random.default_rng(0)
  target = rng.normal(size=(args.batch, args.tokens, args.dim)).astype(np.float32)
  student = (target + 0.5 * rng.normal(size=target.shape)).astype(np.float32)
  draws = []
  for seed in range(args.runs):
    num_merge, num_iters = morphing.sample_schedules(jax.random.key(seed), args.batch, args.schedules,
                                                     max_merge=args.tokens)
    draws.append([(int(m[0]), int(k[0])) for m, k in zip(np.asarray(num_merge), np.asarray(num_iters))])

  # (a) Jitted JAX: morph for every schedule, group means, loss.
  @jax.jit
  def jax_step(student, target, num_merge, num_iters):
    groups = morphing.morph_schedules(target, num_merge, num_iters)
    return losses.dtm_loss(student, target, groups), groups

  student_j, target_j = jnp.asarray(student), jnp.asarray(target)

  def run_jax(schedules):
    num_merge = jnp.asarray([[m] * args.batch for m, _ in schedules], jnp.int32)
    num_iters = jnp.asarray([[k] * args.batch for _, k in schedules], jnp.int32)
    return jax.block_until_ready(jax_step(student_j, target_j, num_merge, num_iters))

  # (c) PyTorch on the same draws.
  student_t, target_t = torch.from_numpy(student), torch.from_numpy(target)

  def run_torch(schedules):
    with torch.no_grad():
      return torch_step(student_t, target_t, schedules)

  run_jax(draws[0])
  run_torch(draws[0])
  jax_times, torch_times, agreement = [], [], []
  for schedules in draws:
    jax_wall, jax_cpu, (jax_loss, jax_groups) = timed(lambda: run_jax(schedules))
    torch_wall, torch_cpu, torch_loss = timed(lambda: run_torch(schedules))
    jax_times.append((jax_wall, jax_cpu))
    torch_times.append((torch_wall, torch_cpu))
    for (num_merge, num_iters), groups in zip(schedules, np.asarray(jax_groups)):
      source = torch_morph(target_t, num_merge, num_iters)[2]
      agreement.append(np.mean(np.all(torch_groups(source).numpy() == groups, axis=1)))
    assert abs(float(jax_loss) - float(torch_loss)) < 1e-4 * abs(float(torch_loss)) + 1e-6, (jax_loss, torch_loss)

  # (b) The loop reference on a few images of the first draw, scaled to the batch.
  images = min(args.reference_images, args.batch)

  def run_reference(schedules):
    groups = [[reference.morph(target[b], m, k)[0] for b in range(images)] for m, k in schedules]
    return reference.dtm_loss(student[:images], target[:images], groups)

  ref_wall, ref_cpu, _ = timed(lambda: run_reference(draws[0]))
  ref_scale = args.batch / images
  jax_first = jax_times[0]

  # (d) FLOP share of a ViT-B/16 DTM step per image: student fwd+bwd = 3× forward, CLIP ViT-B/16 teacher forward.
  tokens_with_cls = args.tokens + 1
  student_flops = 3 * vit_forward_flops(tokens_with_cls, 768, 12, 3072, 16 * 16 * 3, 512)
  teacher_flops = vit_forward_flops(tokens_with_cls, 768, 12, 3072, 16 * 16 * 3, 512)
  gram_flops, dtm_flops = morphing_flops(args.tokens, args.dim, draws)
  rate = matmul_rate(args.batch, args.tokens, args.dim)

  def median(times, column):
    return statistics.median(t[column] for t in times)

  print(f"B={args.batch}, N={args.tokens}, D={args.dim}, L={args.schedules} schedules, {args.runs} draws; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print()
  print("| implementation | wall ms (median) | CPU ms (median) | × JAX (wall) | × JAX (CPU) |")
  print("|---|---|---|---|---|")
  jax_wall, jax_cpu = median(jax_times, 0), median(jax_times, 1)
  print(f"| JAX, jitted (dtm_jax.morphing + dtm_jax.losses) | {jax_wall:.0f} | {jax_cpu:.0f} | 1 | 1 |")
  torch_wall, torch_cpu = median(torch_times, 0), median(torch_times, 1)
  print(f"| PyTorch, released-code algorithm, 2 threads | {torch_wall:.0f} | {torch_cpu:.0f} | "
        f"{torch_wall / jax_wall:.1f} | {torch_cpu / jax_cpu:.1f} |")
  print(f"| loop reference (first draw only; {images} images × {ref_scale:g}) | {ref_wall * ref_scale:.0f} | "
        f"{ref_cpu * ref_scale:.0f} | {ref_wall * ref_scale / jax_first[0]:.0f} | "
        f"{ref_cpu * ref_scale / jax_first[1]:.0f} |")
  print()
  print(f"JAX and PyTorch partitions identical for {100 * np.mean(agreement):.1f}% of image-schedules "
        "(differences come from float near-ties); losses agree to 1e-4.")
  print(f"FLOPs per image: student 3 × {student_flops / 3e9:.2f} G + CLIP teacher {teacher_flops / 1e9:.2f} G = "
        f"{(student_flops + teacher_flops) / 1e9:.1f} GFLOP; morphing + group means + loss "
        f"{dtm_flops / 1e6:.0f} MFLOP (rounds actually run, mean over the draws) = "
        f"{100 * dtm_flops / (student_flops + teacher_flops):.2f}% of the step.")
  print(f"Floor: the token Gram matrices alone are {gram_flops * args.batch / 1e9:.2f} GFLOP per step; "
        f"morphing.token_gram computes them at {rate / 1e9:.0f} GFLOP/s (wall, measured here), in "
        f"{gram_flops * args.batch / rate * 1e3:.0f} ms.")


if __name__ == "__main__":
  main()
