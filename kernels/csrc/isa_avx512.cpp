// AVX-512 backend (16 float lanes, mask registers) of the sab CPU kernels.
//
// Backend interface that sab_kernels.inc expects from `struct V`:
//   L                      lanes;  F: float vector;  M: lane mask, used only through
//                          blend, add_masked and apply_sign (so AVX2 keeps just its sign bit)
//   zero(), set1(f), load(p), store(p, v), store_bf16(p, v)   (bf16: round to nearest even)
//   add, sub, mul, fma(a, b, c) = a * b + c, hsum(v)
//   mask(bits)             lane i set iff bit i of bits
//   mask_at(row, j)        mask of the L bits of bit-plane row `row` (LSB first, bytes) at
//                          bit j (a multiple of L)
//   blend(m, a, b)         m ? b : a
//   S, sign_at(row, j), sign_bits(bits), apply_sign(S, a): the sign plane's bits in the form
//                          that flips a's signs cheapest (a per-lane sign mask here, a lane
//                          mask in AVX2 and scalar); apply_sign(s, a) = bit ? a : -a
//                          (a sign bit of 0 means -1)
//   add_masked(m, acc, v)  acc + (m ? v : 0); kMaskedAddIsOneOp: whether that is one instruction
//                          (AVX-512 masked add), else (AVX2: blend + add) the sign decode
//                          multiplies +-1 vectors with FMAs when it has several activation rows
//   h2f(h)                 float16 bits -> float
//   load_halves(p, n, out, end)  out[i] = h2f(p[i]) for i < n; may read p[n..] below `end`
//                          (so out must hold n rounded up to 8 floats)
// Only <immintrin.h> and the plain interface header are included, before the target
// pragma, so no inline function from elsewhere is compiled for AVX-512.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "sab_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace {

struct V {
  static constexpr int L = 16;
  static constexpr bool kMaskedAddIsOneOp = true;
  using F = __m512;
  using M = __mmask16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float f) { return _mm512_set1_ps(f); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_bf16(uint16_t* p, F v) {
    // Round to nearest even on the bit pattern (weights are finite: validated at load).
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static M mask(uint32_t bits) { return static_cast<M>(bits & 0xFFFFu); }
  // Straight from memory into a mask register (kmovw k, m16): no trip through a GPR.
  static M mask_at(const uint8_t* row, int64_t j) {
    return _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(row + (j >> 3))));
  }
  static F blend(M m, F a, F b) { return _mm512_mask_blend_ps(m, a, b); }
  static F add_masked(M m, F acc, F v) { return _mm512_mask_add_ps(acc, m, acc, v); }
  // Sign planes stay in vector registers: lane i's bit is shifted up to bit 31 and XOR-ed
  // into the weight's sign (one ternary-logic op). Through mask registers it took a kmov and a
  // knot per 16 weights, and the mask-register ops were measured to bound the bitmap decode
  // (3 mask ops per 16 weights; the sign profile with 1 ran 3x faster per weight).
  using S = __m512i;
  static S sign_bits(uint32_t bits) {
    const __m512i up = _mm512_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16);
    return _mm512_sllv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), up);
  }
  static S sign_at(const uint8_t* row, int64_t j) {
    uint16_t w;
    __builtin_memcpy(&w, row + (j >> 3), 2);
    return sign_bits(w);
  }
  static F apply_sign(S s, F a) {
    // a ^ (~s & 0x80000000): flips a where the lane's bit (now bit 31 of s) is 0.
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(a), s,
                                                         _mm512_set1_epi32(int(0x80000000u)), 0xD2));
  }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  // Eight at a time with one plain load where eight halves exist before `end` (a masked
  // 16-bit load was measured to stall on this AMD core), one at a time at the very end.
  static void load_halves(const uint16_t* p, int n, float* out, const uint16_t* end) {
    int i = 0;
    for (; i < n && p + i + 8 <= end; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
    }
    for (; i < n; ++i) out[i] = _cvtsh_ss(p[i]);
  }
};

#include "sab_kernels.inc"

const sab_cpu::IsaOps kOps = {"avx512", V::L, &gemv_entry, &dequant_f32_entry, &dequant_bf16_entry};

}  // namespace

#pragma GCC pop_options

namespace sab_cpu {
const IsaOps* isa_avx512() { return &kOps; }
}  // namespace sab_cpu

#else  // not x86: the binding never selects this backend (cpu_has() is false)
#include "sab_cpu.h"
namespace sab_cpu {
const IsaOps* isa_avx512() { return nullptr; }
}  // namespace sab_cpu
#endif
