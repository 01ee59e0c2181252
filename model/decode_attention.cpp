// Decode attention over a KV cache as torch ops (gqalab_attention::attend, ::attend_int8),
// built and loaded by model/kernels.py; the arithmetic is model/decode_attention_simd.cpp.
//
// One new token per sequence: the g query heads of each KV head (GQA's group; MHA g = 1,
// MQA g = n_head) read that head's cache once, together, so a step reads the cache once
// whatever the layout: that is what lets a smaller cache decode faster. Work is split over
// (sequence, KV head, piece of the cache) so both cores stay busy at batch 1, and the
// pieces merge by their softmax maxima and sums (flash decoding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "decode_attention.h"

namespace {

using gqalab::Segment;

constexpr int64_t kMinPiece = 512;  // cache slots: a smaller piece is not worth a merge

int64_t visible_slots(const at::Tensor& input_pos) {
  TORCH_CHECK(input_pos.numel() >= 1 && input_pos.scalar_type() == at::kLong,
              "decode_attention: input_pos must be int64 positions");
  return input_pos.data_ptr<int64_t>()[input_pos.numel() - 1] + 1;
}

void check_query(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "decode_attention: q must be a contiguous (B, G, g, hd) float32 tensor");
  TORCH_CHECK(q.size(3) % 16 == 0 && q.size(3) <= 256,
              "decode_attention: head_dim must be a multiple of 16, at most 256");
}

// How many pieces each of `rows` (sequence, KV head) pairs' n slots are cut into: enough
// items for every thread, none under kMinPiece slots.
int64_t pieces(int64_t rows, int64_t n) {
  const int64_t want = (4 * at::get_num_threads() + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, n / kMinPiece));
}

// Runs the kernel on each (row = sequence * G + KV head, piece) with segments(row, piece,
// out) filling its segments, then merges each row's pieces into y (rows, g, hd).
template <typename Segments>
at::Tensor attend_pieces(const at::Tensor& q, int64_t n_pieces, bool avx512,
                         const Segments& segments) {
  const int64_t rows = q.size(0) * q.size(1), g = q.size(2), hd = q.size(3);
  const int64_t items = rows * n_pieces;
  std::vector<float> m(items * g), l(items * g), acc(items * g * hd);
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      Segment seg[2];
      const int n_seg = segments(i / n_pieces, i % n_pieces, seg);
      int64_t total = 0;
      for (int s = 0; s < n_seg; ++s) total += seg[s].n;
      if (total == 0) {  // an empty piece weighs nothing in the merge
        std::fill_n(m.begin() + i * g, g, -INFINITY);
        std::fill_n(l.begin() + i * g, g, 0.f);
        continue;
      }
      scores.resize(g * ((total + 15) / 16 * 16));
      auto partial = avx512 ? gqalab::avx512::partial : gqalab::avx2::partial;
      partial(seg, n_seg, qp + i / n_pieces * g * hd, g, hd, scores.data(),
              acc.data() + i * g * hd, m.data() + i * g, l.data() + i * g);
    }
  });
  at::Tensor y = at::empty(q.sizes(), q.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows * g, 16, [&](int64_t begin, int64_t end) {
    for (int64_t rr = begin; rr < end; ++rr) {  // one query row: rr = row * g + r
      const int64_t row = rr / g, r = rr % g;
      float top = -INFINITY, sum = 0.f;
      for (int64_t p = 0; p < n_pieces; ++p) top = std::max(top, m[(row * n_pieces + p) * g + r]);
      float* out = yp + rr * hd;
      std::fill_n(out, hd, 0.f);
      for (int64_t p = 0; p < n_pieces; ++p) {
        const int64_t at = (row * n_pieces + p) * g + r;
        if (l[at] == 0.f) continue;
        const float w = std::exp(m[at] - top);
        sum += w * l[at];
        for (int64_t c = 0; c < hd; ++c) out[c] += w * acc[at * hd + c];
      }
      for (int64_t c = 0; c < hd; ++c) out[c] /= sum;
    }
  });
  return y;
}

// q (B, G, g, hd) scaled by 1/sqrt(hd); k, v (B, G, S, hd) float32, rows contiguous;
// slots up to input_pos[-1] are read.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& input_pos, bool avx512) {
  check_query(q);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->stride(3) == 1 &&
                    t->size(0) == q.size(0) && t->size(1) == q.size(1) &&
                    t->size(3) == q.size(3),
                "decode_attention: k and v must be (B, G, S, hd) float32, rows contiguous");
  const int64_t n = std::min(visible_slots(input_pos), k.size(2)), G = q.size(1);
  const int64_t n_pieces = pieces(q.size(0) * G, n), piece = (n + n_pieces - 1) / n_pieces;
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  return attend_pieces(q, n_pieces, avx512, [&](int64_t row, int64_t p, Segment* seg) {
    const int64_t b = row / G, h = row % G, t0 = std::min(n, p * piece);
    seg[0] = Segment{kp + b * k.stride(0) + h * k.stride(1) + t0 * k.stride(2),
                     vp + b * v.stride(0) + h * v.stride(1) + t0 * v.stride(2),
                     k.stride(2), v.stride(2), nullptr, 0, nullptr,
                     std::min(n, t0 + piece) - t0};
    return 1;
  });
}

// The int8 cache (model/kv_cache.py QuantizedKVCache, window 32): complete blocks from the
// store, kq and vq (B, G, S, hd/4) int32 words, k_scale (B, G, S/32, hd), v_scale (B, G, S);
// the current block's slots up to input_pos[-1] from the float ring (B, G, 32, hd).
at::Tensor attend_int8(const at::Tensor& q, const at::Tensor& kq, const at::Tensor& vq,
                       const at::Tensor& k_scale, const at::Tensor& v_scale,
                       const at::Tensor& ring_k, const at::Tensor& ring_v,
                       const at::Tensor& input_pos, bool avx512) {
  check_query(q);
  const int64_t B = q.size(0), G = q.size(1), hd = q.size(3), window = ring_k.size(2);
  TORCH_CHECK(window == 32 && hd % (avx512 ? 64 : 32) == 0,
              "decode_attention: the int8 cache needs window 32 and head_dim a multiple of ",
              avx512 ? 64 : 32);
  for (const at::Tensor* t : {&kq, &vq})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->size(3) == hd / 4,
                "decode_attention: kq, vq must be contiguous (B, G, S, hd/4) int32");
  TORCH_CHECK(k_scale.is_contiguous() && v_scale.is_contiguous() && ring_k.is_contiguous() &&
                  ring_v.is_contiguous() && ring_k.scalar_type() == at::kFloat,
              "decode_attention: scales and the float32 ring must be contiguous");
  const int64_t pos = visible_slots(input_pos) - 1, stored = pos / window * window;
  TORCH_CHECK(stored <= kq.size(2), "decode_attention: position past the cache");
  const int64_t blocks = std::max<int64_t>(1, stored / window);
  const int64_t n_pieces = pieces(B * G, stored);
  const int64_t piece = (blocks + n_pieces - 1) / n_pieces * window;  // whole blocks
  return attend_pieces(q, n_pieces, avx512, [&](int64_t row, int64_t p, Segment* seg) {
    const int64_t t0 = std::min(stored, p * piece), t1 = std::min(stored, t0 + piece);
    seg[0] = Segment{kq.data_ptr<int32_t>() + (row * kq.size(2) + t0) * (hd / 4),
                     vq.data_ptr<int32_t>() + (row * vq.size(2) + t0) * (hd / 4), hd / 4,
                     hd / 4, k_scale.data_ptr<float>() + (row * k_scale.size(2) + t0 / window) * hd,
                     hd, v_scale.data_ptr<float>() + row * v_scale.size(2) + t0, t1 - t0};
    if (p < n_pieces - 1) return 1;
    seg[1] = Segment{ring_k.data_ptr<float>() + row * window * hd,
                     ring_v.data_ptr<float>() + row * window * hd, hd, hd, nullptr, 0, nullptr,
                     pos - stored + 1};
    return 2;
  });
}

}  // namespace

TORCH_LIBRARY(gqalab_attention, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor input_pos, bool avx512) -> Tensor");
  m.def("attend_int8(Tensor q, Tensor kq, Tensor vq, Tensor k_scale, Tensor v_scale, "
        "Tensor ring_k, Tensor ring_v, Tensor input_pos, bool avx512) -> Tensor");
}

TORCH_LIBRARY_IMPL(gqalab_attention, CPU, m) {
  m.impl("attend", &attend);
  m.impl("attend_int8", &attend_int8);
}
