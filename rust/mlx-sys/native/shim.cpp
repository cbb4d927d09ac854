// x86_64 gaps of mlx-c and mlx-rs on Linux.
//
// 1. mlx/c/half.h declares float16_t / bfloat16_t and the four accessors below only for ARM targets,
//    but mlx-rs calls them unconditionally. Here the types are carried as their 16-bit patterns
//    (uint16_t), which is how the Rust bindings see them (a transparent u16 wrapper and u16).
// 2. mlx-rs's RandomState::new seeds from mach_approximate_time(), a macOS call.
#include <cstdint>
#include <cstring>
#include <ctime>
#include <exception>

#include "mlx/c/array.h"
#include "mlx/c/error.h"
#include "mlx/c/private/mlx.h"

namespace {
template <typename T>
int item_bits(uint16_t* res, const mlx_array arr) {
  try {
    T v = mlx_array_get_(arr).item<T>();
    static_assert(sizeof(T) == sizeof(uint16_t), "16-bit type expected");
    std::memcpy(res, &v, sizeof(uint16_t));
  } catch (std::exception& e) {
    mlx_error(e.what());
    return 1;
  }
  return 0;
}

template <typename T>
const uint16_t* data_bits(const mlx_array arr) {
  try {
    return reinterpret_cast<const uint16_t*>(mlx_array_get_(arr).data<T>());
  } catch (std::exception& e) {
    mlx_error(e.what());
    return nullptr;
  }
}
} // namespace

extern "C" int mlx_array_item_float16(uint16_t* res, const mlx_array arr) {
  return item_bits<mlx::core::float16_t>(res, arr);
}

extern "C" int mlx_array_item_bfloat16(uint16_t* res, const mlx_array arr) {
  return item_bits<mlx::core::bfloat16_t>(res, arr);
}

extern "C" const uint16_t* mlx_array_data_float16(const mlx_array arr) {
  return data_bits<mlx::core::float16_t>(arr);
}

extern "C" const uint16_t* mlx_array_data_bfloat16(const mlx_array arr) {
  return data_bits<mlx::core::bfloat16_t>(arr);
}

// Monotonic nanoseconds, standing in for macOS's mach_approximate_time (only used as a time seed).
extern "C" uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}
