// Matrix-vector products over int4 and int8 weights, for a few rows of activations.
//
// Decoding multiplies one token's activations (or a few) by every weight matrix: each weight is
// read once per step, and the product is bound by how fast the codes can be turned into
// arithmetic. No float weight is ever written to memory here; the codes are unpacked in
// registers, a chunk of 32 columns at a time.
//
// Layouts (those of lmscale.model.quantized, read as they are stored):
//   int4  qweight uint8 (N, K/2): byte j of a row holds columns 2j (low nibble) and 2j+1
//         (high nibble); w[n, k] = q[n, k] * scales[n, g] + mins[n, g], g = k / group
//         (an integer zero point z is passed as mins = -z * scales)
//   int8  qweight int8 (N, K); w[n, k] = q[n, k] * scales[n, g] (per channel: group = K)
// so  y[m, n] = sum_g scales[n, g] * (q[n, g] . x[m, g]) + mins[n, g] * sum(x[m, g]).
//
// A chunk of 32 int4 columns is 16 bytes; unpacked, their low nibbles are the even columns and
// their high nibbles the odd ones. So for int4 the activations are permuted once per call,
// chunk by chunk, to [even columns | odd columns], and then read in the codes' order (the
// weights, read every step, are never rearranged).
//
// Two ways to compute the dot products, chosen at run time:
//   VNNI (AVX-512 VNNI)  each row of x is quantized to int8, one scale per 32 columns
//       (symmetric, round to nearest), and the integer products are summed by vpdpbusd, 32 per
//       instruction: the method of llama.cpp's Q4/Q8 x Q8 dot products. The float offsets
//       (mins * sum x) use the exact float sums. int8 weights are made unsigned by adding 128
//       (XOR 0x80), and 128 * sum(xq) is taken back out, so every code -128..127 is exact.
//   float (AVX-512F, AVX2 + FMA, or plain C++)  codes converted to float32 and multiply-added
//       against float32 x: the dequantized matmul up to summation order, ~3x slower.
// Output rows are split across the intra-op threads (at::parallel_for). The *_cat ops take
// several weights that read the same x (q/k/v, gate/up): x is prepared once, and all their
// rows share one parallel region; their outputs come side by side, in one (M, sum N) tensor.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 32;  // columns per chunk: 16 bytes of int4, 32 of int8
constexpr int64_t kMaxRows = 8;  // activation rows a call may carry
constexpr int64_t kGrain = 32;  // output rows per parallel task, at least

// The activations, as each path reads them.
struct Activations {
  const float* x;       // (M, K) float32 (for int4 permuted, see above)
  const int8_t* xq;     // (M, K) int8 codes (VNNI)
  const float* dx;      // (M, K/32) their scales (VNNI)
  const int32_t* corr;  // (M, K/32, 8) -128 * sum(xq) of each chunk in lane 0 (VNNI, int8)
  const float* xsum;    // (M, ng) the float sum of x over each weight group (int4)
};

struct Weights {
  const uint8_t* q;      // int4 (N, K/2) or int8 (N, K), see above
  const float* scales;   // (N, ng)
  const float* mins;     // (N, ng), int4 only
  float* y;              // (M, N) with rows `y_stride` apart (its columns of a wider output)
  int64_t K, y_stride, group;
};

using RowKernel = void (*)(const Activations&, const Weights&, int64_t, int64_t);

// Shared by the vector paths (a function whose ISA is a subset of its caller's inlines).

__attribute__((target("avx2,fma"))) inline float sum8_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_i a[i] * b[i] as vector multiply-adds (a scalar loop would be summed strictly in order,
// one dependent add after another)
__attribute__((target("avx512f"))) inline float dot_avx512(const float* a, const float* b,
                                                           int64_t n) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1;
    total = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, a + i), _mm512_maskz_loadu_ps(lanes, b + i),
                            total);
  }
  return _mm512_reduce_add_ps(total);
}

// --- VNNI (AVX-512 VNNI on 256-bit vectors) ----------------------------------------------------

#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))


template <int M>
VNNI inline void int4_chunk_vnni(const Activations& a, const Weights& w, const uint8_t* q,
                                 float scale, int64_t c, int64_t chunks, __m256* acc) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16));
  const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low),
                                         _mm_and_si128(bytes, low));  // even | odd
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < M; ++m) {
    const __m256i xq =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * w.K + c * kChunk));
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xq));
    acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(dot, s), _mm256_set1_ps(a.dx[m * chunks + c]), acc[m]);
  }
}

template <int M>
VNNI void int4_rows_vnni(const Activations& a, const Weights& w, int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, chunks = w.K / kChunk;
  const int shift = __builtin_ctzll(w.group / kChunk);  // a power of two (checked)
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = w.q + n * (w.K / 2);
    const float* s = w.scales + n * ng;
    __m256 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) {
      int4_chunk_vnni<M>(a, w, q, s[c >> shift], c, chunks, even);
      int4_chunk_vnni<M>(a, w, q, s[(c + 1) >> shift], c + 1, chunks, odd);
    }
    if (c < chunks) int4_chunk_vnni<M>(a, w, q, s[c >> shift], c, chunks, even);
    for (int m = 0; m < M; ++m)
      w.y[m * w.y_stride + n] = sum8_avx2(_mm256_add_ps(even[m], odd[m])) +
                         dot_avx512(w.mins + n * ng, a.xsum + m * ng, ng);
  }
}

template <int M>
VNNI inline void int8_chunk_vnni(const Activations& a, const Weights& w, const uint8_t* q,
                                 float scale, int64_t c, int64_t chunks, __m256* acc) {
  const __m256i codes = _mm256_xor_si256(  // q + 128, as unsigned bytes
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * kChunk)),
      _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < M; ++m) {
    const __m256i xq =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * w.K + c * kChunk));
    const __m256i start =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr + (m * chunks + c) * 8));
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, codes, xq));
    acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(dot, s), _mm256_set1_ps(a.dx[m * chunks + c]), acc[m]);
  }
}

template <int M>
VNNI void int8_rows_vnni(const Activations& a, const Weights& w, int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, chunks = w.K / kChunk;
  const int64_t per_group = w.group / kChunk;  // not always a power of two (per channel)
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = w.q + n * w.K;
    const float* s = w.scales + n * ng;
    __m256 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    int64_t c = 0;
    if (per_group == 1) {
      for (; c + 1 < chunks; c += 2) {
        int8_chunk_vnni<M>(a, w, q, s[c], c, chunks, even);
        int8_chunk_vnni<M>(a, w, q, s[c + 1], c + 1, chunks, odd);
      }
    }
    for (; c < chunks; ++c) int8_chunk_vnni<M>(a, w, q, s[c / per_group], c, chunks, even);
    for (int m = 0; m < M; ++m) w.y[m * w.y_stride + n] = sum8_avx2(_mm256_add_ps(even[m], odd[m]));
  }
}

// x -> int8 codes, one scale per 32 columns (max |x| / 127), and lane 0 of each chunk's
// int8 correction. AVX-512F; the plain loop below is the same arithmetic.
VNNI void quantize_rows_vnni(const float* x, int64_t values, int8_t* xq, float* dx,
                             int32_t* corr) {
  for (int64_t c = 0; c < values / kChunk; ++c) {
    const __m512 lo = _mm512_loadu_ps(x + c * kChunk), hi = _mm512_loadu_ps(x + c * kChunk + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    dx[c] = amax / 127.f;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + c * kChunk), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + c * kChunk + 16),
                     _mm512_cvtsepi32_epi8(qhi));
    int32_t* lanes = corr + c * 8;
    lanes[0] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    for (int i = 1; i < 8; ++i) lanes[i] = 0;
  }
}

// --- float: AVX-512F ----------------------------------------------------------------------


template <int M>
__attribute__((target("avx512f"))) void int4_rows_avx512(const Activations& a, const Weights& w,
                                                          int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, per_group = w.group / kChunk;
  const __m512i low = _mm512_set1_epi32(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = w.q + n * (w.K / 2);
    const float* s = w.scales + n * ng;
    __m512 acc[M][2];  // alternate groups: two shorter dependency chains
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const __m512i bytes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16)));
        const __m512 first = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));  // even columns
        const __m512 second = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));  // odd ones
        for (int m = 0; m < M; ++m) {
          const float* x = a.x + m * w.K + c * kChunk;
          part[m] = _mm512_fmadd_ps(first, _mm512_loadu_ps(x), part[m]);
          part[m] = _mm512_fmadd_ps(second, _mm512_loadu_ps(x + 16), part[m]);
        }
      }
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) acc[m][g & 1] = _mm512_fmadd_ps(part[m], scale, acc[m][g & 1]);
    }
    for (int m = 0; m < M; ++m)
      w.y[m * w.y_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) +
                         dot_avx512(w.mins + n * ng, a.xsum + m * ng, ng);
  }
}

template <int M>
__attribute__((target("avx512f"))) void int8_rows_avx512(const Activations& a, const Weights& w,
                                                          int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, per_group = w.group / 16;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + n * w.K;
    const float* s = w.scales + n * ng;
    __m512 acc[M][2];  // alternate groups: two shorter dependency chains
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 16) {
        const __m512 codes = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
        for (int m = 0; m < M; ++m)
          part[m] = _mm512_fmadd_ps(codes, _mm512_loadu_ps(a.x + m * w.K + k), part[m]);
      }
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) acc[m][g & 1] = _mm512_fmadd_ps(part[m], scale, acc[m][g & 1]);
    }
    for (int m = 0; m < M; ++m)
      w.y[m * w.y_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}

// --- float: AVX2 + FMA --------------------------------------------------------------------

inline float dot_plain(const float* a, const float* b, int64_t n) {
  float partial[4] = {0.f, 0.f, 0.f, 0.f};  // four independent sums, not one chain
  for (int64_t i = 0; i < n; ++i) partial[i % 4] += a[i] * b[i];
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}


template <int M>
__attribute__((target("avx2,fma"))) void int4_rows_avx2(const Activations& a, const Weights& w,
                                                         int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, per_group = w.group / kChunk;
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = w.q + n * (w.K / 2);
    const float* s = w.scales + n * ng;
    __m256 acc[M][2];  // alternate groups: two shorter dependency chains
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      __m256 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        for (int half = 0; half < 2; ++half) {  // bytes 0-7, then 8-15
          const __m256i bytes = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c * 16 + half * 8)));
          const __m256 first = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low));
          const __m256 second = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
          for (int m = 0; m < M; ++m) {
            const float* x = a.x + m * w.K + c * kChunk + half * 8;
            part[m] = _mm256_fmadd_ps(first, _mm256_loadu_ps(x), part[m]);
            part[m] = _mm256_fmadd_ps(second, _mm256_loadu_ps(x + 16), part[m]);
          }
        }
      }
      const __m256 scale = _mm256_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) acc[m][g & 1] = _mm256_fmadd_ps(part[m], scale, acc[m][g & 1]);
    }
    for (int m = 0; m < M; ++m)
      w.y[m * w.y_stride + n] = sum8_avx2(_mm256_add_ps(acc[m][0], acc[m][1])) +
                         dot_plain(w.mins + n * ng, a.xsum + m * ng, ng);
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void int8_rows_avx2(const Activations& a, const Weights& w,
                                                         int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + n * w.K;
    const float* s = w.scales + n * ng;
    __m256 acc[M][2];  // alternate groups: two shorter dependency chains
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      __m256 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 8) {
        const __m256 codes = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
        for (int m = 0; m < M; ++m)
          part[m] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(a.x + m * w.K + k), part[m]);
      }
      const __m256 scale = _mm256_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) acc[m][g & 1] = _mm256_fmadd_ps(part[m], scale, acc[m][g & 1]);
    }
    for (int m = 0; m < M; ++m) w.y[m * w.y_stride + n] = sum8_avx2(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

// --- float: plain C++ (any other CPU) -------------------------------------------------------

template <int M>
void int4_rows_plain(const Activations& a, const Weights& w, int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group, per_group = w.group / kChunk;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* q = w.q + n * (w.K / 2);
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float part = 0.f;
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const float* x = a.x + m * w.K + c * kChunk;
          for (int i = 0; i < 16; ++i)
            part += float(q[c * 16 + i] & 0x0F) * x[i] + float(q[c * 16 + i] >> 4) * x[16 + i];
        }
        total += part * w.scales[n * ng + g] + w.mins[n * ng + g] * a.xsum[m * ng + g];
      }
      w.y[m * w.y_stride + n] = total;
    }
  }
}

template <int M>
void int8_rows_plain(const Activations& a, const Weights& w, int64_t begin, int64_t end) {
  const int64_t ng = w.K / w.group;
  const int8_t* q = reinterpret_cast<const int8_t*>(w.q);
  for (int64_t n = begin; n < end; ++n) {
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float part = 0.f;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k)
          part += float(q[n * w.K + k]) * a.x[m * w.K + k];
        total += part * w.scales[n * ng + g];
      }
      w.y[m * w.y_stride + n] = total;
    }
  }
}

// --- dispatch -------------------------------------------------------------------------------

enum class Isa : int64_t { vnni = 0, avx512 = 1, avx2 = 2, plain = 3 };

Isa detect() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::vnni;
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::plain;
}

Isa active = detect();  // lowered by set_matvec_isa (tests compare the paths)

// The row kernels by activation row count (1..kMaxRows): M is a template parameter so that
// each row's accumulators stay in registers.
template <template <int> class K>
constexpr std::array<RowKernel, kMaxRows> by_rows() {
  return {K<1>::run, K<2>::run, K<3>::run, K<4>::run, K<5>::run, K<6>::run, K<7>::run, K<8>::run};
}

#define ROW_KERNEL(name)                                                                     \
  template <int M>                                                                           \
  struct name##_t {                                                                          \
    static void run(const Activations& a, const Weights& w, int64_t b, int64_t e) {          \
      name<M>(a, w, b, e);                                                                   \
    }                                                                                        \
  };

ROW_KERNEL(int4_rows_vnni)
ROW_KERNEL(int4_rows_avx512)
ROW_KERNEL(int4_rows_avx2)
ROW_KERNEL(int4_rows_plain)
ROW_KERNEL(int8_rows_vnni)
ROW_KERNEL(int8_rows_avx512)
ROW_KERNEL(int8_rows_avx2)
ROW_KERNEL(int8_rows_plain)

// indexed [isa][rows - 1]
const std::array<std::array<RowKernel, kMaxRows>, 4> kInt4 = {
    by_rows<int4_rows_vnni_t>(), by_rows<int4_rows_avx512_t>(), by_rows<int4_rows_avx2_t>(),
    by_rows<int4_rows_plain_t>()};
const std::array<std::array<RowKernel, kMaxRows>, 4> kInt8 = {
    by_rows<int8_rows_vnni_t>(), by_rows<int8_rows_avx512_t>(), by_rows<int8_rows_avx2_t>(),
    by_rows<int8_rows_plain_t>()};

// The activations in the form the active path reads (the buffers own the storage).
struct Prepared {
  std::vector<float> permuted;
  std::vector<int8_t> xq;
  std::vector<float> dx, xsum;
  std::vector<int32_t> corr;
  Activations view{};
};

void prepare(const float* x, int64_t M, int64_t K, int64_t group, bool int4, Prepared& p) {
  if (int4) {
    p.permuted.resize(M * K);
    for (int64_t chunk = 0; chunk < M * K / kChunk; ++chunk) {
      const float* src = x + chunk * kChunk;
      float* dst = p.permuted.data() + chunk * kChunk;
      for (int i = 0; i < 16; ++i) dst[i] = src[2 * i], dst[16 + i] = src[2 * i + 1];
    }
    x = p.permuted.data();
  }
  p.view.x = x;
  if (active == Isa::vnni) {
    const int64_t chunks = K / kChunk;
    p.xq.resize(M * K), p.dx.resize(M * chunks), p.corr.resize(M * chunks * 8);
    for (int64_t m = 0; m < M; ++m)
      quantize_rows_vnni(x + m * K, K, p.xq.data() + m * K, p.dx.data() + m * chunks,
                         p.corr.data() + m * chunks * 8);
    p.view.xq = p.xq.data(), p.view.dx = p.dx.data(), p.view.corr = p.corr.data();
  }
  if (int4) {  // a group is whole chunks, so its sum is the same permuted
    const int64_t ng = K / group;
    p.xsum.assign(M * ng, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) p.xsum[m * ng + k / group] += x[m * K + k];
    p.view.xsum = p.xsum.data();
  }
}

void check_x(const at::Tensor& x, const at::Tensor& qweight, int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "lowbit matvec: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "lowbit matvec: x must be (M, K) float32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "lowbit matvec: 1 to ", kMaxRows, " rows");
  TORCH_CHECK(group > 0 && group % kChunk == 0 && x.size(1) % group == 0,
              "lowbit matvec: the group must be a multiple of 32 that divides K");
  TORCH_CHECK(qweight.scalar_type() != at::kByte || ((group / kChunk) & (group / kChunk - 1)) == 0,
              "int4 matvec: the group must be 32 times a power of two");
}

void check_scales(const at::Tensor& t, int64_t N, int64_t ng, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == N && t.size(1) == ng,
              "lowbit matvec: ", name, " must be (N, K/group) float32");
}

// One weight's share of a call: its tensors and the output columns it fills.
struct Part {
  at::Tensor q, scales, mins;
  int64_t first;  // its first column in the output
};

// y (M, sum of the parts' N) = x times each part's weight, side by side. The activations are
// prepared once for all the parts, and the output rows of all of them are split across the
// threads in one parallel region (layers that read the same x: q/k/v, gate/up).
at::Tensor run(const at::Tensor& x_in, const std::vector<Part>& parts, int64_t group, bool int4,
               const std::array<std::array<RowKernel, kMaxRows>, 4>& table) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t total = parts.back().first + parts.back().q.size(0);
  Prepared p;
  prepare(x.data_ptr<float>(), M, K, group, int4, p);
  at::Tensor y = at::empty({M, total}, x.options());
  std::vector<Weights> weights;
  for (const Part& part : parts)  // each part writes its columns of y: row stride `total`
    weights.push_back({static_cast<const uint8_t*>(part.q.data_ptr()),
                       part.scales.data_ptr<float>(),
                       int4 ? part.mins.data_ptr<float>() : nullptr,
                       y.data_ptr<float>() + part.first, K, total, group});
  const RowKernel kernel = table[static_cast<int64_t>(active)][M - 1];
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < parts.size(); ++i) {  // the pieces of [begin, end) in each part
      const int64_t first = parts[i].first, rows = parts[i].q.size(0);
      const int64_t b = std::max(begin, first), e = std::min(end, first + rows);
      if (b < e) kernel(p.view, weights[i], b - first, e - first);
    }
  });
  return y;
}

// The parts of a call, checked: int4 weights come with mins, int8 ones with none (empty list).
std::vector<Part> to_parts(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                           at::TensorList mins, int64_t group, bool int4) {
  TORCH_CHECK(!qweights.empty() && scales.size() == qweights.size() &&
                  mins.size() == (int4 ? qweights.size() : 0),
              int4 ? "int4 matvec: as many scales and mins as weights"
                   : "int8 matvec: as many scales as weights");
  std::vector<Part> parts;
  int64_t first = 0;
  for (size_t i = 0; i < qweights.size(); ++i) {
    const at::Tensor& q = qweights[i];
    check_x(x, q, group);
    const int64_t N = q.size(0), ng = x.size(1) / group;
    if (int4) {
      TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.size(1) * 2 == x.size(1) &&
                      q.is_contiguous(),
                  "int4 matvec: qweight must be contiguous (N, K/2) uint8");
    } else {
      TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == x.size(1) &&
                      q.is_contiguous(),
                  "int8 matvec: qweight must be contiguous (N, K) int8");
    }
    check_scales(scales[i], N, ng, "scales");
    if (int4) check_scales(mins[i], N, ng, "mins");
    parts.push_back({q, scales[i].contiguous(), int4 ? mins[i].contiguous() : at::Tensor(), first});
    first += N;
  }
  return parts;
}

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group) {
  return run(x, to_parts(x, {qweight}, {scales}, {mins}, group, true), group, true, kInt4);
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       int64_t group) {
  return run(x, to_parts(x, {qweight}, {scales}, {}, group, false), group, false, kInt8);
}

at::Tensor int4_matvec_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                           at::TensorList mins, int64_t group) {
  return run(x, to_parts(x, qweights, scales, mins, group, true), group, true, kInt4);
}

at::Tensor int8_matvec_cat(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                           int64_t group) {
  return run(x, to_parts(x, qweights, scales, {}, group, false), group, false, kInt8);
}

int64_t matvec_isa() { return static_cast<int64_t>(active); }

// Use a slower path than the best one (a larger level), for tests; returns the level in force.
int64_t set_matvec_isa(int64_t level) {
  TORCH_CHECK(level >= 0 && level <= 3, "lowbit matvec: levels are 0 (vnni) to 3 (plain)");
  if (level >= static_cast<int64_t>(detect())) active = static_cast<Isa>(level);
  return static_cast<int64_t>(active);
}

}  // namespace

TORCH_LIBRARY(lmscale, m) {
  m.def("int4_matvec(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group) -> Tensor");
  m.def("int8_matvec(Tensor x, Tensor qweight, Tensor scales, int group) -> Tensor");
  m.def("int4_matvec_cat(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] mins, int group)"
        " -> Tensor");
  m.def("int8_matvec_cat(Tensor x, Tensor[] qweights, Tensor[] scales, int group) -> Tensor");
  m.def("matvec_isa() -> int", matvec_isa);
  m.def("set_matvec_isa(int level) -> int", set_matvec_isa);
}

TORCH_LIBRARY_IMPL(lmscale, CPU, m) {
  m.impl("int4_matvec", int4_matvec);
  m.impl("int8_matvec", int8_matvec);
  m.impl("int4_matvec_cat", int4_matvec_cat);
  m.impl("int8_matvec_cat", int8_matvec_cat);
}
