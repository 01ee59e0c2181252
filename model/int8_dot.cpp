// Integer dot-product GEMM for decode on x86 CPUs: int4 or int8 weights times activations
// quantized to int8 per block of 32 inputs (llama.cpp's Q8 activations), multiplied as bytes
// (AVX-512 VNNI vpdpbusd; AVX2 maddubs). Built and loaded by model/int8_dot.py.
//
// Weights are packed in panels of 16 output rows so that one 512-bit register holds 4
// consecutive inputs of each of the 16 rows: a byte dot product over a broadcast group of 4
// activations then yields 16 outputs at once, with no horizontal sums.
//   int4: (N/16, K/8, 16, 4) uint8, byte i of row r = q[k+i] | q[k+4+i] << 4, q in 0..15;
//         per (panel, group of gs inputs): 16 fp16 scales then 16 fp16 minimums (int16 bits),
//         weight = q * scale + minimum.
//   int8: (N/16, K/4, 16, 4) int8 and one fp32 scale per row: weight = q * scale.
// Activations: x (M, K) fp32 -> per block of 32 inputs two int8 parts (quantize_rows), the
// block's float sum (for int4's minimums) and integer sum (for int8's offset weights).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPanel = 16;  // output rows per packed panel
constexpr int64_t kBlock = 32;  // activation inputs per int8 scale
constexpr int kRowTile = 4;     // activation rows multiplied per pass over a panel

// x / d = hi + lo / 254 with d = max|block| / 127: hi = round(x / d) and lo, the rounded
// remainder, both int8. Two byte dot products per weight (254 * dot(w, hi) + dot(w, lo),
// exact in int32) give the activations ~15 bits: one int8 alone cost SmolLM2-135M 0.8%
// perplexity at int4, and VNNI has the arithmetic to spare where decode waits on memory.
constexpr int32_t kLo = 254;

struct QuantizedRows {
  int64_t K;
  std::vector<int8_t> hi, lo;  // (M, K)
  std::vector<float> scale;    // (M, K/32): d / 254, the step of 254 * hi + lo
  std::vector<float> sum;      // (M, K/32) sums of x
  std::vector<int32_t> qsum;   // (M, K/32) sums of 254 * hi + lo
};

// AVX2 (which both bodies need): nearbyint inlines as one instruction, not a libm call
__attribute__((target("avx2,fma"))) QuantizedRows quantize_rows(const float* x, int64_t M,
                                                               int64_t K) {
  const int64_t blocks = K / kBlock;
  QuantizedRows r{K, std::vector<int8_t>(M * K), std::vector<int8_t>(M * K),
                  std::vector<float>(M * blocks), std::vector<float>(M * blocks),
                  std::vector<int32_t>(M * blocks)};
  at::parallel_for(0, M * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* v = x + i * kBlock;  // block i of row i / blocks: rows are contiguous
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < kBlock; ++j) {
        amax = std::max(amax, std::fabs(v[j]));
        sum += v[j];
      }
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int32_t qsum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const float t = v[j] * inv, hi = std::nearbyint(t);
        const float lo = std::nearbyint((t - hi) * static_cast<float>(kLo));
        r.hi[i * kBlock + j] = static_cast<int8_t>(hi);
        r.lo[i * kBlock + j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, lo)));
        qsum += kLo * r.hi[i * kBlock + j] + r.lo[i * kBlock + j];
      }
      r.scale[i] = d / static_cast<float>(kLo), r.sum[i] = sum, r.qsum[i] = qsum;
    }
  });
  return r;
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- AVX-512 VNNI

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

// 254 * hi + lo of one block, from its two int32 dot products.
AVX512 inline __m512i combine_avx512(__m512i hi, __m512i lo) {
  return _mm512_add_epi32(_mm512_mullo_epi32(hi, _mm512_set1_epi32(kLo)), lo);
}

// One panel (16 rows, all K) against rows m0..m0+MT of x; writes y[m][n0..n0+16].
template <int MT>
AVX512 void int4_panel_avx512(const uint8_t* w, const uint16_t* sm, const QuantizedRows& x,
                              int64_t m0, int64_t gs, float* y, int64_t ldy) {
  const int64_t K = x.K, blocks = K / kBlock, per_group = gs / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  int64_t next_group = 0;
  __m512 acc[MT], scale = _mm512_setzero_ps(), minimum = _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    if (b == next_group) {  // (a division per block cost more than the block's arithmetic)
      scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm)));
      minimum = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + kPanel)));
      sm += 2 * kPanel, next_group += per_group;
    }
    // two accumulators per part (inputs 0..3 and 4..7 of each chunk): at one row, one
    // chain of 8 dependent vpdpbusd per block waited on their latency
    __m512i hi[MT][2], lo[MT][2];
    for (int m = 0; m < MT; ++m) hi[m][0] = hi[m][1] = lo[m][0] = lo[m][1] = _mm512_setzero_si512();
    for (int c = 0; c < kBlock / 8; ++c) {  // 64 bytes: 8 inputs of 16 rows
      const __m512i v = _mm512_loadu_si512(w + (b * 4 + c) * 64);
      const __m512i first = _mm512_and_si512(v, nibble);  // inputs 0..3, then 4..7
      const __m512i second = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int m = 0; m < MT; ++m) {
        const int64_t at = (m0 + m) * K + b * kBlock + c * 8;
        const int8_t *xh = x.hi.data() + at, *xl = x.lo.data() + at;
        hi[m][0] = _mm512_dpbusd_epi32(hi[m][0], first, _mm512_set1_epi32(four_bytes(xh)));
        hi[m][1] = _mm512_dpbusd_epi32(hi[m][1], second, _mm512_set1_epi32(four_bytes(xh + 4)));
        lo[m][0] = _mm512_dpbusd_epi32(lo[m][0], first, _mm512_set1_epi32(four_bytes(xl)));
        lo[m][1] = _mm512_dpbusd_epi32(lo[m][1], second, _mm512_set1_epi32(four_bytes(xl + 4)));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      const __m512 dot = _mm512_cvtepi32_ps(combine_avx512(
          _mm512_add_epi32(hi[m][0], hi[m][1]), _mm512_add_epi32(lo[m][0], lo[m][1])));
      acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(x.scale[i])), acc[m]);
      acc[m] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(x.sum[i]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// vpdpbusd multiplies unsigned by signed bytes: the weights are flipped to q + 128 (xor
// 0x80) and 128 * qsum of each block taken off the integer dot.
template <int MT>
AVX512 void int8_panel_avx512(const int8_t* w, const float* row_scale, const QuantizedRows& x,
                              int64_t m0, float* y, int64_t ldy) {
  const int64_t K = x.K, blocks = K / kBlock;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i hi[MT][2], lo[MT][2];  // even and odd chunks: two chains each, as above
    for (int m = 0; m < MT; ++m) hi[m][0] = hi[m][1] = lo[m][0] = lo[m][1] = _mm512_setzero_si512();
    for (int c = 0; c < kBlock / 4; ++c) {  // 64 bytes: 4 inputs of 16 rows
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + (b * 8 + c) * 64), flip);
      for (int m = 0; m < MT; ++m) {
        const int64_t at = (m0 + m) * K + b * kBlock + c * 4;
        __m512i &h = hi[m][c & 1], &l = lo[m][c & 1];
        h = _mm512_dpbusd_epi32(h, v, _mm512_set1_epi32(four_bytes(x.hi.data() + at)));
        l = _mm512_dpbusd_epi32(l, v, _mm512_set1_epi32(four_bytes(x.lo.data() + at)));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      const __m512i exact = _mm512_sub_epi32(
          combine_avx512(_mm512_add_epi32(hi[m][0], hi[m][1]),
                         _mm512_add_epi32(lo[m][0], lo[m][1])),
          _mm512_set1_epi32(128 * x.qsum[i]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(x.scale[i]), acc[m]);
    }
  }
  const __m512 s = _mm512_loadu_ps(row_scale);
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(acc[m], s));
}

// ---------------------------------------------------------------- AVX2

#define AVX2 __attribute__((target("avx2,f16c,fma")))

// u8 x s8 -> 8 int32 sums of 4 products. maddubs sums pairs into int16 with saturation: the
// callers keep the unsigned side <= 127 (int8: |x|) or <= 15 (int4), so no pair saturates.
AVX2 inline __m256i dot4_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

AVX2 inline __m256i combine_avx2(__m256i hi, __m256i lo) {
  return _mm256_add_epi32(_mm256_mullo_epi32(hi, _mm256_set1_epi32(kLo)), lo);
}

// Rows 8h..8h+8 of a panel: AVX2's registers hold half of what AVX-512's do.
template <int MT>
AVX2 void int4_panel_avx2(const uint8_t* w, const uint16_t* sm, const QuantizedRows& x,
                          int64_t m0, int64_t gs, float* y, int64_t ldy) {
  const int64_t K = x.K, blocks = K / kBlock, per_group = gs / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT], scale = _mm256_setzero_ps(), minimum = _mm256_setzero_ps();
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    const uint16_t* g = sm + 8 * h;
    int64_t next_group = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (b == next_group) {
        scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
        minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + kPanel)));
        g += 2 * kPanel, next_group += per_group;
      }
      __m256i hi[MT], lo[MT];
      for (int m = 0; m < MT; ++m) hi[m] = lo[m] = _mm256_setzero_si256();
      for (int c = 0; c < kBlock / 8; ++c) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(w + (b * 4 + c) * 64 + 32 * h));
        const __m256i first = _mm256_and_si256(v, nibble);
        const __m256i second = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int m = 0; m < MT; ++m) {
          const int64_t at = (m0 + m) * K + b * kBlock + c * 8;
          const int8_t *xh = x.hi.data() + at, *xl = x.lo.data() + at;
          hi[m] = _mm256_add_epi32(hi[m], dot4_avx2(first, _mm256_set1_epi32(four_bytes(xh))));
          hi[m] = _mm256_add_epi32(hi[m], dot4_avx2(second, _mm256_set1_epi32(four_bytes(xh + 4))));
          lo[m] = _mm256_add_epi32(lo[m], dot4_avx2(first, _mm256_set1_epi32(four_bytes(xl))));
          lo[m] = _mm256_add_epi32(lo[m], dot4_avx2(second, _mm256_set1_epi32(four_bytes(xl + 4))));
        }
      }
      for (int m = 0; m < MT; ++m) {
        const int64_t i = (m0 + m) * blocks + b;
        const __m256 dot = _mm256_cvtepi32_ps(combine_avx2(hi[m], lo[m]));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(x.scale[i])), acc[m]);
        acc[m] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(x.sum[i]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(y + m * ldy + 8 * h, acc[m]);
  }
}

// maddubs has no room for an offset weight (255 * 127 * 2 passes int16): llama.cpp's
// sign trick instead, |x| (unsigned) times w with x's sign.
template <int MT>
AVX2 void int8_panel_avx2(const int8_t* w, const float* row_scale, const QuantizedRows& x,
                          int64_t m0, float* y, int64_t ldy) {
  const int64_t K = x.K, blocks = K / kBlock;
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i hi[MT], lo[MT];
      for (int m = 0; m < MT; ++m) hi[m] = lo[m] = _mm256_setzero_si256();
      for (int c = 0; c < kBlock / 4; ++c) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(w + (b * 8 + c) * 64 + 32 * h));
        for (int m = 0; m < MT; ++m) {
          const int64_t at = (m0 + m) * K + b * kBlock + c * 4;
          const __m256i xh = _mm256_set1_epi32(four_bytes(x.hi.data() + at));
          const __m256i xl = _mm256_set1_epi32(four_bytes(x.lo.data() + at));
          hi[m] = _mm256_add_epi32(hi[m], dot4_avx2(_mm256_abs_epi8(xh), _mm256_sign_epi8(v, xh)));
          lo[m] = _mm256_add_epi32(lo[m], dot4_avx2(_mm256_abs_epi8(xl), _mm256_sign_epi8(v, xl)));
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m256 d = _mm256_set1_ps(x.scale[(m0 + m) * blocks + b]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(combine_avx2(hi[m], lo[m])), d, acc[m]);
      }
    }
    const __m256 s = _mm256_loadu_ps(row_scale + 8 * h);
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(y + m * ldy + 8 * h, _mm256_mul_ps(acc[m], s));
  }
}

// ---------------------------------------------------------------- the ops

// Runs panel(p, m0, MT-dispatched) over every panel (in parallel) and row tile.
template <typename Panel>
void each_panel(int64_t panels, int64_t M, const Panel& panel) {
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile)
        panel(p, m0, std::min<int64_t>(kRowTile, M - m0));
  });
}

// Expands CALL(MT) with MT = rows (1..kRowTile) as a compile-time constant.
#define BY_ROWS(rows, CALL) \
  switch (rows) {           \
    case 1: CALL(1); break; \
    case 2: CALL(2); break; \
    case 3: CALL(3); break; \
    default: CALL(4);       \
  }

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int8_dot: x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(x.size(1) % kBlock == 0, "int8_dot: K must be a multiple of 32");
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales_mins,
                   int64_t group_size, bool avx512) {
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1), panels = w.size(0), N = panels * kPanel;
  TORCH_CHECK(w.dim() == 4 && w.size(1) == K / 8 && w.scalar_type() == at::kByte &&
                  w.is_contiguous(),
              "int8_dot: int4 weight must be (N/16, K/8, 16, 4) uint8");
  TORCH_CHECK(group_size % kBlock == 0 && K % group_size == 0, "int8_dot: bad group size");
  TORCH_CHECK(scales_mins.scalar_type() == at::kShort && scales_mins.is_contiguous() &&
                  scales_mins.numel() == panels * (K / group_size) * 2 * kPanel,
              "int8_dot: int4 scales and minimums must be (N/16, K/gs, 2, 16) fp16 as int16");
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows q = quantize_rows(x.data_ptr<float>(), M, K);
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales_mins.data_ptr<int16_t>());
  float* yp = y.data_ptr<float>();
  const int64_t panel_bytes = K / 2 * kPanel, panel_scales = K / group_size * 2 * kPanel;
  each_panel(panels, M, [&](int64_t p, int64_t m0, int64_t rows) {
    const uint8_t* pw = wp + p * panel_bytes;
    const uint16_t* ps = sp + p * panel_scales;
    float* py = yp + m0 * N + p * kPanel;
#define CALL(MT)                                                             \
  if (avx512) int4_panel_avx512<MT>(pw, ps, q, m0, group_size, py, N);      \
  else int4_panel_avx2<MT>(pw, ps, q, m0, group_size, py, N)
    BY_ROWS(rows, CALL)
#undef CALL
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   bool avx512) {
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1), panels = w.size(0), N = panels * kPanel;
  TORCH_CHECK(w.dim() == 4 && w.size(1) == K / 4 && w.scalar_type() == at::kChar &&
                  w.is_contiguous(),
              "int8_dot: int8 weight must be (N/16, K/4, 16, 4) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N &&
                  scales.is_contiguous(),
              "int8_dot: int8 scales must be (N,) float32");
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows q = quantize_rows(x.data_ptr<float>(), M, K);
  const auto* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  each_panel(panels, M, [&](int64_t p, int64_t m0, int64_t rows) {
    const int8_t* pw = wp + p * K * kPanel;
    float* py = yp + m0 * N + p * kPanel;
#define CALL(MT)                                                      \
  if (avx512) int8_panel_avx512<MT>(pw, sp + p * kPanel, q, m0, py, N); \
  else int8_panel_avx2<MT>(pw, sp + p * kPanel, q, m0, py, N)
    BY_ROWS(rows, CALL)
#undef CALL
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gqalab_int8_dot, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales_mins, int group_size, bool avx512) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales, bool avx512) -> Tensor");
}

TORCH_LIBRARY_IMPL(gqalab_int8_dot, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
}
