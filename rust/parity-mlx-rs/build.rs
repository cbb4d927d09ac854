//! Run-time search path of libmlx.so for the extension and the test binaries.
//!
//! - `$ORIGIN/../mlx/lib`: the extension installed as `<site-packages>/parity_mlx_rs/*.so` finds the
//!   wheel's `<site-packages>/mlx/lib/libmlx.so` (maturin develop / pip install of the wheel).
//! - the absolute wheel directory found at build time: test binaries under target/, and a fallback.
//! - `-rpath-link` to the wheel's bundled BLAS/LAPACK, so executables (tests) link.
//!
//! In the harness `mlx.core` is imported first anyway, which loads the same libmlx.so (soname libmlx.so).
use std::env;

fn main() {
    let lib_dir = env::var("DEP_MLX_LIB_DIR").expect("mlx-sys publishes DEP_MLX_LIB_DIR");
    let deps_dir = env::var("DEP_MLX_DEPS_DIR").expect("mlx-sys publishes DEP_MLX_DEPS_DIR");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../mlx/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath-link,{deps_dir}");
    println!(
        "cargo:rustc-env=PARITY_MLX_VERSION={}",
        env::var("DEP_MLX_VERSION").unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIB_DIR");
}
