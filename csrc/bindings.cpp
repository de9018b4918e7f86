// The one pybind11 module, qwen3_fast._C: one m.def per launcher. No torch here; Python
// passes data_ptr() integers, sizes and dtype codes (qwen3_fast/ops/_kernel_args.py).
// C++ std::invalid_argument surfaces as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/kernels.h"
#include "cpu/zero_slabs.h"
#ifdef QWEN3_FAST_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace py = pybind11;
using py::arg;

namespace {

py::dict build_info() {
  py::dict info;
  py::list features;
#ifdef __AVX2__
  features.append("avx2");
#endif
#ifdef __FMA__
  features.append("fma");
#endif
#ifdef __F16C__
  features.append("f16c");
#endif
#ifdef __AVX512F__
  features.append("avx512f");
#endif
#ifdef __AVX512BF16__
  features.append("avx512bf16");
#endif
#ifdef __AVX512FP16__
  features.append("avx512fp16");
#endif
#ifdef __ARM_NEON
  features.append("neon");
#endif
  info["cpu_features"] = features;
  info["openmp"] = true;
  info["compiler"] = QWEN3_FAST_BUILD_CXX;
#ifdef QWEN3_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = QWEN3_FAST_BUILD_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = "";
#endif
  info["cuda_archs"] = QWEN3_FAST_BUILD_CUDA_ARCHS;
#ifdef QWEN3_FAST_WITH_CUTLASS
  info["cutlass_in_build"] = true;
#else
  info["cutlass_in_build"] = false;
#endif
  info["cutlass_version"] = QWEN3_FAST_BUILD_CUTLASS_VERSION;
  info["cutlass_source"] = QWEN3_FAST_BUILD_CUTLASS_SOURCE;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qwen3_fast kernels (CPU always, CUDA when built with a toolkit)";
  m.def("build_info", &build_info, "What this extension was built with.");
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  namespace c = qwen3_fast::cpu;
  m.def("rms_norm_forward_cpu", &c::rms_norm_forward, arg("x"), arg("x_stride"), arg("weight"),
        arg("y"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"), arg("x_dtype"),
        arg("w_dtype"), arg("num_threads"), nogil);
  m.def("rms_norm_backward_cpu", &c::rms_norm_backward, arg("dy"), arg("x"), arg("x_stride"),
        arg("weight"), arg("rstd"), arg("d_residual"), arg("dx"), arg("dw"), arg("rows"),
        arg("cols"), arg("x_dtype"), arg("w_dtype"), arg("num_threads"), nogil);
  m.def("add_rms_norm_forward_cpu", &c::add_rms_norm_forward, arg("x"), arg("x_stride"),
        arg("residual"), arg("r_stride"), arg("weight"), arg("y"), arg("new_residual"),
        arg("rstd"), arg("rows"), arg("cols"), arg("eps"), arg("x_dtype"), arg("w_dtype"),
        arg("num_threads"), nogil);
  m.def("silu_and_mul_forward_cpu", &c::silu_and_mul_forward, arg("gate_up"), arg("stride"),
        arg("y"), arg("rows"), arg("inter"), arg("dtype"), arg("num_threads"), nogil);
  m.def("silu_and_mul_backward_cpu", &c::silu_and_mul_backward, arg("dy"), arg("gate_up"),
        arg("stride"), arg("d_gate_up"), arg("rows"), arg("inter"), arg("dtype"),
        arg("num_threads"), nogil);
  m.def("qk_norm_rope_forward_cpu", &c::qk_norm_rope_forward, arg("q"), arg("q_ts"),
        arg("q_hs"), arg("k"), arg("k_ts"), arg("k_hs"), arg("q_weight"), arg("k_weight"),
        arg("cos"), arg("sin"), arg("positions"), arg("pos_int64"), arg("q_out"), arg("qo_ts"),
        arg("qo_hs"), arg("k_out"), arg("ko_ts"), arg("ko_hs"), arg("q_rstd"), arg("k_rstd"),
        arg("tokens"), arg("hq"), arg("hkv"), arg("head_dim"), arg("max_pos"), arg("eps"),
        arg("x_dtype"), arg("w_dtype"), arg("num_threads"), nogil);
  m.def("qk_norm_rope_backward_cpu", &c::qk_norm_rope_backward, arg("dq_out"), arg("dk_out"),
        arg("q"), arg("q_ts"), arg("q_hs"), arg("k"), arg("k_ts"), arg("k_hs"), arg("q_weight"),
        arg("k_weight"), arg("cos"), arg("sin"), arg("positions"), arg("pos_int64"),
        arg("q_rstd"), arg("k_rstd"), arg("dq"), arg("dk"), arg("dq_weight"), arg("dk_weight"),
        arg("tokens"), arg("hq"), arg("hkv"), arg("head_dim"), arg("max_pos"), arg("x_dtype"),
        arg("w_dtype"), arg("num_threads"), nogil);

  m.def("kv_quantize_cpu", &c::kv_quantize, arg("x"), arg("u"), arg("l"), arg("mn"), arg("sc"),
        arg("outer"), arg("rows"), arg("cols"), arg("per_column"), arg("dtype"),
        arg("num_threads"), nogil);
  m.def("kv_dequantize_cpu", &c::kv_dequantize, arg("u"), arg("l"), arg("mn"), arg("sc"),
        arg("out"), arg("outer"), arg("rows"), arg("cols"), arg("per_column"), arg("bits"),
        arg("dtype"), arg("num_threads"), nogil);
  m.def("flash_decode_cpu", &c::flash_decode, arg("q"), arg("k_u"), arg("k_l"), arg("k_min"),
        arg("k_scale"), arg("v_u"), arg("v_l"), arg("v_min"), arg("v_scale"), arg("k_buf"),
        arg("v_buf"), arg("n_quant"), arg("lengths"), arg("out"), arg("batch"),
        arg("heads_q"), arg("heads_kv"), arg("n_new"), arg("head_dim"), arg("quant_tokens"),
        arg("ring"), arg("group"), arg("value_group"), arg("precision"), arg("scale"),
        arg("dtype"), arg("num_threads"), nogil);
  m.def("moe_sort_cpu", &c::moe_sort, arg("expert_ids"), arg("offsets"), arg("row_map"),
        arg("slots"), arg("num_experts"), arg("num_threads"), nogil);
  m.def("moe_permute_cpu", &c::moe_permute, arg("src"), arg("src_stride"), arg("row_map"),
        arg("scale"), arg("dst"), arg("tokens"), arg("top_k"), arg("rows"), arg("cols"),
        arg("dtype"), arg("num_threads"), nogil);
  m.def("moe_unpermute_cpu", &c::moe_unpermute, arg("src"), arg("row_map"), arg("weights"),
        arg("dst"), arg("tokens"), arg("top_k"), arg("rows"), arg("cols"), arg("dtype"),
        arg("num_threads"), nogil);
  m.def("moe_unpermute_backward_cpu", &c::moe_unpermute_backward, arg("dy"), arg("src"),
        arg("row_map"), arg("weights"), arg("d_src"), arg("d_weights"), arg("tokens"),
        arg("top_k"), arg("rows"), arg("cols"), arg("dtype"), arg("num_threads"), nogil);
  m.def("grouped_gemm_nt_bf16_available", &c::grouped_gemm_nt_bf16_available);
  m.def("grouped_gemm_nt_bf16_cpu", &c::grouped_gemm_nt_bf16, arg("a"), arg("b"),
        arg("offsets"), arg("c"), arg("m"), arg("n"), arg("k"), arg("groups"),
        arg("num_threads"), nogil);
  m.def("grouped_gemm_nn_bf16_cpu", &c::grouped_gemm_nn_bf16, arg("a"), arg("b"),
        arg("offsets"), arg("c"), arg("m"), arg("n"), arg("k"), arg("groups"),
        arg("num_threads"), nogil);
  m.def("grouped_wgrad_small_bf16_cpu", &c::grouped_wgrad_small_bf16, arg("p"), arg("q"),
        arg("offsets"), arg("out"), arg("m"), arg("np"), arg("nq"), arg("groups"),
        arg("num_threads"), nogil);
  m.def("linear_cpu", &c::linear_bf16, arg("x"), arg("weight"), arg("y"), arg("m"), arg("n"),
        arg("k"), arg("num_threads"), nogil);
  m.def("decode_layers_cpu", &c::decode_layers_bf16, arg("x"), arg("weights"), arg("cache"),
        arg("n_quant"), arg("lengths"), arg("cos"), arg("sin"), arg("final_norm"), arg("out"),
        arg("batch"), arg("n_new"), arg("layers"), arg("hidden"), arg("heads_q"),
        arg("heads_kv"), arg("head_dim"), arg("inter"), arg("ring"), arg("quant_tokens"), arg("group"),
        arg("value_group"), arg("precision"), arg("max_pos"), arg("eps"), arg("scale"),
        arg("threads"), arg("small_threads"), arg("uncapped_stream_bytes"), nogil);

  // Recycled zero pages for the MoE weight gradients (cpu/zero_slabs.cpp). A block exports
  // the buffer protocol; torch.frombuffer keeps it alive as long as the tensor's storage.
  py::class_<c::ZeroSlabBlock>(m, "ZeroSlabBlock", py::buffer_protocol(), py::module_local())
      .def_buffer([](c::ZeroSlabBlock& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {py::ssize_t{1}},
                               /*readonly=*/false);
      });
  m.def("zero_slabs_supported", &c::zero_slabs_supported);
  m.def("zero_slabs_page_size", &c::zero_slabs_page_size);
  m.def("zero_slabs_take", &c::zero_slabs_take, arg("nbytes"), arg("slab"), arg("written"));
  m.def("zero_slabs_stats", [] {
    const c::ZeroSlabStats s = c::zero_slabs_stats();
    py::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["cached_blocks"] = s.cached_blocks;
    d["cached_bytes"] = s.cached_bytes;
    d["cap_bytes"] = s.cap_bytes;
    return d;
  });
  m.def("zero_slabs_empty_cache", &c::zero_slabs_empty_cache);

#ifdef QWEN3_FAST_WITH_CUDA
  namespace g = qwen3_fast::cuda;
  m.def("rms_norm_forward_cuda", &g::rms_norm_forward, arg("x"), arg("x_stride"), arg("weight"),
        arg("y"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"), arg("x_dtype"),
        arg("w_dtype"), arg("stream"), nogil);
  m.def("rms_norm_backward_cuda", &g::rms_norm_backward, arg("dy"), arg("x"), arg("x_stride"),
        arg("weight"), arg("rstd"), arg("d_residual"), arg("dx"), arg("dw_partial"),
        arg("partial_rows"), arg("rows"), arg("cols"), arg("x_dtype"), arg("w_dtype"),
        arg("stream"), nogil);
  m.def("add_rms_norm_forward_cuda", &g::add_rms_norm_forward, arg("x"), arg("x_stride"),
        arg("residual"), arg("r_stride"), arg("weight"), arg("y"), arg("new_residual"),
        arg("rstd"), arg("rows"), arg("cols"), arg("eps"), arg("x_dtype"), arg("w_dtype"),
        arg("stream"), nogil);
  m.def("silu_and_mul_forward_cuda", &g::silu_and_mul_forward, arg("gate_up"), arg("stride"),
        arg("y"), arg("rows"), arg("inter"), arg("dtype"), arg("stream"), nogil);
  m.def("silu_and_mul_backward_cuda", &g::silu_and_mul_backward, arg("dy"), arg("gate_up"),
        arg("stride"), arg("d_gate_up"), arg("rows"), arg("inter"), arg("dtype"), arg("stream"),
        nogil);
  m.def("qk_norm_rope_forward_cuda", &g::qk_norm_rope_forward, arg("q"), arg("q_ts"),
        arg("q_hs"), arg("k"), arg("k_ts"), arg("k_hs"), arg("q_weight"), arg("k_weight"),
        arg("cos"), arg("sin"), arg("positions"), arg("pos_int64"), arg("q_out"), arg("qo_ts"),
        arg("qo_hs"), arg("k_out"), arg("ko_ts"), arg("ko_hs"), arg("q_rstd"), arg("k_rstd"),
        arg("tokens"), arg("hq"), arg("hkv"), arg("head_dim"), arg("max_pos"), arg("eps"),
        arg("x_dtype"), arg("w_dtype"), arg("stream"), nogil);
  m.def("qk_norm_rope_backward_cuda", &g::qk_norm_rope_backward, arg("dq_out"), arg("dk_out"),
        arg("q"), arg("q_ts"), arg("q_hs"), arg("k"), arg("k_ts"), arg("k_hs"), arg("q_weight"),
        arg("k_weight"), arg("cos"), arg("sin"), arg("positions"), arg("pos_int64"),
        arg("q_rstd"), arg("k_rstd"), arg("dq"), arg("dk"), arg("dq_weight_partial"),
        arg("dk_weight_partial"), arg("partial_rows"), arg("tokens"), arg("hq"), arg("hkv"),
        arg("head_dim"), arg("max_pos"), arg("x_dtype"), arg("w_dtype"), arg("stream"), nogil);
  m.def("kv_quantize_cuda", &g::kv_quantize, arg("x"), arg("u"), arg("l"), arg("mn"), arg("sc"),
        arg("outer"), arg("rows"), arg("cols"), arg("per_column"), arg("dtype"), arg("stream"),
        nogil);
  m.def("flash_decode_cuda", &g::flash_decode, arg("q"), arg("k_u"), arg("k_l"), arg("k_min"),
        arg("k_scale"), arg("v_u"), arg("v_l"), arg("v_min"), arg("v_scale"), arg("k_buf"),
        arg("v_buf"), arg("n_quant"), arg("lengths"), arg("out"), arg("o_part"),
        arg("lse_part"), arg("batch"), arg("heads_q"), arg("heads_kv"), arg("n_new"),
        arg("head_dim"), arg("quant_tokens"), arg("ring"), arg("group"), arg("value_group"),
        arg("chunk"), arg("splits"), arg("precision"), arg("scale"), arg("dtype"),
        arg("stream"), nogil);
  m.def("moe_sort_cuda", &g::moe_sort, arg("expert_ids"), arg("offsets"), arg("row_map"),
        arg("workspace"), arg("workspace_elems"), arg("slots"), arg("num_experts"),
        arg("stream"), nogil);
  m.def("moe_permute_cuda", &g::moe_permute, arg("src"), arg("src_stride"), arg("row_map"),
        arg("scale"), arg("dst"), arg("tokens"), arg("top_k"), arg("rows"), arg("cols"),
        arg("dtype"), arg("stream"), nogil);
  m.def("moe_unpermute_cuda", &g::moe_unpermute, arg("src"), arg("row_map"), arg("weights"),
        arg("dst"), arg("tokens"), arg("top_k"), arg("rows"), arg("cols"), arg("dtype"),
        arg("stream"), nogil);
  m.def("moe_unpermute_backward_cuda", &g::moe_unpermute_backward, arg("dy"), arg("src"),
        arg("row_map"), arg("weights"), arg("d_src"), arg("d_weights"), arg("tokens"),
        arg("top_k"), arg("rows"), arg("cols"), arg("dtype"), arg("stream"), nogil);
  m.def("grouped_gemm_cuda", &g::grouped_gemm, arg("a"), arg("b"), arg("offsets"), arg("c"),
        arg("m"), arg("n"), arg("k"), arg("groups"), arg("trans_b"), arg("dtype"),
        arg("stream"), nogil);
  m.def("grouped_gemm_wgrad_cuda", &g::grouped_gemm_wgrad, arg("x"), arg("y"), arg("offsets"),
        arg("out"), arg("m"), arg("p"), arg("q"), arg("groups"), arg("dtype"), arg("stream"),
        nogil);
  m.def("grouped_gemm_sm90_available", &g::grouped_gemm_sm90_available);
  m.def("grouped_gemm_sm90_workspace_size", &g::grouped_gemm_sm90_workspace_size, arg("groups"));
  m.def("grouped_gemm_sm90_cuda", &g::grouped_gemm_sm90, arg("a"), arg("b"), arg("offsets"),
        arg("c"), arg("workspace"), arg("workspace_size"), arg("m"), arg("n"), arg("k"),
        arg("groups"), arg("trans_b"), arg("dtype"), arg("stream"), nogil);
  m.def("grouped_gemm_sm90_wgrad_cuda", &g::grouped_gemm_sm90_wgrad, arg("x"), arg("y"),
        arg("offsets"), arg("out"), arg("workspace"), arg("workspace_size"), arg("m"), arg("p"),
        arg("q"), arg("groups"), arg("dtype"), arg("stream"), nogil);
#endif
}
