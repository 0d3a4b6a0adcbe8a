// AVX-512 + AVX512-VNNI decode with int8 activations (vpdpbusd; sab_kernels_int8.inc).
//
// A translation unit of its own, as isa_avx512bf16.cpp: AVX-512 CPUs without VNNI exist
// (Skylake-SP), and code compiled here may only run where the binding checked the flag
// (cpu_has("avx512_vnni")). Only the int8 decode is exported.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "sab_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

namespace {

#include "avx512_backend.inc"

#include "sab_kernels.inc"

#include "sab_kernels_int8.inc"

const sab_cpu::Int8Decode kInt8 = {&int8_supports, &int8_act_bytes, &quantize_rows, &int8_gemv_entry};

}  // namespace

#pragma GCC pop_options

namespace sab_cpu {
const Int8Decode* avx512vnni_int8() { return &kInt8; }
}  // namespace sab_cpu

#else  // not x86: the binding never selects this kernel (cpu_has() is false)
#include "sab_cpu.h"
namespace sab_cpu {
const Int8Decode* avx512vnni_int8() { return nullptr; }
}  // namespace sab_cpu
#endif
