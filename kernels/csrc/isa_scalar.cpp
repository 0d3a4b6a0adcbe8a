// Portable scalar backend (one lane) of the sab CPU kernels: any x86-64 or other CPU.
// Slow, but the same kernel code as the vector paths, so it is also their test twin.
// See isa_avx512.cpp for the backend interface.
#include <cstdint>
#include <type_traits>
#include <cstring>

#include "sab_cpu.h"

namespace {

struct V {
  static constexpr int L = 1;
  static constexpr bool kMaskedAddIsOneOp = true;
  static constexpr bool kSignsOnActivations = false;
  using F = float;
  using M = bool;
  static F zero() { return 0.0f; }
  static F set1(float f) { return f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static void store_bf16(uint16_t* p, F v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    *p = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F neg(F a) { return -a; }
  static F mul(F a, F b) { return a * b; }
  // The baseline x86-64 ISA has no FMA instruction, so this is a rounded multiply, then add.
  static F fma(F a, F b, F c) { return a * b + c; }
  static float hsum(F v) { return v; }
  static M mask(uint32_t bits) { return (bits & 1u) != 0; }
  static M mask_at(const uint8_t* row, int64_t j) { return ((row[j >> 3] >> (j & 7)) & 1u) != 0; }
  using S = M;  // sign planes as lane masks (see isa_avx512.cpp)
  static S sign_bits(uint32_t bits) { return mask(bits); }
  static S sign_at(const uint8_t* row, int64_t j) { return mask_at(row, j); }
  static F blend(M m, F a, F b) { return m ? b : a; }
  static F apply_sign(S s, F a) { return s ? a : -a; }
  static F add_masked(M m, F acc, F v) { return m ? acc + v : acc; }
  static float h2f(uint16_t h) {
    // IEEE binary16 -> binary32, subnormals included.
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
      if (man == 0) {
        bits = sign;
      } else {
        exp = 127 - 15 + 1;
        while (!(man & 0x400u)) {
          man <<= 1;
          --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
      }
    } else if (exp == 0x1F) {
      bits = sign | 0x7F800000u | (man << 13);
    } else {
      bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static void load_halves(const uint16_t* p, int n, float* out, const uint16_t*) {
    for (int i = 0; i < n; ++i) out[i] = h2f(p[i]);
  }
};

#include "sab_kernels.inc"

const sab_cpu::IsaOps kOps = {"scalar", V::L, &gemv_entry, &dequant_f32_entry, &dequant_bf16_entry};

}  // namespace

namespace sab_cpu {
const IsaOps* isa_scalar() { return &kOps; }
}  // namespace sab_cpu
