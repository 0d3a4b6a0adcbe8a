// AVX2 + FMA backend (8 float lanes) of the sab CPU kernels; see isa_avx512.cpp for the
// backend interface. A lane mask here is a float vector whose *sign bit* is the lane's bit
// (the other bits are left as they fall): vblendvps reads only the sign bit, and the sign
// flip (xor with the inverted sign bit) needs nothing else, so a mask costs one variable
// shift (vpsllvd) of the 32-bit word broadcast from memory. The bytes-from-bits form it
// replaced (broadcast the byte through a GPR, and, compare) was 5 uops per 8 weights and
// dominated the decode: one variable shift made the M = 1 decode 1.2-1.4x faster on an
// AVX2-only AMD EPYC (A/B of both builds in one process, 1024x4096, 1 thread).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "sab_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

struct V {
  static constexpr int L = 8;
  static constexpr bool kMaskedAddIsOneOp = false;
  static constexpr bool kSignsOnActivations = false;
  using F = __m256;
  using M = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float f) { return _mm256_set1_ps(f); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_bf16(uint16_t* p, F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    // packus works per 128-bit half: [r0..r3 r0..r3 | r4..r7 r4..r7]; keep lanes 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Per-lane left shifts that bring bit (8q + l) of a 32-bit word to lane l's sign bit.
  alignas(32) static constexpr int32_t kShift[4][8] = {
      {31, 30, 29, 28, 27, 26, 25, 24}, {23, 22, 21, 20, 19, 18, 17, 16},
      {15, 14, 13, 12, 11, 10, 9, 8}, {7, 6, 5, 4, 3, 2, 1, 0}};
  static M mask(uint32_t bits) {  // the low 8 bits
    const __m256i w = _mm256_set1_epi32(static_cast<int>(bits));
    return _mm256_castsi256_ps(
        _mm256_sllv_epi32(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift[0]))));
  }
  static M mask_at(const uint8_t* row, int64_t j) {
    int32_t word;  // the aligned 32-bit word holding bit j (rows are whole int32 words)
    __builtin_memcpy(&word, row + ((j >> 5) << 2), 4);
    const __m256i sh = _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift[(j >> 3) & 3]));
    return _mm256_castsi256_ps(_mm256_sllv_epi32(_mm256_set1_epi32(word), sh));
  }
  using S = M;  // sign planes as lane masks (see isa_avx512.cpp)
  static S sign_bits(uint32_t bits) { return mask(bits); }
  static S sign_at(const uint8_t* row, int64_t j) { return mask_at(row, j); }
  static F blend(M m, F a, F b) { return _mm256_blendv_ps(a, b, m); }
  static F apply_sign(S s, F a) {  // s ? a : -a
    return _mm256_xor_ps(a, _mm256_andnot_ps(s, _mm256_set1_ps(-0.0f)));
  }
  static F add_masked(M m, F acc, F v) { return _mm256_add_ps(acc, _mm256_blendv_ps(_mm256_setzero_ps(), v, m)); }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  static void load_halves(const uint16_t* p, int n, float* out, const uint16_t* end) {
    int i = 0;  // 8 at a time (F16C): the scalar loop was ~10 % of the M = 1 decode (perf)
    for (; i < n && p + i + 8 <= end; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
    }
    for (; i < n; ++i) out[i] = _cvtsh_ss(p[i]);
  }
};

#include "sab_kernels.inc"

const sab_cpu::IsaOps kOps = {"avx2", V::L, &gemv_entry, &dequant_f32_entry, &dequant_bf16_entry};

}  // namespace

#pragma GCC pop_options

namespace sab_cpu {
const IsaOps* isa_avx2() { return &kOps; }
}  // namespace sab_cpu

#else  // not x86: the binding never selects this backend (cpu_has() is false)
#include "sab_cpu.h"
namespace sab_cpu {
const IsaOps* isa_avx2() { return nullptr; }
}  // namespace sab_cpu
#endif
