// Plain-C++ interface between the torch binding (sab_cpu.cpp) and the per-ISA kernels
// (isa_*.cpp). The ISA translation units are compiled with `#pragma GCC target` for their
// instruction set and must not include any torch header: an inline torch function compiled
// there with AVX-512 could be picked by the linker for generic code and die with SIGILL on
// an AVX2 host. So everything crossing this boundary is raw pointers and integers.
#pragma once
#include <cstdint>

namespace sab_cpu {

// One quantized linear in format v1 (docs/format.md), columns in stored order.
struct LayerView {
  int64_t n = 0, k = 0, block = 0;  // N outputs, K inputs, block size B
  int zone_bits = 0, salient = 0;
  bool salient_zoned = false, has_col = false, has_off = false;
  const uint8_t* packed = nullptr;    // sign plane 0: int32 [N, K/32] read as LE bytes [N, K/8]
  const uint8_t* zone = nullptr;      // zone planes: int32 [N, zone_bits, K/32] as bytes
  const uint8_t* residual = nullptr;  // uint8 [N, K/B, ceil(s/8)]
  const uint16_t* scale = nullptr;    // float16 bits [N, K/B, T]
  const float* col_scale = nullptr;   // float32 [T, K] (the binding converts the fp16 tensor;
                                      // nullptr on the int8 decode, which reads col_scale_h)
  const uint16_t* col_scale_h = nullptr;  // float16 bits [T, K]
  const uint16_t* offset = nullptr;   // float16 bits [N, K/B, Z]
};

// Kernels of one instruction set. Row ranges [n0, n1) let the caller split N over threads.
struct IsaOps {
  const char* name;
  int lanes;
  // y[m * ldy + n] += sum_j x[m * K + j] * W_stored[n, j] for m < M, n in [n0, n1) (y zeroed
  // by the caller).
  // x: float32 [mt, K] in stored column order, mt = decode_tile(M) rows (rows >= M are
  // zero padding the kernel may read). M <= kMaxDecodeM. xsum: lane_block_sums(x) for the
  // sign profile (is_sign_profile), unused otherwise.
  void (*gemv)(const LayerView& L, const float* x, const float* xsum, int64_t m, float* y,
               int64_t ldy, int64_t n0, int64_t n1);
  // out[(n - n0) * K + j] = W_stored[n, j] (float32 / bfloat16 bits, round to nearest even).
  void (*dequant_f32)(const LayerView& L, int64_t n0, int64_t n1, float* out);
  void (*dequant_bf16)(const LayerView& L, int64_t n0, int64_t n1, uint16_t* out);
};

constexpr int64_t kMaxDecodeM = 16;

// Rows of x the decode kernel reads for M activations (its register tile).
inline int64_t decode_tile(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

// The sign profile (one zone, no salient columns, no column scales, no offset) has a
// decode loop of its own that needs the lane-wise block sums of x.
inline bool is_sign_profile(const LayerView& L) {
  return L.zone_bits == 0 && L.salient == 0 && !L.has_col && !L.has_off;
}

// out[(i * nb + b) * lanes + l] = sum_c x[i * K + b * B + c * lanes + l], for i < mt.
inline void lane_block_sums(const float* x, int64_t mt, int64_t k, int64_t block, int lanes,
                            float* out) {
  const int64_t nb = k / block;
  for (int64_t i = 0; i < mt; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      float* o = out + (i * nb + b) * lanes;
      for (int l = 0; l < lanes; ++l) o[l] = 0.0f;
      for (int64_t c = 0; c < block; c += lanes) {
        const float* xi = x + i * k + b * block + c;
        for (int l = 0; l < lanes; ++l) o[l] += xi[l];
      }
    }
  }
}

// Decode with bfloat16 weights and activations (AVX512-BF16, isa_avx512bf16.cpp):
// y[m * ldy + n] += sum_j x[m * K + j] * bf16(W_stored[n, j]) (round to nearest even; the
// sign profile's +-1 weights are exact), float32 accumulation. x: bfloat16 bits [mt, K] in
// stored column order, mt = decode_tile(M), rows >= M zero. M <= kMaxDecodeM.
using GemvBf16 = void (*)(const LayerView& L, const uint16_t* x, int64_t m, float* y, int64_t ldy,
                          int64_t n0, int64_t n1);
GemvBf16 avx512bf16_gemv();  // nullptr where not compiled (not x86)

// Decode with int8 activations (AVX512-VNNI, isa_avx512vnni.cpp; sab_kernels_int8.inc):
// the activations are quantized once per call per (row, block, scale slot), absmax / 127,
// and the kernel sums +-q exactly in int32. Profiles without offsets, block % 64 == 0.
struct Int8Decode {
  bool (*supports)(const LayerView& L);
  // Bytes of the quantized activations of m rows.
  int64_t (*act_bytes)(const LayerView& L, int64_t m);
  // x: float32 [m, K] in stored column order -> buf (act_bytes(L, m) bytes).
  void (*quantize)(const LayerView& L, const float* x, int64_t m, uint8_t* buf);
  // y[i * ldy + n] += sum_j xq[i, j] W_stored[n, j] for i < m, n in [n0, n1) (y zeroed).
  void (*gemv)(const LayerView& L, const uint8_t* buf, int64_t m, float* y, int64_t ldy,
               int64_t n0, int64_t n1);
};
const Int8Decode* avx512vnni_int8();  // nullptr where not compiled (not x86)

const IsaOps* isa_avx512();
const IsaOps* isa_avx2();
const IsaOps* isa_scalar();

}  // namespace sab_cpu
