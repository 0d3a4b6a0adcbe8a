// Torch binding of the sab CPU kernels: argument checks, activation layout, threads, and the
// path the caller chose (kernels/cpu.py): the decode kernels (weights built in registers,
// never stored; float32, or bfloat16 dot products) or the prefill path (dequantized
// cache-sized tiles fed to torch's GEMM).
//
// Threads come from torch's intra-op pool (at::parallel_for), never a pool of our own, so
// torch.set_num_threads and vLLM's CPU thread binding apply. The instruction set is chosen
// at run time from the CPU's flags (the ISA files are compiled with target pragmas, not
// -march=native), so one build runs on every x86-64 host.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "sab_cpu.h"

namespace {

using sab_cpu::IsaOps;
using sab_cpu::LayerView;

bool cpu_has(const char* what) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const std::string w(what);
  if (w == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (w == "avx512_bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (w == "avx512_vnni") return cpu_has("avx512") && __builtin_cpu_supports("avx512vnni");
  if (w == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
  return false;
#else
  (void)what;
  return false;
#endif
}

// Whether the AVX-512 backend's bfloat16 dot-product decode runs here.
bool has_bf16_dot() {
  static const bool have = cpu_has("avx512_bf16") && sab_cpu::avx512bf16_gemv() != nullptr;
  return have;
}

// Whether the AVX-512 backend's int8-activation decode (VNNI) runs here.
bool has_int8_dot() {
  static const bool have = cpu_has("avx512_vnni") && sab_cpu::avx512vnni_int8() != nullptr;
  return have;
}

// Instruction sets this CPU can run, best first.
std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  if (cpu_has("avx512")) out.push_back("avx512");
  if (cpu_has("avx2")) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

const IsaOps* isa_ops(const std::string& isa) {
  const auto have = available_isas();
  const std::string want = isa.empty() ? have.front() : isa;
  TORCH_CHECK(std::find(have.begin(), have.end(), want) != have.end(), "sab_cpu: instruction set '",
              want, "' is not available on this CPU (available: ", c10::Join(", ", have), ")");
  if (want == "avx512") return sab_cpu::isa_avx512();
  if (want == "avx2") return sab_cpu::isa_avx2();
  return sab_cpu::isa_scalar();
}

void check_tensor(const c10::optional<torch::Tensor>& t, const char* name, c10::ScalarType dtype,
                  bool needed) {
  TORCH_CHECK(t.has_value() == needed, "sab_cpu.linear: '", name, "' is ",
              needed ? "required" : "not used", " by this profile");
  if (!needed) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->is_contiguous(),
              "sab_cpu.linear: '", name, "' must be a contiguous CPU ", c10::toString(dtype),
              " tensor, got ", t->toString(), t->is_contiguous() ? "" : " (not contiguous)");
}

// Checks the layer's tensors against its profile (dtype, device, layout; O(1), no value
// reads: values were validated once at load time) and views them for the kernels.
// col32 receives the float32 copy of the column scales the view points at, made only when
// `col32_needed` (the int8 decode reads the float16 ones: converting [T, K] on every call
// was most of a small layer's call time, ~8 us of 19 at 16 x 4096).
LayerView make_view(const torch::Tensor& packed, const c10::optional<torch::Tensor>& zone,
                    const c10::optional<torch::Tensor>& residual,
                    const c10::optional<torch::Tensor>& perm, const torch::Tensor& scale,
                    const c10::optional<torch::Tensor>& col_scale,
                    const c10::optional<torch::Tensor>& offset, int64_t block, int64_t zone_bits,
                    int64_t salient, bool salient_zoned, bool col_scaled, bool has_offset,
                    torch::Tensor& col32, bool col32_needed = true) {
  TORCH_CHECK(packed.dim() == 2, "sab_cpu.linear: weight_packed must be [N, K/32]");
  TORCH_CHECK(block > 0 && block % 32 == 0 && (packed.size(1) * 32) % block == 0,
              "sab_cpu.linear: block size ", block, " must be a multiple of 32 dividing K=",
              packed.size(1) * 32);
  TORCH_CHECK(zone_bits >= 0 && zone_bits <= 2 && salient >= 0 && salient <= block,
              "sab_cpu.linear: zone_bits must be 0..2 and salient 0..block size");
  check_tensor(packed, "weight_packed", torch::kInt, true);
  check_tensor(zone, "weight_zone", torch::kInt, zone_bits > 0);
  check_tensor(residual, "weight_residual", torch::kByte, salient > 0);
  check_tensor(perm, "weight_perm", torch::kShort, salient > 0 && salient < block);
  check_tensor(scale, "weight_scale", torch::kHalf, true);
  check_tensor(col_scale, "weight_col_scale", torch::kHalf, col_scaled);
  check_tensor(offset, "weight_offset", torch::kHalf, has_offset);
  LayerView L;
  L.n = packed.size(0);
  L.k = packed.size(1) * 32;
  L.block = block;
  L.zone_bits = static_cast<int>(zone_bits);
  L.salient = static_cast<int>(salient);
  L.salient_zoned = salient_zoned;
  L.has_col = col_scaled;
  L.has_off = has_offset;
  L.packed = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  L.zone = zone ? reinterpret_cast<const uint8_t*>(zone->data_ptr<int32_t>()) : nullptr;
  L.residual = residual ? residual->data_ptr<uint8_t>() : nullptr;
  L.scale = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  if (col_scaled) {
    L.col_scale_h = reinterpret_cast<const uint16_t*>(col_scale->data_ptr<at::Half>());
    if (col32_needed) {
      col32 = col_scale->to(torch::kFloat).contiguous();
      L.col_scale = col32.data_ptr<float>();
    }
  }
  L.offset = offset ? reinterpret_cast<const uint16_t*>(offset->data_ptr<at::Half>()) : nullptr;
  return L;
}

// x [M, K] -> its columns in stored order (idx[j] = B * (j / B) + perm[j]); the prefill
// path's (its cost is amortized over the many rows that take this path).
torch::Tensor to_stored_order(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm,
                              int64_t block) {
  if (!perm.has_value()) return x;
  const int64_t k = x.size(1);
  auto idx = torch::arange(k, torch::kInt64).div(block, "floor").mul_(block).add_(perm->to(torch::kInt64));
  return x.index_select(1, idx);
}

// The decode's activations: x [M, K] in stored column order as `dtype` (float32, or
// bfloat16 for the bfloat16 decode, whose x is already bfloat16: a copy), zero-padded to
// mt >= M rows (the kernel's register tile). One gather-and-convert pass where there is a
// permutation, instead of building an index tensor and running index_select + copy on every
// call (M <= 16 rows).
torch::Tensor decode_activations(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm,
                                 int64_t block, int64_t mt, c10::ScalarType dtype) {
  const int64_t m = x.size(0), k = x.size(1);
  auto xs = torch::zeros({mt, k}, dtype);
  const auto xc = x.contiguous();
  if (!perm.has_value() && xc.scalar_type() == dtype) {
    // A plain byte copy: Tensor::copy_ costs more than the sign decode's own work at M = 1.
    std::memcpy(xs.data_ptr(), xc.data_ptr(), static_cast<size_t>(m * k) * xc.element_size());
    return xs;
  }
  if (!perm.has_value()) {
    xs.narrow(0, 0, m).copy_(xc);
    return xs;
  }
  const int16_t* pp = perm->data_ptr<int16_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "sab_gather", [&] {
    using in_t = scalar_t;
    const in_t* in = xc.data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "sab_gather_out", [&] {
      scalar_t* out = xs.data_ptr<scalar_t>();
      // Block by block: a division per element made this gather most of a small layer's
      // call (perf: 15 % of a 16 x 4096 int8 decode call, the kernel itself 6 %).
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j0 = 0; j0 < k; j0 += block) {
          const in_t* ib = in + i * k + j0;
          scalar_t* ob = out + i * k + j0;
          const int16_t* pb = pp + j0;
          for (int64_t c = 0; c < block; ++c) ob[c] = static_cast<scalar_t>(ib[pb[c]]);
        }
    });
  });
  return xs;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const c10::optional<torch::Tensor>& zone,
                     const c10::optional<torch::Tensor>& residual,
                     const c10::optional<torch::Tensor>& perm, const torch::Tensor& scale,
                     const c10::optional<torch::Tensor>& col_scale,
                     const c10::optional<torch::Tensor>& offset, int64_t block, int64_t zone_bits,
                     int64_t salient, bool salient_zoned, bool col_scaled, bool has_offset,
                     const std::string& isa, int64_t path, int64_t tile_rows,
                     bool bf16_weights) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "sab_cpu.linear: x must be a 2-D CPU tensor, got ",
              x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == torch::kFloat || xt == torch::kBFloat16 || xt == torch::kHalf,
              "sab_cpu.linear: x must be float32, bfloat16 or float16, got ", c10::toString(xt));
  torch::Tensor col32;
  const LayerView L = make_view(packed, zone, residual, perm, scale, col_scale, offset, block,
                                zone_bits, salient, salient_zoned, col_scaled, has_offset, col32,
                                path != 3);
  const int64_t m = x.size(0), k = x.size(1), n = L.n;
  TORCH_CHECK(k == L.k, "sab_cpu.linear: x has K=", k, " input features, the layer has K=", L.k);
  const IsaOps* ops = isa_ops(isa);
  if (m == 0) return torch::empty({0, n}, x.options());

  // path: the caller's choice (kernels/cpu.py CpuKernelConfig.path): 0 prefill tiles,
  // 1 float32 decode, 2 bfloat16 dot-product decode (AVX512-BF16, bfloat16 activations),
  // 3 int8-activation decode (AVX512-VNNI).
  // bf16_weights (where the CPU multiplies bfloat16 natively): bfloat16 activations meet
  // W rounded to bfloat16, as a dense bfloat16 layer stores it, in the prefill tiles.
  TORCH_CHECK(path >= 0 && path <= 3, "sab_cpu.linear: path must be 0 (tiles), 1 (float32 decode), "
              "2 (bfloat16 decode) or 3 (int8 decode), got ", path);
  TORCH_CHECK(path == 0 || m <= sab_cpu::kMaxDecodeM, "sab_cpu.linear: the decode takes at most ",
              sab_cpu::kMaxDecodeM, " rows, got M=", m);
  const bool bf16 = bf16_weights && xt == torch::kBFloat16;
  if (path != 0) {
    const sab_cpu::Int8Decode* q8 = sab_cpu::avx512vnni_int8();
    TORCH_CHECK(path != 3 || (has_int8_dot() && std::string(ops->name) == "avx512" && q8->supports(L)),
                "sab_cpu.linear: the int8 decode needs the avx512 instruction set on a CPU with "
                "AVX512-VNNI and a profile without offsets whose block size is a multiple of 64 "
                "(not the sign profile)");
    TORCH_CHECK(path != 2 || (xt == torch::kBFloat16 && has_bf16_dot() &&
                              std::string(ops->name) == "avx512"),
                "sab_cpu.linear: the bfloat16 decode needs bfloat16 activations (got ",
                c10::toString(xt), ") and the avx512 instruction set on a CPU with AVX512-BF16");
    // The int8 decode quantizes exactly the m rows; the others read a zero-padded tile.
    const int64_t mt = path == 3 ? m : sab_cpu::decode_tile(m);
    const auto xs = decode_activations(x, perm, block, mt, path == 2 ? torch::kBFloat16 : torch::kFloat);
    auto y = torch::zeros({m, n}, torch::kFloat);  // the kernels add K panels into it
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(16, n / (4 * at::get_num_threads()));
    if (path == 3) {
      auto buf = torch::empty({q8->act_bytes(L, m)}, torch::kByte);
      uint8_t* bp = buf.data_ptr<uint8_t>();
      q8->quantize(L, xs.data_ptr<float>(), m, bp);
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) { q8->gemv(L, bp, m, yp, n, n0, n1); });
    } else if (path == 2) {
      const auto gemv = sab_cpu::avx512bf16_gemv();
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>());
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) { gemv(L, xp, m, yp, n, n0, n1); });
    } else {
      const float* xp = xs.data_ptr<float>();
      std::vector<float> xsum;
      if (sab_cpu::is_sign_profile(L)) {
        xsum.resize(static_cast<size_t>(mt * (k / block) * ops->lanes));
        sab_cpu::lane_block_sums(xp, mt, k, block, ops->lanes, xsum.data());
      }
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        ops->gemv(L, xp, xsum.data(), m, yp, n, n0, n1);
      });
    }
    return xt == torch::kFloat ? y : y.to(xt);
  }

  // Prefill: y^T[rows] = tile[rows, K] @ x_stored^T, one tile per task: bfloat16 tiles with
  // bf16 (above), otherwise every activation dtype meets exact float32 tiles.
  const auto ct = bf16 ? torch::kBFloat16 : torch::kFloat;
  auto xs = to_stored_order(x, perm, block).to(ct).contiguous();
  auto xsT = xs.t();
  auto yT = torch::empty({n, m}, torch::TensorOptions().dtype(ct));
  const int64_t rows = std::max<int64_t>(1, tile_rows);
  const int64_t tiles = (n + rows - 1) / rows;
  // torch's worker threads do not inherit the caller's inference mode; vLLM runs every
  // forward under torch.inference_mode, and writing (mm_out) into yT, an inference tensor,
  // from a thread outside that mode raises.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode mode(inference);
    auto tile = torch::empty({rows, k}, torch::TensorOptions().dtype(ct));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, n1 = std::min(n, n0 + rows);
      if (bf16) {
        ops->dequant_bf16(L, n0, n1, reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>()));
      } else {
        ops->dequant_f32(L, n0, n1, tile.data_ptr<float>());
      }
      auto out = yT.narrow(0, n0, n1 - n0);
      at::mm_out(out, tile.narrow(0, 0, n1 - n0), xsT);
    }
  });
  auto y = yT.t().contiguous();
  return y.scalar_type() == xt ? y : y.to(xt);
}

// W_stored rows (stored column order) as float32, for tests and debugging.
torch::Tensor dequantize_stored(const torch::Tensor& packed, const c10::optional<torch::Tensor>& zone,
                                const c10::optional<torch::Tensor>& residual,
                                const c10::optional<torch::Tensor>& perm, const torch::Tensor& scale,
                                const c10::optional<torch::Tensor>& col_scale,
                                const c10::optional<torch::Tensor>& offset, int64_t block,
                                int64_t zone_bits, int64_t salient, bool salient_zoned,
                                bool col_scaled, bool has_offset, const std::string& isa,
                                bool bf16) {
  // W_stored does not depend on the permutation (it is checked like linear()'s, not used).
  torch::Tensor col32;
  const LayerView L = make_view(packed, zone, residual, perm, scale, col_scale, offset, block,
                                zone_bits, salient, salient_zoned, col_scaled, has_offset, col32);
  const int64_t n = L.n, k = L.k;
  const IsaOps* ops = isa_ops(isa);
  if (bf16) {
    auto out = torch::empty({n, k}, torch::kBFloat16);
    ops->dequant_bf16(L, 0, n, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  auto out = torch::empty({n, k}, torch::kFloat);
  ops->dequant_f32(L, 0, n, out.data_ptr<float>());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sab format v1 CPU kernels (AVX-512 / AVX2 / scalar, chosen at run time)";
  m.def("available_isas", &available_isas, "Instruction sets this CPU runs, best first.");
  m.def("has_bf16_dot", &has_bf16_dot, "Whether the bfloat16 dot-product decode runs on this CPU.");
  m.def("has_int8_dot", &has_int8_dot, "Whether the int8-activation (VNNI) decode runs on this CPU.");
  m.def("linear", &linear, "y = x W_hat^T for one sab layer (format v1).");
  m.def("dequantize_stored", &dequantize_stored, "W_stored [N, K] (stored column order).");
}
