// Multi-head softmax attention on the CPU, as XLA FFI custom calls: dtm_attention_fwd and dtm_attention_bwd.
//
// XLA:CPU runs attention as batched matmuls of one (image, head) at a time, each split over the intra-op threads
// (~50–120 GFLOP/s on 2 cores for ViT's 197×64 heads), with the softmax and the head split/merge as separate passes
// over memory. Here one thread does a whole (image, head) problem: its scores (155 KB at 197 tokens) stay in L2
// between the matmuls and the softmax, heads are read from and written to the token-major [B, T, 3, H, d] layout
// directly (no transposes), and the problems are spread over XLA's intra-op thread pool.
//
// Arithmetic: float32 throughout; scores = scale·q·kᵀ + bias, probabilities = exp(s − rowmax)/rowsum, the gradient
// dS = P∘(dP − rowsum(dO∘O)) (the FlashAttention identity). Sums run in a different order than XLA's, so results
// agree with jax.nn.dot_product_attention to float32 rounding, not bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using dtm_jax::ParallelFor;

namespace {

constexpr int kPanel = 16;  // columns of a packed B panel: two 8-float vectors
constexpr int kTileRows = 6;  // rows of a micro-tile: 12 accumulators + 2 B vectors + 1 broadcast ≤ 16 registers

typedef float Vec8 __attribute__((vector_size(32)));

// A matrix read through strides: element (i, k) is data[i·row_stride + k·col_stride].
struct Strided {
  const float* data;
  int64_t row_stride, col_stride;
};

// Copies B (depth × cols, strided) into panels of kPanel columns, panel p at packed + p·depth·kPanel, row k of a
// panel contiguous, zeros past the last column: the micro-kernel then reads B with two unaligned vector loads.
void PackB(Strided b, int depth, int cols, float* packed) {
  for (int p = 0; p * kPanel < cols; ++p) {
    for (int k = 0; k < depth; ++k) {
      float* dst = packed + (static_cast<int64_t>(p) * depth + k) * kPanel;
      for (int c = 0; c < kPanel; ++c) {
        const int n = p * kPanel + c;
        dst[c] = n < cols ? b.data[k * b.row_stride + n * b.col_stride] : 0.0f;
      }
    }
  }
}

// C[rows × cols] (rows ≤ R, cols ≤ kPanel, leading dimension ldc) = scale · A[rows × depth] · panel.
template <int R>
__attribute__((always_inline)) inline void MicroTile(Strided a, const float* panel, int depth, float scale,
                                                      float* c, int64_t ldc, int cols) {
  Vec8 low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = Vec8{};
  for (int k = 0; k < depth; ++k) {
    Vec8 b0, b1;
    std::memcpy(&b0, panel + k * kPanel, sizeof(Vec8));
    std::memcpy(&b1, panel + k * kPanel + 8, sizeof(Vec8));
    for (int r = 0; r < R; ++r) {
      const float x = a.data[r * a.row_stride + k * a.col_stride];
      low[r] += x * b0;
      high[r] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float row[kPanel];
    const Vec8 l = low[r] * scale, h = high[r] * scale;
    std::memcpy(row, &l, sizeof(Vec8));
    std::memcpy(row + 8, &h, sizeof(Vec8));
    std::memcpy(c + r * ldc, row, sizeof(float) * cols);
  }
}

// C = scale · A · B for A [rows × depth] (strided), B packed by PackB [depth × cols], C row-major (ldc).
// x86-64 builds also get an x86-64-v3 (AVX2 + FMA) clone, picked when the library loads.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void Gemm(Strided a, const float* packed, int rows, int cols, int depth, float scale, float* c, int64_t ldc) {
  for (int p = 0; p * kPanel < cols; ++p) {
    const float* panel = packed + static_cast<int64_t>(p) * depth * kPanel;
    const int panel_cols = std::min(kPanel, cols - p * kPanel);
    float* c_panel = c + p * kPanel;
    int i = 0;
    for (; i + kTileRows <= rows; i += kTileRows) {
      MicroTile<kTileRows>({a.data + i * a.row_stride, a.row_stride, a.col_stride}, panel, depth, scale,
                           c_panel + i * ldc, ldc, panel_cols);
    }
    const Strided rest{a.data + i * a.row_stride, a.row_stride, a.col_stride};
    float* c_rest = c_panel + i * ldc;
    switch (rows - i) {
      case 5: MicroTile<5>(rest, panel, depth, scale, c_rest, ldc, panel_cols); break;
      case 4: MicroTile<4>(rest, panel, depth, scale, c_rest, ldc, panel_cols); break;
      case 3: MicroTile<3>(rest, panel, depth, scale, c_rest, ldc, panel_cols); break;
      case 2: MicroTile<2>(rest, panel, depth, scale, c_rest, ldc, panel_cols); break;
      case 1: MicroTile<1>(rest, panel, depth, scale, c_rest, ldc, panel_cols); break;
      default: break;
    }
  }
}

// C = scale · A · B with B packed into the scratch first.
void PackAndGemm(Strided a, Strided b, int rows, int cols, int depth, float scale, float* c, int64_t ldc,
                 std::vector<float>& packed) {
  PackB(b, depth, cols, packed.data());
  Gemm(a, packed.data(), rows, cols, depth, scale, c, ldc);
}

typedef int32_t Vec8i __attribute__((vector_size(32)));

inline Vec8 Load(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(Vec8));
  return v;
}
inline void Store(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(Vec8)); }
inline Vec8 Splat(float x) { return Vec8{} + x; }
inline float Bits(int32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof(float));
  return f;
}
inline Vec8 Bits(Vec8i x) { return reinterpret_cast<Vec8&>(x); }
inline float Max(float a, float b) { return a > b ? a : b; }
inline Vec8 Max(Vec8 a, Vec8 b) { return a > b ? a : b; }

// exp(x) for x ≤ 0 (as in a softmax after subtracting the row maximum), to ~2 float32 ulps: Cephes' expf
// polynomial after range reduction, branch-free, for a float or 8 at once. Below −87 it returns
// exp(−87) ≈ 1.6e-38, i.e. a probability of 0 in float32 after normalising; NaN stays NaN.
template <typename T, typename I>
inline T ExpNonPositive(T x) {
  x = x < -87.0f ? T{} - 87.0f : x;
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const T r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x − n·ln 2 in two parts
  T y = T{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  I exponent;
  if constexpr (std::is_same_v<T, float>) {
    exponent = static_cast<I>(n);
  } else {
    exponent = __builtin_convertvector(n, I);
  }
  return y * Bits((exponent + 127) << 23);  // y·2^n
}

inline float HorizontalSum(Vec8 v) {
  float lanes[8];
  Store(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Row i of the scores ← softmax(row + bias row), in place; 8 columns at a time, then the rest one by one.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void SoftmaxRows(float* scores, const float* bias, int t) {
  const int vector_end = t - t % 8;
  for (int i = 0; i < t; ++i) {
    float* row = scores + static_cast<int64_t>(i) * t;
    const float* bias_row = bias + static_cast<int64_t>(i) * t;
    Vec8 top8 = Splat(-std::numeric_limits<float>::infinity());
    for (int j = 0; j < vector_end; j += 8) {
      const Vec8 x = Load(row + j) + Load(bias_row + j);
      Store(row + j, x);
      top8 = Max(top8, x);
    }
    float top = -std::numeric_limits<float>::infinity();
    for (int j = vector_end; j < t; ++j) top = Max(top, row[j] += bias_row[j]);
    float lanes[8];
    Store(lanes, top8);
    for (float lane : lanes) top = Max(top, lane);
    Vec8 sum8{};
    for (int j = 0; j < vector_end; j += 8) {
      const Vec8 e = ExpNonPositive<Vec8, Vec8i>(Load(row + j) - top);
      Store(row + j, e);
      sum8 += e;
    }
    float sum = HorizontalSum(sum8);
    for (int j = vector_end; j < t; ++j) sum += row[j] = ExpNonPositive<float, int32_t>(row[j] - top);
    const float inverse = 1.0f / sum;
    for (int j = 0; j < vector_end; j += 8) Store(row + j, Load(row + j) * inverse);
    for (int j = vector_end; j < t; ++j) row[j] *= inverse;
  }
}

// dS = P∘(dP − rowsum(dO∘O)) in place of dP; rowsum(dO∘O) from dO, O [t × d] (row stride `stride`).
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void SoftmaxGradientRows(const float* p, const float* d_o, const float* o, int64_t stride, int t, int d, float* ds) {
  const int t_end = t - t % 8, d_end = d - d % 8;
  for (int64_t i = 0; i < t; ++i) {
    Vec8 dot8{};
    for (int k = 0; k < d_end; k += 8) dot8 += Load(d_o + i * stride + k) * Load(o + i * stride + k);
    float row_dot = HorizontalSum(dot8);
    for (int k = d_end; k < d; ++k) row_dot += d_o[i * stride + k] * o[i * stride + k];
    float* ds_row = ds + i * t;
    const float* p_row = p + i * t;
    for (int j = 0; j < t_end; j += 8) Store(ds_row + j, Load(p_row + j) * (Load(ds_row + j) - row_dot));
    for (int j = t_end; j < t; ++j) ds_row[j] = p_row[j] * (ds_row[j] - row_dot);
  }
}

// The shapes of one call: qkv [B, T, 3, H, d] → problems (b, h).
struct Geometry {
  int64_t batch, tokens, heads, head_dim;
  int64_t token_stride() const { return 3 * heads * head_dim; }  // between tokens of one q, k or v head
  int64_t scores() const { return tokens * tokens; }
  // Offset of head h of part (0 = q, 1 = k, 2 = v) of image b, token 0, in qkv.
  int64_t part(int64_t b, int part, int64_t h) const {
    return (b * tokens * 3 + part) * heads * head_dim + h * head_dim;
  }
  // Offset of head h of image b, token 0, in an output [B, T, H, d].
  int64_t merged(int64_t b, int64_t h) const { return b * tokens * heads * head_dim + h * head_dim; }
  int64_t heads_total() const { return batch * heads; }  // (image, head) problems
  std::vector<float> packing_scratch() const {  // room for any B operand here: depth and columns ≤ max(T, d)
    const int64_t largest = std::max(tokens, head_dim);
    return std::vector<float>(((largest + kPanel - 1) / kPanel) * kPanel * largest);
  }
};

Geometry GeometryOf(ffi::Span<const int64_t> qkv_dims) {
  return {qkv_dims[0], qkv_dims[1], qkv_dims[3], qkv_dims[4]};
}

// qkv f32 [B, T, 3, H, d], bias f32 [H, T, T] → out f32 [B, T, H, d], probabilities f32 [B, H, T, T].
ffi::Error AttentionForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probabilities) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3) {
    return ffi::Error::InvalidArgument("dtm_attention_fwd expects qkv [batch, tokens, 3, heads, head_dim].");
  }
  const Geometry g = GeometryOf(dims);
  const auto bias_dims = bias.dimensions();
  if (bias_dims.size() != 3 || bias_dims[0] != g.heads || bias_dims[1] != g.tokens || bias_dims[2] != g.tokens) {
    return ffi::Error::InvalidArgument("dtm_attention_fwd expects a bias [heads, tokens, tokens].");
  }
  if (g.heads_total() * g.tokens == 0) return ffi::Error::Success();
  const float* x = qkv.typed_data();
  const float* bias_data = bias.typed_data();
  float* out_data = out->typed_data();
  float* prob_data = probabilities->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  const int t = static_cast<int>(g.tokens), d = static_cast<int>(g.head_dim);
  auto make_scratch = [&g] { return g.packing_scratch(); };
  ParallelFor(pool, g.heads_total(), make_scratch, [&](int64_t item, std::vector<float>& packed) {
    const int64_t b = item / g.heads, h = item % g.heads;
    float* p = prob_data + item * g.scores();
    // Scores scale·q·kᵀ (B operand kᵀ: depth = head dim, columns = tokens).
    PackAndGemm({x + g.part(b, 0, h), g.token_stride(), 1}, {x + g.part(b, 1, h), 1, g.token_stride()}, t, t, d,
                scale, p, t, packed);
    SoftmaxRows(p, bias_data + h * g.scores(), t);
    // out = P·v, written into the token-major output.
    PackAndGemm({p, t, 1}, {x + g.part(b, 2, h), g.token_stride(), 1}, t, d, t, 1.0f,
                out_data + g.merged(b, h), g.heads * g.head_dim, packed);
  });
  return ffi::Error::Success();
}

// qkv f32 [B, T, 3, H, d], probabilities f32 [B, H, T, T], out and d_out f32 [B, T, H, d]
// → d_qkv f32 [B, T, 3, H, d], d_scores f32 [B, H, T, T] (the gradient of the scores, hence of a bias, per image:
// the caller sums it over the batch, in a fixed order, so that training stays bitwise reproducible).
ffi::Error AttentionBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                 ffi::Buffer<ffi::F32> probabilities, ffi::Buffer<ffi::F32> out,
                                 ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_qkv,
                                 ffi::ResultBuffer<ffi::F32> d_scores) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3) {
    return ffi::Error::InvalidArgument("dtm_attention_bwd expects qkv [batch, tokens, 3, heads, head_dim].");
  }
  const Geometry g = GeometryOf(dims);
  const int64_t merged_size = g.heads_total() * g.tokens * g.head_dim;
  if (probabilities.element_count() != g.heads_total() * g.scores() || out.element_count() != merged_size ||
      d_out.element_count() != merged_size || d_scores->element_count() != probabilities.element_count()) {
    return ffi::Error::InvalidArgument("dtm_attention_bwd expects probabilities and d_scores [batch, heads, tokens, "
                                       "tokens], out and d_out [batch, tokens, heads, head_dim].");
  }
  if (g.heads_total() * g.tokens == 0) return ffi::Error::Success();
  const float* x = qkv.typed_data();
  const float* prob_data = probabilities.typed_data();
  const float* out_data = out.typed_data();
  const float* d_out_data = d_out.typed_data();
  float* dx = d_qkv->typed_data();
  float* d_score_data = d_scores->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  const int t = static_cast<int>(g.tokens), d = static_cast<int>(g.head_dim);
  const int64_t merged_stride = g.heads * g.head_dim;
  auto make_scratch = [&g] { return g.packing_scratch(); };
  ParallelFor(pool, g.heads_total(), make_scratch, [&](int64_t item, std::vector<float>& packed) {
    const int64_t b = item / g.heads, h = item % g.heads;
    const float* p = prob_data + item * g.scores();
    const float* o = out_data + g.merged(b, h);
    const float* d_o = d_out_data + g.merged(b, h);
    // dP = dO·vᵀ, then dS = P∘(dP − rowsum(dO∘O)) in place.
    float* ds = d_score_data + item * g.scores();
    PackAndGemm({d_o, merged_stride, 1}, {x + g.part(b, 2, h), 1, g.token_stride()}, t, t, d, 1.0f, ds, t, packed);
    SoftmaxGradientRows(p, d_o, o, merged_stride, t, d, ds);
    // dv = Pᵀ·dO, dq = scale·dS·k, dk = scale·dSᵀ·q, written into the token-major d_qkv.
    PackAndGemm({p, 1, t}, {d_o, merged_stride, 1}, t, d, t, 1.0f, dx + g.part(b, 2, h), g.token_stride(), packed);
    PackAndGemm({ds, t, 1}, {x + g.part(b, 1, h), g.token_stride(), 1}, t, d, t, scale, dx + g.part(b, 0, h),
                g.token_stride(), packed);
    PackAndGemm({ds, 1, t}, {x + g.part(b, 0, h), g.token_stride(), 1}, t, d, t, scale, dx + g.part(b, 1, h),
                g.token_stride(), packed);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DtmAttentionForward, AttentionForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DtmAttentionBackward, AttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
