// Shared by the CPU and CUDA launchers: dtype codes and argument checks.
// Free of torch: kernels see raw pointers, sizes and these codes (DESIGN.md, "Binding").
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace qwen3_fast {

// Must match qwen3_fast/ops/_kernel_args.py DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    default: return "unknown";
  }
}

inline DType check_dtype(int code, const char* arg) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(arg) + ": dtype code " + std::to_string(code) +
                                " is not one of 0 (float32), 1 (float16), 2 (bfloat16)");
  }
  return static_cast<DType>(code);
}

// Launchers re-check what Python already checked: a bad call from another binding must
// raise, never read out of bounds.
inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void check_ptr(std::uintptr_t p, const char* arg) {
  check_arg(p != 0, std::string(arg) + ": null pointer");
}

}  // namespace qwen3_fast
