// Decode attention over a KV cache: the interface between model/decode_attention.cpp (the
// torch op: shapes, threads, merging) and model/decode_attention_simd.cpp (the arithmetic,
// compiled once per ISA). Plain C++ on purpose: the SIMD file includes no torch or standard
// library templates, so nothing it compiles with AVX-512 can be shared with code that runs
// on an AVX2-only CPU.
#pragma once
#include <cstdint>

namespace gqalab {

// n consecutive cache slots of one sequence and KV head: row t of K is at k + t * k_stride
// (floats, or int32 words holding 4 int8 channels each: kv_cache.pack_int8's layout).
struct Segment {
  const void* k;
  const void* v;
  int64_t k_stride, v_stride;
  const float* k_scale;  // int8 keys: per channel and block of 32 slots, rows k_scale_stride
  int64_t k_scale_stride;  // apart; nullptr: float keys and values
  const float* v_scale;  // int8 values: one per slot
  int64_t n;
};

// One piece of softmax(q K^T) V for g query rows (g x hd floats, already scaled by
// 1/sqrt(hd)) over segments seg[0..n_seg): m[r] the rows' largest score, l[r] the sum of
// exp(score - m[r]) and acc (g x hd) the same weights times V. scores: g x (sum of n)
// floats of scratch. Pieces of one row are merged by the caller (flash decoding).
#define GQALAB_PARTIAL_ARGS                                                             \
  const Segment *seg, int n_seg, const float *q, int g, int hd, float *scores, float *acc, \
      float *m, float *l
namespace avx512 { void partial(GQALAB_PARTIAL_ARGS); }
namespace avx2 { void partial(GQALAB_PARTIAL_ARGS); }

}  // namespace gqalab
