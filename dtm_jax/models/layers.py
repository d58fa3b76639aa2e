"""Transformer pieces shared by the student ViT and the CLIP vision tower.

Both are pre-LN ViTs; they differ only in options (q/v vs full qkv bias, relative position bias, layer scale,
activation, LayerNorm epsilon), so one `Block` serves both and the converters map onto one parameter layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtm_jax import kernels

ATTENTION_IMPLS = (None, "xla", "cudnn")
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
    raise ValueError(f"attention_impl={name!r} is not one of {ATTENTION_IMPLS} (None lets JAX choose).")


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
  """Additive attention bias [1, heads, 1+N, 1+N] looked up from a table [rows, heads]."""
  index = relative_position_index(grid_size)
  bias = jnp.take(table, index.reshape(-1), axis=0).reshape(*index.shape, table.shape[-1])
  return jnp.transpose(bias, (2, 0, 1))[None]


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


def attention(q, k, v, bias=None, implementation=None):
  """softmax(q·kᵀ/√d + bias)·v for q, k, v [B, T, heads, d] and bias broadcastable to [B, heads, T, T].

  `jax.nn.dot_product_attention` with the implementation asked for (cuDNN's fused kernels on GPUs when None). On
  CPUs, where XLA's batched matmuls over the [B, T, heads, d] layout run at half speed, the default is
  `_head_major_attention`: the same computation with the heads moved ahead of the tokens first.
  """
  if implementation is not None or jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T, d]
  return jnp.swapaxes(_head_major_attention(q, k, v, bias), 1, 2)


def use_cpu_attention_kernel(dtype, bias):
  """Whether `Attention` runs the native CPU kernel (dtm_jax.kernels.attention, ~2× faster than XLA:CPU forward and
  backward): float32 on a single CPU device, with a bias shared by the batch (or none). With several devices the
  SPMD partitioner would gather the batch onto every device for a custom call, so XLA's version runs there.
  """
  return (jax.default_backend() == "cpu" and jax.device_count() == 1 and dtype == jnp.float32 and
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
  """Multi-head self-attention through `jax.nn.dot_product_attention`, so GPUs can use fused kernels (on one CPU
  device, in float32, through dtm_jax.kernels.attention: see `use_cpu_attention_kernel`).

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
    if self.attention_impl is None and use_cpu_attention_kernel(qkv.dtype, bias):
      shared_bias = (jnp.zeros((self.num_heads, tokens, tokens), jnp.float32) if bias is None
                     else bias.reshape(self.num_heads, tokens, tokens))
      out = kernels.attention(qkv, shared_bias)
    else:
      out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, self.attention_impl)
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
    norm = functools.partial(nnx.LayerNorm, width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
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
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # Token-wise work on [B·T, width], as in `per_token`.
    branch = self.attn(self.norm1(x).reshape(shape), attn_bias).reshape(x.shape)
    x = x + self._drop_path(self._scale(branch, self.attn_layer_scale), shape, attn_rng)
    x = x + self._drop_path(self._scale(self.mlp(self.norm2(x)), self.mlp_layer_scale), shape, mlp_rng)
    return x.reshape(shape)

  def _drop_path(self, x, shape, rng):
    return drop_path(x.reshape(shape), self.drop_path_rate, rng).reshape(x.shape)

  @staticmethod
  def _scale(x, gamma):
    return x if gamma is None else x * gamma[...].astype(x.dtype)
