// AVX-512 + AVX512-BF16 decode of the sab CPU kernels (vdpbf16ps; sab_kernels_bf16.inc).
//
// A translation unit of its own: AVX-512 CPUs without BF16 (Skylake-SP, Ice Lake) exist, and
// code compiled here may only run where the binding checked the flag (cpu_has("avx512_bf16")).
// Only the bfloat16 decode is exported; every other kernel comes from isa_avx512.cpp.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "sab_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace {

#include "avx512_backend.inc"

#include "sab_kernels.inc"

#include "sab_kernels_bf16.inc"

}  // namespace

#pragma GCC pop_options

namespace sab_cpu {
GemvBf16 avx512bf16_gemv() { return &gemv_bf16_entry; }
}  // namespace sab_cpu

#else  // not x86: the binding never selects this kernel (cpu_has() is false)
#include "sab_cpu.h"
namespace sab_cpu {
GemvBf16 avx512bf16_gemv() { return nullptr; }
}  // namespace sab_cpu
#endif
