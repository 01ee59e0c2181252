// The arithmetic of decode attention (model/decode_attention.h), compiled once per ISA by
// model/kernels.py: -DGQALAB_ISA=avx512 with -mavx512f..., and -DGQALAB_ISA=avx2 with -mavx2
// -mfma. Everything here has internal linkage but the one entry point, and nothing comes
// from a header but intrinsics: a template instantiated here with AVX-512 could otherwise
// be picked by the linker for code that runs on an AVX2-only CPU.
//
// One pass over K writes the g rows' scores, one pass over V accumulates; both walk the
// cache in tiles of kTile slots so that the g rows of a group (GQA) reuse each tile from
// L2 rather than reading the cache from memory g times. int8 rows (kv_cache.pack_int8) are
// widened in registers: byte b of each word is channel b * words + j, so a shift pair turns
// a vector of words into a vector of consecutive channels, and the scales fold into q (keys,
// per 32-slot block) and into the probabilities (values, per slot).
#include <immintrin.h>

#include <cstdint>

#include "decode_attention.h"

namespace {

constexpr int64_t kTile = 256;  // cache slots per tile: K and V tiles of 64 KiB at hd 64

#ifdef __AVX512F__
using vf = __m512;
using vi = __m512i;
constexpr int kLanes = 16;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf madd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float hsum(vf x) { return _mm512_reduce_add_ps(x); }
inline float hmax(vf x) { return _mm512_reduce_max_ps(x); }
// the sums of a, b, c, d, in that order
inline __m128 hsum4(vf a, vf b, vf c, vf d) {
  const vf ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const vf cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const vf x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  vf y = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));  // 128-bit blocks: a, b, c, d
  y = _mm512_add_ps(y, _mm512_permute_ps(y, 0x4E));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), y));
}
inline vf round_even(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline vf times_pow2(vf x, vf n) { return _mm512_scalef_ps(x, n); }
inline vi load_words(const int32_t* p) { return _mm512_loadu_si512(p); }
template <int B>
inline vf byte_plane(vi w) {  // signed byte B of each word, as floats
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24 - 8 * B), 24));
}
#else
using vf = __m256;
using vi = __m256i;
constexpr int kLanes = 8;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf madd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float hsum(vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(vf x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline __m128 hsum4(vf a, vf b, vf c, vf d) {
  const vf x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}
inline vf round_even(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline vf times_pow2(vf x, vf n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(e));
}
inline vi load_words(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const vi*>(p)); }
template <int B>
inline vf byte_plane(vi w) {
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 24 - 8 * B), 24));
}
#endif

// exp(x) for x <= 0 (scores minus their maximum), to ~2 ulp: Cephes' expf. x below -87.3 is
// clamped there (~1.6e-38, where 2^n is still a normal float).
inline vf exp_nonpositive(vf x) {
  x = vmax(x, set1(-87.3f));
  const vf n = round_even(mul(x, set1(1.44269504f)));
  vf r = madd(n, set1(-0.693359375f), x);
  r = madd(n, set1(2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = madd(p, r, set1(1.3981999507e-3f));
  p = madd(p, r, set1(8.3334519073e-3f));
  p = madd(p, r, set1(4.1665795894e-2f));
  p = madd(p, r, set1(1.6666665459e-1f));
  p = madd(p, r, set1(5.0000001201e-1f));
  p = madd(mul(p, r), r, add(r, set1(1.f)));
  return times_pow2(p, n);
}

// s[r * ld] (+)= the sum of acc[r], r < R <= 5 (four at a time: one transposing reduction)
template <int R>
inline void store_sums(const vf* acc, float* s, int64_t ld, bool accumulate) {
  alignas(16) float sums[8];
  if (R == 1) sums[0] = hsum(acc[0]);
  else _mm_store_ps(sums, hsum4(acc[0], acc[1], acc[R > 2 ? 2 : 1], acc[R > 3 ? 3 : 1]));
  if (R == 5) sums[4] = hsum(acc[R - 1]);
  for (int r = 0; r < R; ++r) s[r * ld] = accumulate ? s[r * ld] + sums[r] : sums[r];
}

// s[r * ld + t] (+)= q_r . K_t over the C vectors of columns from c, for R rows and slots
// [t0, t1) of a float segment; q's columns stay in registers across the slots
template <int R, int C>
void score_columns(const float* q, int hd, const gqalab::Segment& sg, int64_t t0, int64_t t1,
                   int c, float* s, int64_t ld) {
  const float* k = static_cast<const float*>(sg.k) + c;
  vf qv[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) qv[r][j] = load(q + r * hd + c + j * kLanes);
  for (int64_t t = t0; t < t1; ++t) {
    const float* kt = k + t * sg.k_stride;
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = mul(qv[r][0], load(kt));
    for (int j = 1; j < C; ++j) {
      const vf kv = load(kt + j * kLanes);
      for (int r = 0; r < R; ++r) acc[r] = madd(qv[r][j], kv, acc[r]);
    }
    store_sums<R>(acc, s + t, ld, c > 0);
  }
}

template <int R>
void scores_float(const float* q, int hd, const gqalab::Segment& sg, int64_t t0, int64_t t1,
                  float* s, int64_t ld) {
  // 64 columns a pass: one reduction a slot at head_dim 64 (AVX2 keeps part of q in L1)
  constexpr int C = 64 / kLanes;
  int c = 0;
  for (; c + C * kLanes <= hd; c += C * kLanes)
    score_columns<R, C>(q, hd, sg, t0, t1, c, s, ld);
  for (; c < hd; c += kLanes) score_columns<R, 1>(q, hd, sg, t0, t1, c, s, ld);
}

// The same over int8 keys: q times the channel scales of each 32-slot block (in registers,
// one vector of words at a time: 4 planes of consecutive channels), then the widened bytes
// (t0, t1 multiples of 32)
template <int R>
void scores_int8(const float* q, int hd, const gqalab::Segment& sg, int64_t t0, int64_t t1,
                 float* s, int64_t ld) {
  const int words = hd / 4;
  const int32_t* k = static_cast<const int32_t*>(sg.k);
  for (int64_t b0 = t0; b0 < t1; b0 += 32) {
    const float* ks = sg.k_scale + b0 / 32 * sg.k_scale_stride;
    for (int w = 0; w < words; w += kLanes) {
      vf qk[R][4];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < 4; ++b)
          qk[r][b] = mul(load(q + r * hd + b * words + w), load(ks + b * words + w));
      for (int64_t t = b0; t < b0 + 32; ++t) {
        const vi kw = load_words(k + t * sg.k_stride + w);
        const vf kb[4] = {byte_plane<0>(kw), byte_plane<1>(kw), byte_plane<2>(kw),
                          byte_plane<3>(kw)};
        vf acc[R];
        for (int r = 0; r < R; ++r) acc[r] = mul(qk[r][0], kb[0]);
        for (int b = 1; b < 4; ++b)
          for (int r = 0; r < R; ++r) acc[r] = madd(qk[r][b], kb[b], acc[r]);
        store_sums<R>(acc, s + t, ld, w > 0);
      }
    }
  }
}

// out_r += sum over slots [t0, t1) of p[r * ld + t] V_t for the C vectors of columns from
// c, accumulated in registers across the tile: R * C independent chains of FMAs
template <int R, int C>
void value_columns(const float* p, int64_t ld, const gqalab::Segment& sg, int64_t t0,
                   int64_t t1, int hd, int c, float* out) {
  const float* v = static_cast<const float*>(sg.v) + c;
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = load(out + r * hd + c + j * kLanes);
  for (int64_t t = t0; t < t1; ++t) {
    vf vv[C];
    for (int j = 0; j < C; ++j) vv[j] = load(v + t * sg.v_stride + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const vf pr = set1(p[r * ld + t]);
      for (int j = 0; j < C; ++j) acc[r][j] = madd(pr, vv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) store(out + r * hd + c + j * kLanes, acc[r][j]);
}

template <int R>
void values_float(const float* p, int64_t ld, const gqalab::Segment& sg, int64_t t0,
                  int64_t t1, int hd, float* out) {
  constexpr int C = kLanes == 16 || R <= 2 ? 4 : 2;  // AVX2: 16 registers
  int c = 0;
  for (; c + C * kLanes <= hd; c += C * kLanes)
    value_columns<R, C>(p, ld, sg, t0, t1, hd, c, out);
  for (; c < hd; c += kLanes) value_columns<R, 1>(p, ld, sg, t0, t1, hd, c, out);
}

// The same over int8 values, p already times each slot's scale (partial)
template <int R>
void values_int8(const float* p, int64_t ld, const gqalab::Segment& sg, int64_t t0,
                 int64_t t1, int hd, float* out) {
  const int words = hd / 4;
  const int32_t* v = static_cast<const int32_t*>(sg.v);
  for (int w = 0; w < words; w += kLanes) {
    vf acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < 4; ++b) acc[r][b] = load(out + r * hd + b * words + w);
    for (int64_t t = t0; t < t1; ++t) {
      const vi vw = load_words(v + t * sg.v_stride + w);
      const vf vb[4] = {byte_plane<0>(vw), byte_plane<1>(vw), byte_plane<2>(vw),
                        byte_plane<3>(vw)};
      for (int r = 0; r < R; ++r) {
        const vf pr = set1(p[r * ld + t]);
        for (int b = 0; b < 4; ++b) acc[r][b] = madd(pr, vb[b], acc[r][b]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < 4; ++b) store(out + r * hd + b * words + w, acc[r][b]);
  }
}

// Rows per pass: AVX-512 holds 5 rows' q (scores) or accumulators (values) in its 32
// registers, AVX2 4 in its 16; values_int8 keeps 4 accumulators a row: 4 rows, AVX2 2.
constexpr int kRows = kLanes == 16 ? 5 : 4;
constexpr int kInt8ValueRows = kLanes == 16 ? 4 : 2;

// Expands CALL(R) with R = rows (1..5) as a compile-time constant, for each tile of rows
// r0 .. r0 + R of g, as few tiles of at most `tile` rows as can be, of even sizes (MQA's 9
// rows: 5 + 4, not 5 + 3 + 1, which would read the cache once more for one row)
#define BY_ROW_TILES(g, tile, CALL)                                    \
  for (int r0 = 0, n = ((g) + (tile) - 1) / (tile); r0 < (g); --n) {   \
    const int rows = ((g) - r0 + n - 1) / n;                           \
    switch (rows) {                                                    \
      case 1: CALL(1); break;                                          \
      case 2: CALL(2); break;                                          \
      case 3: CALL(3); break;                                          \
      case 4: CALL(4); break;                                          \
      default: CALL(5);                                                \
    }                                                                  \
    r0 += rows;                                                        \
  }

// softmax numerators in place over n scores (buffer padded to a whole vector); returns
// their sum and sets *m to the largest score
float exp_row(float* s, int64_t n, float* m) {
  vf mv = set1(-3.0e38f);
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) mv = vmax(mv, load(s + t));
  float mx = hmax(mv);
  for (; t < n; ++t) mx = s[t] > mx ? s[t] : mx;
  vf lv = zero();
  const vf mvec = set1(mx);
  for (t = 0; t + kLanes <= n; t += kLanes) {
    const vf e = exp_nonpositive(sub(load(s + t), mvec));
    store(s + t, e);
    lv = add(lv, e);
  }
  float l = hsum(lv);
  if (t < n) {  // the tail: a whole vector over the padding, summed over valid slots only
    store(s + t, exp_nonpositive(sub(load(s + t), mvec)));
    for (; t < n; ++t) l += s[t];
  }
  *m = mx;
  return l;
}

// p[r * ld + t] *= scale[t] for g rows of n slots: int8 values' per-slot scales
void fold_scales(const float* scale, int64_t n, int g, float* p, int64_t ld) {
  for (int r = 0; r < g; ++r) {
    float* pr = p + r * ld;
    int64_t t = 0;
    for (; t + kLanes <= n; t += kLanes) store(pr + t, mul(load(pr + t), load(scale + t)));
    for (; t < n; ++t) pr[t] *= scale[t];
  }
}

}  // namespace

namespace gqalab {
namespace GQALAB_ISA {

void partial(GQALAB_PARTIAL_ARGS) {
  int64_t total = 0;
  for (int i = 0; i < n_seg; ++i) total += seg[i].n;
  const int64_t ld = (total + kLanes - 1) / kLanes * kLanes;
  int64_t off = 0;  // scores of segment i start at column off
  for (int i = 0; i < n_seg; ++i) {
    const Segment& sg = seg[i];
    for (int64_t t0 = 0; t0 < sg.n; t0 += kTile) {
      const int64_t t1 = t0 + kTile < sg.n ? t0 + kTile : sg.n;
      float* s = scores + off;
#define SCORES(R)                                                                 \
  sg.k_scale ? scores_int8<R>(q + r0 * hd, hd, sg, t0, t1, s + r0 * ld, ld)      \
             : scores_float<R>(q + r0 * hd, hd, sg, t0, t1, s + r0 * ld, ld)
      BY_ROW_TILES(g, kRows, SCORES)
#undef SCORES
    }
    off += sg.n;
  }
  for (int r = 0; r < g; ++r) {
    l[r] = exp_row(scores + r * ld, total, m + r);
    for (int c = 0; c < hd; ++c) acc[r * hd + c] = 0.f;
  }
  off = 0;
  for (int i = 0; i < n_seg; ++i) {
    const Segment& sg = seg[i];
    if (sg.v_scale) fold_scales(sg.v_scale, sg.n, g, scores + off, ld);
    for (int64_t t0 = 0; t0 < sg.n; t0 += kTile) {
      const int64_t t1 = t0 + kTile < sg.n ? t0 + kTile : sg.n;
      const float* p = scores + off;
#define VALUES(R)                                                                 \
  sg.k_scale ? values_int8<R>(p + r0 * ld, ld, sg, t0, t1, hd, acc + r0 * hd)    \
             : values_float<R>(p + r0 * ld, ld, sg, t0, t1, hd, acc + r0 * hd)
      BY_ROW_TILES(g, sg.k_scale ? kInt8ValueRows : kRows, VALUES)
#undef VALUES
    }
    off += sg.n;
  }
}

}  // namespace GQALAB_ISA
}  // namespace gqalab
