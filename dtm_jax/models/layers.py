"""Transformer pieces shared by the student ViT and the CLIP vision tower.

Both are pre-LN ViTs; they differ only in options (q/v vs full qkv bias, relative position bias, layer scale,
activation, LayerNorm epsilon), so one `Block` serves both and the converters map onto one parameter layout.

Mixed precision as PyTorch AMP runs the released code: the residual stream, layer scale and the residual adds are
float32, LayerNorm statistics are float32 (two-pass variance); only the inputs of matmuls and attention are in the
compute dtype. In bf16 a residual update of ViT-L's initial γ·branch (γ = 1e-5) would otherwise round away entirely.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtm_jax import kernels, platform

ATTENTION_IMPLS = (None, "xla", "cudnn", "cpu")  # None: the platform's default (default_attention_impl)
# What the backward pass keeps of a block's forward (the rest is recomputed): everything ("none": no remat), the
# outputs of its token-wise matmuls — qkv, projection, MLP — ("dots": recomputes LayerNorms, GELU and attention,
# ~5% more compute, saves most activation memory), or only the block's input ("full": one more forward, ~+33%).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
ACTIVATIONS = ("gelu", "quick_gelu")
QKV_BIASES = ("qkv", "qv")


def trunc_normal(std=0.02):
  """N(0, std²) restricted to [-std, std], without re-scaling: BEiT's own `trunc_normal_(a=-std, b=std)`.

  Flax's `truncated_normal` re-scales the samples back to `std`, which would not reproduce BEiT's initialisation.
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)
  return init


def gelu(x):
  """Exact GELU as PyTorch computes it, x·(1 + erf(x/√2))/2.

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates ~3× slower; the two differ by less than
  1e-6, only where GELU is ~0 (the erf form loses digits to cancellation there, as PyTorch's formula does).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def activation_fn(name):
  """Exact (erf) GELU for the student; QuickGELU `x·σ(1.702x)` for OpenAI-trained CLIP."""
  if name == "gelu":
    return gelu
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


def check_attention_impl(name):
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={name!r} is not one of {ATTENTION_IMPLS} (None: the platform's default).")


def check_remat(name):
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat={name!r} is not one of {tuple(REMAT_POLICIES)}.")


def run_block(block, x, attn_bias=None, dropout_rng=None, *, remat="none"):
  """`block(x, attn_bias, dropout_rng)`, rematerialised in the backward pass by the named policy (REMAT_POLICIES).

  The block's parameters go through `jax.checkpoint` as explicit arguments (split from the module), so the saved
  residuals are exactly what the policy keeps.
  """
  check_remat(remat)
  if remat == "none":
    return block(x, attn_bias, dropout_rng)
  graphdef, state = nnx.split(block)

  def call(state, x, attn_bias, dropout_rng):
    return nnx.merge(graphdef, state)(x, attn_bias, dropout_rng)

  return jax.checkpoint(call, policy=REMAT_POLICIES[remat])(state, x, attn_bias, dropout_rng)


def num_relative_positions(grid_size):
  """Rows of a BEiT relative-position table: (2W−1)² offsets plus cls→token, token→cls and cls→cls."""
  return (2 * grid_size - 1) ** 2 + 3


@functools.lru_cache(maxsize=16)
def relative_position_index(grid_size):
  """BEiT's static index [1+N, 1+N] into the relative-position table of a square W×W patch grid (CLS first)."""
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  coords = np.stack([rows.ravel(), cols.ravel()])  # [2, N], row-major patch order.
  offsets = coords[:, :, None] - coords[:, None, :] + (grid_size - 1)  # [2, N, N], shifted to start at 0.
  num_rows = num_relative_positions(grid_size)
  n = grid_size * grid_size
  index = np.zeros((n + 1, n + 1), np.int32)
  index[1:, 1:] = offsets[0] * (2 * grid_size - 1) + offsets[1]
  index[0, :] = num_rows - 3  # cls → token
  index[:, 0] = num_rows - 2  # token → cls
  index[0, 0] = num_rows - 1  # cls → cls
  return index


def relative_position_bias(table, grid_size):
  """Additive attention bias [1, heads, 1+N, 1+N] looked up from a table [rows, heads].

  On CPUs a gather by BEiT's index. On accelerators the gather's gradient would be a scatter-add of (1+N)² rows
  per table (TPUs run scatters nearly serially; GPUs with atomics), so there the lookup is two matmuls with small
  0/1 offset matrices (`_relative_position_bias_by_matmul`): exact, and its gradient is matmuls too.
  """
  if not platform.current().is_cpu:
    return _relative_position_bias_by_matmul(table, grid_size)
  index = relative_position_index(grid_size)
  bias = jnp.take(table, index.reshape(-1), axis=0).reshape(*index.shape, table.shape[-1])
  return jnp.transpose(bias, (2, 0, 1))[None]


@functools.lru_cache(maxsize=16)
def _offset_one_hot(grid_size):
  """[W, W, 2W−1] float32: entry (p, q, a) is 1 where a = p − q + W − 1 (the offset of row p from row q)."""
  offsets = np.arange(grid_size)[:, None] - np.arange(grid_size)[None, :] + grid_size - 1
  return (offsets[:, :, None] == np.arange(2 * grid_size - 1)).astype(np.float32)


def _relative_position_bias_by_matmul(table, grid_size):
  """`relative_position_bias` without a gather: the patch→patch part of the table, seen as [2W−1, 2W−1, heads]
  (row offset, column offset), is contracted with the one-hot row and column offsets; the CLS rows are broadcast.
  Every output is one table entry times 1 plus exact zeros (HIGHEST precision), so it equals the gather."""
  w, heads = grid_size, table.shape[-1]
  n, span = w * w, 2 * w - 1
  offsets = _offset_one_hot(w)
  grid = table[:span * span].reshape(span, span, heads)
  by_column = jnp.einsum("stb,abh->stah", offsets, grid, precision=jax.lax.Precision.HIGHEST)
  patches = jnp.einsum("pqa,stah->hpsqt", offsets, by_column, precision=jax.lax.Precision.HIGHEST)
  patches = patches.reshape(heads, n, n)  # (row p, column s) attends to (row q, column t), row-major patches
  cls_to_token, token_to_cls, cls_to_cls = (table[span * span + i] for i in range(3))
  top = jnp.concatenate([cls_to_cls[:, None, None], jnp.broadcast_to(cls_to_token[:, None, None], (heads, 1, n))],
                        axis=2)
  rest = jnp.concatenate([jnp.broadcast_to(token_to_cls[:, None, None], (heads, n, 1)), patches], axis=2)
  return jnp.concatenate([top, rest], axis=1)[None].astype(table.dtype)


def layer_norm(width, *, epsilon, dtype, rngs):
  """LayerNorm with float32 statistics computed in two passes (Flax's default E[x²]−E[x]² cancels badly when
  |mean| ≫ std), float32 parameters, output in `dtype`."""
  return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, use_fast_variance=False, rngs=rngs)


def per_token(layer, x):
  """`layer` applied to x [..., C] as one [tokens, C] matrix.

  Parameter gradients of token-wise layers (biases, LayerNorm and layer-scale vectors) are then sums over one
  leading axis, which XLA:CPU computes ~7× faster than sums over (B, T) (~0.3 vs 1.8 ms for [16, 197, 768]); the
  reshapes are free.
  """
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def drop_path(x, rate, rng):
  """Stochastic depth: zero a sample's residual branch with probability `rate`, rescale the survivors."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def default_attention_impl(dtype):
  """The attention the program's platform runs when the config leaves `attention_impl` unset (None).

  GPUs: cuDNN's fused kernel ("cudnn") in bf16/fp16, so the [B, heads, T, T] scores are never materialised (XLA's
  version, which `jax.nn.dot_product_attention` picks by itself, writes them out); float32 has no cuDNN kernel and
  takes "xla". TPUs: "xla" (XLA:TPU fuses attention itself). CPUs: "cpu" (the native kernel where it applies, else
  the head-major XLA version; see `Attention`).
  """
  target = platform.current()
  if target.platform == "gpu":
    return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return "cpu" if target.is_cpu else "xla"


def attention(q, k, v, bias=None, implementation=None):
  """softmax(q·kᵀ/√d + bias)·v for q, k, v [B, T, heads, d] and bias broadcastable to [B, heads, T, T].

  implementation: "xla" or "cudnn" (`jax.nn.dot_product_attention`), "cpu" (`_head_major_attention`: XLA:CPU runs
  batched matmuls over the [B, T, heads, d] layout at half speed, so the heads move ahead of the tokens first), or
  None for the platform's default (`default_attention_impl`). cuDNN's training kernels take an additive bias only
  for an even number of tokens, so with a bias an odd T is padded by one token (`_padded_cudnn_attention`).
  """
  implementation = implementation or default_attention_impl(q.dtype)
  if implementation == "cpu":
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T, d]
    return jnp.swapaxes(_head_major_attention(q, k, v, bias), 1, 2)
  if implementation == "cudnn" and bias is not None:
    return padded_attention(q, k, v, bias, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


# Added to the logits of padding keys: exp(−1e9 − max) is exactly 0 in float32 (and representable in bf16/fp16 as a
# large finite value, which cuDNN needs: an infinite bias gives NaN gradients).
_PADDING_LOGIT = -1e9


def padded_attention(q, k, v, bias, *, implementation):
  """`jax.nn.dot_product_attention` on tokens padded to an even count: the padding keys are masked through the bias
  (their logits get _PADDING_LOGIT, so their softmax weight is exactly 0) and the padding queries are dropped. Equal
  to unpadded attention, gradients included (the padding receives none)."""
  tokens = q.shape[1]
  if tokens % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation=implementation)
  pad_tokens = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  bias = jnp.broadcast_to(bias, bias.shape[:2] + (tokens, tokens))
  bias = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, 0), (0, 1), (0, 0)))  # padding queries: any bias
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=_PADDING_LOGIT)  # padding keys: masked
  out = jax.nn.dot_product_attention(pad_tokens(q), pad_tokens(k), pad_tokens(v), bias=bias.astype(q.dtype),
                                     implementation=implementation)
  return out[:, :tokens]


def use_cpu_attention_kernel(dtype, bias):
  """Whether `Attention` runs the native CPU kernel (dtm_jax.kernels.attention, ~2× faster than XLA:CPU forward and
  backward): float32 in a program for a single CPU device (dtm_jax.platform), with a bias shared by the batch (or
  none). With several devices the SPMD partitioner would gather the batch onto every device for a custom call, so
  XLA's version runs there.
  """
  target = platform.current()
  return (target.is_cpu and target.num_devices == 1 and dtype == jnp.float32 and
          (bias is None or bias.shape[0] == 1) and kernels.available())


@jax.custom_vjp
def _head_major_attention(q, k, v, bias):
  """Attention over q, k, v [B, heads, T, d] that never normalises the [T, T] probabilities.

  The output is (exp(s − max s)·v) / rowsum instead of softmax(s)·v, and the gradient uses
  dS = P ∘ (dP − rowsum(dO ∘ O)) (the FlashAttention identity), so forward and backward each make two fewer passes
  over the [B, heads, T, T] scores than autodiff of softmax (~3 ms a block for ViT-Tiny at batch 16 on XLA:CPU).
  Logits and softmax are float32, as in `jax.nn.dot_product_attention`.
  """
  return _attention_forward(q, k, v, bias)[0]


def _attention_forward(q, k, v, bias):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  row_sum = unnormalised.sum(axis=-1, keepdims=True)  # [B, heads, T, 1]
  out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32) / row_sum
  return out.astype(v.dtype), (q, k, v, bias, unnormalised, row_sum, out)


def _attention_backward(residuals, d_out):
  q, k, v, bias, unnormalised, row_sum, out = residuals
  scale = q.shape[-1] ** -0.5
  d_out = d_out.astype(jnp.float32)
  d_out_scaled = d_out / row_sum  # dO/l: then P·x = E·(x/l) row by row, so P is never formed.
  d_probs_scaled = jnp.einsum("bhqd,bhkd->bhqk", d_out_scaled, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out_scaled * out, axis=-1, keepdims=True)  # rowsum(dO ∘ O)/l
  d_logits = unnormalised * (d_probs_scaled - row_dot)  # P ∘ (dP − rowsum(dO ∘ O))
  d_v = jnp.einsum("bhqk,bhqd->bhkd", unnormalised, d_out_scaled, preferred_element_type=jnp.float32)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=jnp.float32) * scale
  d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32) * scale
  d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias


def _sum_to_shape(x, shape):
  """Sums x over the axes that broadcasting expanded from `shape` (same rank, or fewer leading axes)."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


_head_major_attention.defvjp(lambda q, k, v, bias: _attention_forward(q, k, v, bias), _attention_backward)


class Attention(nnx.Module):
  """Multi-head self-attention (`attention`: cuDNN's fused kernel on GPUs, XLA's on TPUs; on one CPU device, in
  float32, the native kernel dtm_jax.kernels.attention: see `use_cpu_attention_kernel`).

  `qkv_bias="qv"` is BEiT's layout (q and v biases, none on k); `"qkv"` is CLIP's packed in-projection bias.
  `rel_pos_grid` adds a per-block BEiT relative-position table for that patch grid.
  """

  def __init__(self, width, num_heads, *, qkv_bias, rel_pos_grid=None, out_init_std=0.02, dtype=jnp.float32,
               attention_impl=None, rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    if qkv_bias not in QKV_BIASES:
      raise ValueError(f"qkv_bias={qkv_bias!r} is not one of {QKV_BIASES}.")
    check_attention_impl(attention_impl)
    self.num_heads = num_heads
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.rel_pos_grid = rel_pos_grid
    linear = functools.partial(nnx.Linear, kernel_init=trunc_normal(), dtype=dtype, rngs=rngs)
    self.qkv = linear(width, 3 * width, use_bias=qkv_bias == "qkv")
    self.q_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias == "qv" else None
    self.v_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias == "qv" else None
    self.rel_pos_bias = (nnx.Param(jnp.zeros((num_relative_positions(rel_pos_grid), num_heads)))
                         if rel_pos_grid else None)
    self.proj = linear(width, width, kernel_init=trunc_normal(out_init_std))

  def __call__(self, x, bias=None):
    batch, tokens, width = x.shape
    qkv = per_token(self._project_qkv, x).reshape(batch, tokens, 3, self.num_heads, -1)
    if self.rel_pos_bias is not None:
      own_bias = relative_position_bias(self.rel_pos_bias[...], self.rel_pos_grid)
      bias = own_bias if bias is None else bias + own_bias
    implementation = self.attention_impl or default_attention_impl(qkv.dtype)
    if implementation == "cpu" and use_cpu_attention_kernel(qkv.dtype, bias):
      shared_bias = (jnp.zeros((self.num_heads, tokens, tokens), jnp.float32) if bias is None
                     else bias.reshape(self.num_heads, tokens, tokens))
      out = kernels.attention(qkv, shared_bias)
    else:
      out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, implementation)
    return per_token(self.proj, out.reshape(batch, tokens, width))

  def _project_qkv(self, x):
    """[tokens, 3·width]; BEiT's q/v biases are added here, before the head split, so their gradient is a sum over
    one axis (see `per_token`)."""
    qkv = self.qkv(x)
    if self.q_bias is None:
      return qkv
    qkv_bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
    return qkv + qkv_bias.astype(qkv.dtype)


class Mlp(nnx.Module):

  def __init__(self, width, hidden, *, activation, out_init_std=0.02, dtype=jnp.float32, rngs):
    self.fc1 = nnx.Linear(width, hidden, kernel_init=trunc_normal(), dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, kernel_init=trunc_normal(out_init_std), dtype=dtype, rngs=rngs)
    self.activation = activation
    activation_fn(activation)  # Fail at construction, not at the first call.

  def __call__(self, x):
    return self.fc2(activation_fn(self.activation)(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LN transformer block: x + γ₁·drop(attn(ln(x))), then x + γ₂·drop(mlp(ln(x))).

  Layer scale γ exists only when `layer_scale_init` is set (non-zero). `out_init_std` sets the initial std (and ±1σ
  cut) of the two residual output projections. Drop path takes an explicit key, so the module holds nothing but
  parameters and the training step stays a pure function of the split state.
  """

  def __init__(self, width, num_heads, mlp_dim, *, qkv_bias, activation, layer_norm_eps, layer_scale_init=None,
               rel_pos_grid=None, out_init_std=0.02, drop_path_rate=0.0, dtype=jnp.float32, attention_impl=None,
               rngs):
    norm = functools.partial(layer_norm, width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid, out_init_std=out_init_std,
                          dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.norm2 = norm()
    self.mlp = Mlp(width, mlp_dim, activation=activation, out_init_std=out_init_std, dtype=dtype, rngs=rngs)
    if layer_scale_init:
      self.attn_layer_scale = nnx.Param(jnp.full((width,), layer_scale_init, jnp.float32))
      self.mlp_layer_scale = nnx.Param(jnp.full((width,), layer_scale_init, jnp.float32))
    else:
      self.attn_layer_scale = self.mlp_layer_scale = None
    self.drop_path_rate = float(drop_path_rate)

  def __call__(self, x, attn_bias=None, dropout_rng=None):
    """The float32 residual stream x [B, T, width] after this block (float32)."""
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    shape = x.shape
    x = x.reshape(-1, shape[-1]).astype(jnp.float32)  # Token-wise work on [B·T, width], as in `per_token`.
    branch = self.attn(self.norm1(x).reshape(shape), attn_bias).reshape(x.shape)
    x = x + self._drop_path(self._scale(branch, self.attn_layer_scale), shape, attn_rng)
    x = x + self._drop_path(self._scale(self.mlp(self.norm2(x)), self.mlp_layer_scale), shape, mlp_rng)
    return x.reshape(shape)

  def _drop_path(self, x, shape, rng):
    return drop_path(x.reshape(shape), self.drop_path_rate, rng).reshape(x.shape)

  @staticmethod
  def _scale(x, gamma):
    """γ·branch in float32: the branch leaves its last matmul in the compute dtype."""
    x = x.astype(jnp.float32)
    return x if gamma is None else x * gamma[...]
