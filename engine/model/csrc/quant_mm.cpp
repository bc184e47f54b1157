// int8 activations x int4 / int8 weights on AVX2 (llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products), for
// the decode rows of engine/quant.py's Int4Linear and Int8Linear. PyTorch's weight-only kernels convert
// weights to floats inside a matrix-vector loop; here each group of 32 activations is quantized to int8 once
// per call and multiplied against the weight codes with integer dot products (vpmaddubsw), 32 a instruction.
//
// Every output row is computed alone: the same instructions in the same order whatever the row count or
// the thread split (threads split the output features, never the reduction), so the result of a row never
// depends on the rows beside it (engine/invariance.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;     // weights (and activations) per scale
constexpr int64_t kRowBlock = 4;   // activation rows that share one unpacking of a weight group

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// One row of activations to int8, per group of 32: scale amax / 127, codes round(x / scale) (ties to
// even), the sum of the codes times the scale, and the group's float sum. With w = (q - 8) s + z,
//   sum_j w_j x_j ~= s d sum_j q_j a_j - 8 s d sum_j a_j + z sum_j x_j,
// so only the centred part (q - 8) s meets the activations' rounding; z multiplies the exact sum.
template <typename T>
void quantize_row(const T* x, int64_t groups, int8_t* codes, float* scales, float* code_sums, float* sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t g = 0; g < groups; ++g) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = load8(x + g * kGroup + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      sum = _mm256_add_ps(sum, v[j]);
    }
    const float top = hmax(amax);
    const __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + g * kGroup), _mm256_permutevar8x32_epi32(packed, order));
    scales[g] = top / 127.f;
    code_sums[g] = scales[g] * hsum(_mm256_cvtepi32_ps(qsum));  // |sum| <= 32 * 127: exact in float
    sums[g] = hsum(sum);
  }
}

// out[r] = sum_g (s[g] d[r,g] dot(q[g], a[r,g]) - 8 s[g] d[r,g] sum(a[r,g]) + z[g] sum(x[r,g])) for one
// output feature (see quantize_row). R activation rows share each unpacking of a weight group; R
// is a compile-time constant, so the row loop unrolls and its R accumulators stay in registers.
template <int R, typename S, typename O>
void int4_tile(const uint8_t* wcodes, const S* wsz, int64_t groups, const int8_t* acodes, const float* ascales,
               const float* acode_sums, const float* asums, int64_t k, O* out, int64_t out_stride) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  float zeros[R], centre[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); zeros[r] = centre[r] = 0.f; }
  for (int64_t g = 0; g < groups; ++g) {
    // byte j of a group holds codes j (low nibble) and j + 16 (high nibble)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wcodes + g * kGroup / 2));
    const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
    const float scale = to_float(wsz[2 * g]);
    const float zero = to_float(wsz[2 * g + 1]);
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acodes + r * k + g * kGroup));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * ascales[r * groups + g]), acc[r]);
      centre[r] += scale * acode_sums[r * groups + g];
      zeros[r] += zero * asums[r * groups + g];
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = static_cast<O>(hsum(acc[r]) - 8.f * centre[r] + zeros[r]);
}

// Up to kRowBlock rows of one output feature, dispatched to the unrolled tile.
template <typename S, typename O>
void int4_rows(int64_t rows, const uint8_t* wcodes, const S* wsz, int64_t groups, const int8_t* acodes,
               const float* ascales, const float* acode_sums, const float* asums, int64_t k, O* out,
               int64_t out_stride) {
  switch (rows) {
    case 1: int4_tile<1>(wcodes, wsz, groups, acodes, ascales, acode_sums, asums, k, out, out_stride); break;
    case 2: int4_tile<2>(wcodes, wsz, groups, acodes, ascales, acode_sums, asums, k, out, out_stride); break;
    case 3: int4_tile<3>(wcodes, wsz, groups, acodes, ascales, acode_sums, asums, k, out, out_stride); break;
    default: int4_tile<4>(wcodes, wsz, groups, acodes, ascales, acode_sums, asums, k, out, out_stride); break;
  }
}

// out[r] = s * sum_g d[r,g] dot(q[g], a[r,g]) for one output feature of an int8 weight with one scale s
// per row (Int8Linear). vpmaddubsw takes one unsigned operand: |q| times a with q's sign, as llama.cpp's
// Q8_0 dot product does (|q| * |a| <= 127 * 127, a pair's sum fits int16).
template <int R, typename S, typename O>
void int8_tile(const int8_t* wcodes, S wscale, int64_t groups, const int8_t* acodes, const float* ascales,
               int64_t k, O* out, int64_t out_stride) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wcodes + g * kGroup));
    const __m256i magnitude = _mm256_sign_epi8(w, w);
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acodes + r * k + g * kGroup));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(a, w)), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ascales[r * groups + g]), acc[r]);
    }
  }
  const float scale = to_float(wscale);
  for (int r = 0; r < R; ++r) out[r * out_stride] = static_cast<O>(scale * hsum(acc[r]));
}

template <typename S, typename O>
void int8_rows(int64_t rows, const int8_t* wcodes, S wscale, int64_t groups, const int8_t* acodes,
               const float* ascales, int64_t k, O* out, int64_t out_stride) {
  switch (rows) {
    case 1: int8_tile<1>(wcodes, wscale, groups, acodes, ascales, k, out, out_stride); break;
    case 2: int8_tile<2>(wcodes, wscale, groups, acodes, ascales, k, out, out_stride); break;
    case 3: int8_tile<3>(wcodes, wscale, groups, acodes, ascales, k, out, out_stride); break;
    default: int8_tile<4>(wcodes, wscale, groups, acodes, ascales, k, out, out_stride); break;
  }
}

// The activations of every row, quantized once per call (quantize_row).
struct Int8Activations {
  std::vector<int8_t> codes;
  std::vector<float> scales, code_sums, sums;

  template <typename T>
  Int8Activations(const T* x, int64_t m, int64_t k)
      : codes(m * k), scales(m * k / kGroup), code_sums(m * k / kGroup), sums(m * k / kGroup) {
    const int64_t groups = k / kGroup;
    for (int64_t r = 0; r < m; ++r)
      quantize_row(x + r * k, groups, codes.data() + r * k, scales.data() + r * groups,
                   code_sums.data() + r * groups, sums.data() + r * groups);
  }
};

// Threads split the output features, never the reduction; a feature's weights stay in L1 across its row
// blocks. tile(j, r0, rows) computes rows r0 .. r0 + rows of output feature j.
template <typename Tile>
void for_each_tile(int64_t m, int64_t n, Tile tile) {
  at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) tile(j, r0, std::min(kRowBlock, m - r0));
  });
}

template <typename T, typename S, typename O>
void int8_mm(const T* x, const int8_t* wcodes, const S* wscales, int64_t m, int64_t n, int64_t k, O* out) {
  const int64_t groups = k / kGroup;
  const Int8Activations act(x, m, k);
  for_each_tile(m, n, [&](int64_t j, int64_t r0, int64_t rows) {
    int8_rows(rows, wcodes + j * k, wscales[j], groups, act.codes.data() + r0 * k, act.scales.data() + r0 * groups,
              k, out + r0 * n + j, n);
  });
}

template <typename T, typename S, typename O>
void int4_mm(const T* x, const uint8_t* wcodes, const S* wsz, int64_t m, int64_t n, int64_t k, O* out) {
  const int64_t groups = k / kGroup;
  const Int8Activations act(x, m, k);
  for_each_tile(m, n, [&](int64_t j, int64_t r0, int64_t rows) {
    int4_rows(rows, wcodes + j * k / 2, wsz + j * groups * 2, groups, act.codes.data() + r0 * k,
              act.scales.data() + r0 * groups, act.code_sums.data() + r0 * groups, act.sums.data() + r0 * groups,
              k, out + r0 * n + j, n);
  });
}

// Calls fn(x, scales, out) with typed pointers: x and out in x's dtype, scales float32 or bfloat16.
template <typename Fn>
at::Tensor dispatch(const at::Tensor& x, const at::Tensor& scales, int64_t n, Fn fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16,
              "scales must be float32 or bfloat16");
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  auto with_scales = [&](auto* xp, auto* op) {
    if (sc.scalar_type() == at::kFloat) fn(xp, sc.data_ptr<float>(), op);
    else fn(xp, sc.data_ptr<c10::BFloat16>(), op);
  };
  if (xc.scalar_type() == at::kFloat) with_scales(xc.data_ptr<float>(), out.data_ptr<float>());
  else with_scales(xc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  return out;
}

// x [m, k]; codes uint8 [n, k / 2]; scales_zeros [n, k / 32, 2] (scale, zero). Returns [m, n] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scales_zeros.dim() == 3,
              "int4_linear: x [m, k], codes [n, k/2], scales_zeros [n, k/32, 2]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(k % kGroup == 0 && codes.size(1) * 2 == k && scales_zeros.size(0) == n &&
              scales_zeros.size(1) * kGroup == k && scales_zeros.size(2) == 2, "int4_linear: shapes do not match");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "int4_linear: codes must be uint8");
  const at::Tensor cc = codes.contiguous();
  return dispatch(x, scales_zeros, n, [&](auto* xp, auto* sp, auto* op) {
    int4_mm(xp, cc.data_ptr<uint8_t>(), sp, m, n, k, op);
  });
}

// x [m, k]; weight int8 [n, k]; scales [n]. Returns [m, n] in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scales.dim() == 1, "int8_linear: x [m, k], weight [n, k], scales [n]");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(k % kGroup == 0 && weight.size(1) == k && scales.size(0) == n, "int8_linear: shapes do not match");
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8_linear: weight must be int8");
  const at::Tensor wc = weight.contiguous();
  return dispatch(x, scales, n, [&](auto* xp, auto* sp, auto* op) { int8_mm(xp, wc.data_ptr<int8_t>(), sp, m, n, k, op); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvmini_native, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales_zeros) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvmini_native, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
