/* Included before every mlx-c header when bindgen runs (x86_64 Linux).
 * Replaces mlx/c/half.h: declares the half types as 16-bit patterns and enables the accessors that
 * mlx-rs uses; native/shim.cpp defines those accessors. bindgen's output maps float16_t to a
 * transparent u16 wrapper (like bindgen does for __fp16 on aarch64) and bfloat16_t to u16. */
#ifndef MLX_HALF_H
#define MLX_HALF_H
#include <stdint.h>
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef uint16_t float16_t;
typedef uint16_t bfloat16_t;
#endif
