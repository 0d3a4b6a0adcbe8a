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
//   neg(v)                 -v (sign bit flipped, so -(+0) = -0)
//   kSignsOnActivations    whether the one-row decode flips the activations' signs with a
//                          mask-register blend instead of the weights' (see gemv_tile)
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

#include "avx512_backend.inc"

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
