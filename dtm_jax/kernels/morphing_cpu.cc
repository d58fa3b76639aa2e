// Dynamic token morphing on the CPU, as XLA FFI custom calls: the rounds of dtm_jax.morphing (dtm_morph_gram) and
// the group sums of the DTM loss (dtm_group_sums).
//
// XLA:CPU runs the rounds' many small gathers and scatters one after the other at tens of microseconds each (a merge
// touches a strided column of every image's Gram matrix), so on CPUs the rounds cost more than the Gram matmul. Here
// each image is morphed by one thread in a private copy of its Gram matrix (154 KB at N = 196, resident in L2),
// image-schedules spread over XLA's intra-op thread pool.
//
// The algorithm and the float32 arithmetic are those of dtm_jax.morphing (pairwise Gram updates): same similarities
// (sums divided by sizes, times inverse norms), same tie-breaking (first maximum; stable descending rank), same
// order of additions when merging, so the two agree bit for bit on the partitions they produce.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using dtm_jax::ParallelFor;

namespace {

constexpr float kMinSquaredNorm = 1e-24f;  // as dtm_jax.morphing._MIN_SQUARED_NORM

// Tokens merged away per round (dtm_jax.morphing.merges_per_round).
int32_t MergesPerRound(int32_t num_merge, int32_t num_iters, int32_t num_tokens) {
  num_iters = std::max(num_iters, 1);
  const int32_t ceil = num_merge <= 0 ? 0 : (num_merge + num_iters - 1) / num_iters;
  return static_cast<int64_t>(ceil) * num_iters > num_tokens ? num_merge / num_iters : ceil;
}

// The best B partner of one A slot: (highest cosine, first B position holding it). Cosines of slot means come from
// slot-sum inner products as dot / (n_a·n_b) · (1/|a|) · (1/|b|), the float32 operations of dtm_jax.morphing in
// its order. Written as flat loops (gather + arithmetic, then a maximum over 8 independent lanes) so that they
// vectorise; x86-64 builds also get an AVX2 clone, picked when the library loads. NaN cosines never win; a row
// without a finite cosine gets -inf and partner 0.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
std::pair<float, int> BestPartner(const float* __restrict__ row, const int32_t* __restrict__ b_ids,
                                  const float* __restrict__ b_sizes, const float* __restrict__ b_inverse_norms,
                                  int num_b, float a_size, float a_inverse_norm, float* __restrict__ similarity) {
  for (int b = 0; b < num_b; ++b) {
    similarity[b] = row[b_ids[b]] / (a_size * b_sizes[b]) * a_inverse_norm * b_inverse_norms[b];
  }
  constexpr int kLanes = 8;
  float lanes[kLanes];
  for (float& lane : lanes) lane = -std::numeric_limits<float>::infinity();
  const int full = num_b - num_b % kLanes;
  for (int b = 0; b < full; b += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] = similarity[b + k] > lanes[k] ? similarity[b + k] : lanes[k];
  }
  float best = -std::numeric_limits<float>::infinity();
  for (float lane : lanes) best = lane > best ? lane : best;
  for (int b = full; b < num_b; ++b) best = similarity[b] > best ? similarity[b] : best;
  for (int b = 0; b < num_b; ++b) {
    if (similarity[b] == best) return {best, b};
  }
  return {best, 0};
}

// Per-thread working memory, reused across the images a thread morphs.
struct Scratch {
  explicit Scratch(int n)
      : gram(static_cast<size_t>(n) * n), sizes(n), inverse_norm(n), best(n), similarity(n), b_sizes(n),
        b_inverse_norms(n), order(n), next_order(n), b_ids(n), parent(n), partner(n), ranked(n), is_source(n), position(n) {}
  std::vector<float> gram, sizes, inverse_norm, best, similarity, b_sizes, b_inverse_norms;
  std::vector<int32_t> order, next_order, b_ids, parent, partner, ranked, is_source, position;
};

// Morphs one image: gram_in f32 [n, n] → group ids int32 [n] (the final slot position of each token's group).
void MorphImage(const float* gram_in, int n, int32_t num_merge, int32_t num_iters, int32_t protect, int64_t max_iters,
                Scratch& s, int32_t* groups) {
  float* g = s.gram.data();
  std::copy(gram_in, gram_in + static_cast<size_t>(n) * n, g);
  for (int i = 0; i < n; ++i) {
    s.sizes[i] = 1.0f;
    s.order[i] = i;
    s.parent[i] = i;
  }
  const int32_t per_round = MergesPerRound(num_merge, num_iters, n);
  int count = n;
  for (int64_t round = 0; round < num_iters && round < max_iters; ++round) {
    const int merges = std::min(per_round, (count - protect) / 2);
    if (merges <= 0) break;
    const int num_a = (count + 1) / 2, num_b = count / 2;
    for (int position = 0; position < count; ++position) {
      const int id = s.order[position];
      const float squared_norm = g[static_cast<size_t>(id) * n + id] / (s.sizes[id] * s.sizes[id]);
      s.inverse_norm[id] = 1.0f / std::sqrt(std::max(squared_norm, kMinSquaredNorm));
    }
    // Steps 2–4: the best B partner (first maximum) of every A slot, by cosine similarity of the slot means.
    for (int b = 0; b < num_b; ++b) {
      const int b_id = s.b_ids[b] = s.order[2 * b + 1];
      s.b_sizes[b] = s.sizes[b_id];
      s.b_inverse_norms[b] = s.inverse_norm[b_id];
    }
    for (int a = protect; a < num_a; ++a) {
      const int a_id = s.order[2 * a];
      std::tie(s.best[a], s.partner[a]) =
          BestPartner(g + static_cast<size_t>(a_id) * n, s.b_ids.data(), s.b_sizes.data(), s.b_inverse_norms.data(),
                      num_b, s.sizes[a_id], s.inverse_norm[a_id], s.similarity.data());
    }
    // Step 5: rank the mergeable A slots by descending best score, earlier position first among equals (a stable
    // descending sort). Only the `merges` sources need ranking when the unmerged A slots keep their positions.
    const int num_ranked = num_a - protect;
    int32_t* ranked = s.ranked.data();
    for (int i = 0; i < num_ranked; ++i) ranked[i] = protect + i;
    const auto higher = [&](int32_t x, int32_t y) { return s.best[x] > s.best[y] || (s.best[x] == s.best[y] && x < y); };
    if (protect) {
      std::partial_sort(ranked, ranked + merges, ranked + num_ranked, higher);
    } else {
      std::sort(ranked, ranked + num_ranked, higher);
    }
    std::fill(s.is_source.begin(), s.is_source.begin() + num_a, 0);
    for (int j = 0; j < merges; ++j) s.is_source[ranked[j]] = 1;

    // Step 7: new order [unmerged A, B]: A in positional order when the first slot is protected, else by rank.
    int next = 0;
    if (protect) {
      for (int a = 0; a < num_a; ++a)
        if (!s.is_source[a]) s.next_order[next++] = s.order[2 * a];
    } else {
      for (int j = merges; j < num_ranked; ++j) s.next_order[next++] = s.order[2 * ranked[j]];
    }
    for (int b = 0; b < num_b; ++b) s.next_order[next++] = s.order[2 * b + 1];

    // Step 6: merge the sources into their partners in rank order: row, then column, as the pairwise JAX update.
    for (int j = 0; j < merges; ++j) {
      const int source = s.order[2 * ranked[j]], partner = s.order[2 * s.partner[ranked[j]] + 1];
      float* partner_row = g + static_cast<size_t>(partner) * n;
      const float* source_row = g + static_cast<size_t>(source) * n;
      for (int i = 0; i < n; ++i) partner_row[i] += source_row[i];
      for (int position = 0; position < count; ++position) {  // the rows of dead slots are never read again
        float* row = g + static_cast<size_t>(s.order[position]) * n;
        row[partner] += row[source];
      }
      s.parent[source] = partner;
      s.sizes[partner] += s.sizes[source];  // sources are A slots, never partners: their sizes stay put this round
    }
    count -= merges;
    std::swap(s.order, s.next_order);
  }
  // Group id: the final position of the live slot each token's slot was (transitively) merged into.
  for (int position = 0; position < count; ++position) s.position[s.order[position]] = position;
  for (int token = 0; token < n; ++token) {
    int root = token;
    while (s.parent[root] != root) root = s.parent[root];
    groups[token] = s.position[root];
  }
}

// gram f32 [B, N, N], num_merge and num_iters int32 [L, B] (L schedules), protect int32 [] → groups int32 [L, B, N].
ffi::Error MorphGramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gram, ffi::Buffer<ffi::S32> num_merge,
                         ffi::Buffer<ffi::S32> num_iters, ffi::Buffer<ffi::S32> protect,
                         ffi::ResultBuffer<ffi::S32> groups, int64_t max_iters) {
  const auto dims = gram.dimensions();
  if (dims.size() != 3 || dims[1] != dims[2]) {
    return ffi::Error::InvalidArgument("dtm_morph_gram expects a Gram matrix of shape [batch, tokens, tokens].");
  }
  const int64_t batch = dims[0];
  const int n = static_cast<int>(dims[1]);
  const int64_t items = num_merge.element_count();  // schedules × batch
  if (batch == 0 || n == 0) return ffi::Error::Success();
  if (items % batch != 0 || num_iters.element_count() != items || protect.element_count() != 1 ||
      groups->element_count() != items * n) {
    return ffi::Error::InvalidArgument(
        "dtm_morph_gram expects num_merge, num_iters [schedules, batch], a scalar protect and groups "
        "[schedules, batch, tokens].");
  }
  const float* gram_data = gram.typed_data();
  const int32_t* merge_data = num_merge.typed_data();
  const int32_t* iters_data = num_iters.typed_data();
  const int32_t protect_first = protect.typed_data()[0] > 0 ? 1 : 0;
  int32_t* out = groups->typed_data();
  ParallelFor(pool, items, [n] { return Scratch(n); }, [&](int64_t item, Scratch& scratch) {
    MorphImage(gram_data + item % batch * n * n, n, merge_data[item], iters_data[item], protect_first, max_iters,
               scratch, out + item * n);
  });
  return ffi::Error::Success();
}

// values f32 [B, N, C], groups int32 [L, B, N] → sums f32 [L, B, N, C]: row g of (l, b) sums the rows of values[b]
// whose group id in schedule l is g, in token order (zeros where no token has id g). Ids are clipped to [0, N).
// XLA:CPU's scatter-add does the same at about a nanosecond per element.
ffi::Error GroupSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> groups,
                         ffi::ResultBuffer<ffi::F32> sums) {
  const auto dims = values.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("dtm_group_sums expects values [batch, tokens, channels].");
  const int64_t batch = dims[0], n = dims[1], channels = dims[2];
  if (batch == 0 || n == 0) return ffi::Error::Success();
  const int64_t items = groups.element_count() / n;  // schedules × batch
  if (groups.element_count() != items * n || items % batch != 0 || sums->element_count() != items * n * channels) {
    return ffi::Error::InvalidArgument("dtm_group_sums expects groups [schedules, batch, tokens] and sums "
                                       "[schedules, batch, tokens, channels].");
  }
  const float* value_data = values.typed_data();
  const int32_t* group_data = groups.typed_data();
  float* out = sums->typed_data();
  ParallelFor(pool, items, [] { return 0; }, [&](int64_t item, int) {
    float* item_sums = out + item * n * channels;
    const float* item_values = value_data + item % batch * n * channels;
    std::fill(item_sums, item_sums + n * channels, 0.0f);
    for (int64_t token = 0; token < n; ++token) {
      const int64_t group = std::clamp<int64_t>(group_data[item * n + token], 0, n - 1);
      float* __restrict__ sum = item_sums + group * channels;
      const float* __restrict__ value = item_values + token * channels;
      for (int64_t c = 0; c < channels; ++c) sum[c] += value[c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DtmMorphGram, MorphGramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("max_iters"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DtmGroupSums, GroupSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
