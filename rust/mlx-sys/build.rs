//! Build script of the local `mlx-sys` (Linux x86_64, CPU), replacing the published crate of the same
//! name and version through `[patch.crates-io]`.
//!
//! 1. Finds the mlx-c sources of the original crate: `$MLX_C_SOURCE_DIR`, else
//!    `$CARGO_HOME/registry/src/*/mlx-sys-<version>/src/mlx-c`; if that is absent, runs `cargo fetch`
//!    on a two-line helper manifest (written to OUT_DIR) that depends on `mlx-sys =<version>`.
//! 2. Finds the MLX of the installed Python wheel (`mlx[cpu]`) with a Python interpreter:
//!    `$PARITY_PYTHON`, `$PYO3_PYTHON`, `$VIRTUAL_ENV/bin/python`, `<repo>/.venv/bin/python`, else
//!    `python3` on PATH.
//!    Refuses to build when the wheel's MLX version is not the one mlx-c's CMakeLists pins.
//! 3. Builds mlx-c (static, `MLX_C_USE_SYSTEM_MLX=ON`, examples off) with `native/CMakeLists.txt`,
//!    which adds `native/shim.cpp` (half-precision accessors, `mach_approximate_time`), in
//!    `<target>/<profile>/build/mlx-c-<MLX version>`, shared by every variant of this build script.
//! 4. Generates the bindings with bindgen (libclang), with `native/half_prelude.h` standing in for
//!    mlx-c's ARM-only `half.h`.
//! 5. Links `mlxc` (static), `mlx` (the wheel's shared library) and `stdc++`, and publishes
//!    `DEP_MLX_LIB_DIR`, `DEP_MLX_DEPS_DIR`, `DEP_MLX_VERSION` for direct dependents (rpaths).
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const NATIVE_ENV: &[&str] = &[
    "MLX_C_SOURCE_DIR",
    "PARITY_PYTHON",
    "PYO3_PYTHON",
    "VIRTUAL_ENV",
    "CARGO_HOME",
];

fn fail(msg: impl AsRef<str>) -> ! {
    // A panic in a build script prints the message and stops the build; say it plainly.
    eprintln!("\nmlx-sys (parity Linux build): {}\n", msg.as_ref());
    panic!("mlx-sys (parity Linux build): {}", msg.as_ref());
}

fn cargo_home() -> PathBuf {
    if let Some(h) = env::var_os("CARGO_HOME") {
        return PathBuf::from(h);
    }
    match env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cargo"),
        None => fail("neither CARGO_HOME nor HOME is set; cannot find the cargo registry"),
    }
}

fn find_in_registry(version: &str) -> Option<PathBuf> {
    let src = cargo_home().join("registry").join("src");
    let mut found: Vec<PathBuf> = fs::read_dir(&src)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(format!("mlx-sys-{version}")).join("src").join("mlx-c"))
        .filter(|p| p.join("CMakeLists.txt").is_file() && p.join("mlx/c/array.h").is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

fn fetch_original(version: &str, out_dir: &Path) {
    let helper = out_dir.join("fetch-mlx-sys");
    fs::create_dir_all(helper.join("src")).unwrap();
    // Its own [workspace] keeps it out of ours (and out of our [patch]).
    fs::write(
        helper.join("Cargo.toml"),
        format!(
            "[package]\nname = \"parity-fetch-mlx-sys\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\nmlx-sys = {{ version = \"={version}\", default-features = false }}\n\n\
             [workspace]\n"
        ),
    )
    .unwrap();
    fs::write(helper.join("src").join("lib.rs"), "").unwrap();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .arg("fetch")
        .arg("--manifest-path")
        .arg(helper.join("Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(format!(
            "`{cargo} fetch` of mlx-sys ={version} (for its mlx-c sources) failed with {s}; \
             run it yourself or set MLX_C_SOURCE_DIR to an mlx-c checkout"
        )),
        Err(e) => fail(format!("could not run `{cargo} fetch`: {e}")),
    }
}

fn mlx_c_source(version: &str, out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("MLX_C_SOURCE_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("CMakeLists.txt").is_file() {
            fail(format!("MLX_C_SOURCE_DIR={} has no CMakeLists.txt", dir.display()));
        }
        return dir;
    }
    if let Some(dir) = find_in_registry(version) {
        return dir;
    }
    fetch_original(version, out_dir);
    find_in_registry(version).unwrap_or_else(|| {
        fail(format!(
            "cargo fetch succeeded but no mlx-sys-{version}/src/mlx-c under {}",
            cargo_home().join("registry/src").display()
        ))
    })
}

/// The MLX version mlx-c's CMakeLists fetches (`GIT_TAG v0.32.2`).
fn pinned_mlx_version(mlx_c: &Path) -> String {
    let cmake = fs::read_to_string(mlx_c.join("CMakeLists.txt")).unwrap();
    cmake
        .lines()
        .find_map(|line| {
            let tag = line.trim().strip_prefix("GIT_TAG v")?;
            tag.split(|c: char| c == ')' || c.is_whitespace())
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| fail(format!("no `GIT_TAG v...` in {}/CMakeLists.txt", mlx_c.display())))
}

fn python() -> String {
    if let Ok(p) = env::var("PARITY_PYTHON") {
        return p;
    }
    if let Ok(p) = env::var("PYO3_PYTHON") {
        return p;
    }
    if let Some(venv) = env::var_os("VIRTUAL_ENV") {
        let p = PathBuf::from(venv).join("bin").join("python");
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    // The project's virtual environment (<repo>/.venv, two levels above this crate).
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let repo_venv = manifest.join("../../.venv/bin/python");
    if repo_venv.exists() {
        return repo_venv.to_string_lossy().into_owned();
    }
    "python3".into()
}

struct Wheel {
    version: String,
    /// `<site-packages>/mlx`: holds lib/libmlx.so, include/ and share/cmake/MLX.
    pkg_dir: PathBuf,
}

fn find_wheel(python: &str) -> Wheel {
    // `mlx` is a namespace package (mlx.__file__ is None): locate it through mlx.core.
    let script = "import os, mlx.core as mx; print(mx.__version__); print(os.path.dirname(mx.__file__))";
    let out = Command::new(python).args(["-c", script]).output().unwrap_or_else(|e| {
        fail(format!(
            "could not run the Python interpreter `{python}` ({e}); set PARITY_PYTHON to the \
             interpreter of the environment that has mlx[cpu] installed"
        ))
    });
    if !out.status.success() {
        fail(format!(
            "`{python}` cannot import mlx.core; install the wheel (pip install 'mlx[cpu]==<pinned>') \
             or set PARITY_PYTHON.\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim().to_owned();
    let pkg_dir = PathBuf::from(lines.next().unwrap_or_default().trim());
    for need in ["lib/libmlx.so", "share/cmake/MLX/MLXConfig.cmake", "include/mlx/mlx.h"] {
        if !pkg_dir.join(need).exists() {
            fail(format!(
                "the mlx package at {} has no {need}; it must be a Linux wheel that ships libmlx \
                 (pip install 'mlx[cpu]')",
                pkg_dir.display()
            ));
        }
    }
    Wheel { version, pkg_dir }
}

fn generate_bindings(mlx_c: &Path, out_dir: &Path, manifest: &Path) {
    let header_dir = mlx_c.join("mlx/c");
    let mut headers: Vec<PathBuf> = fs::read_dir(&header_dir)
        .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", header_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();
    let prelude = manifest.join("native/half_prelude.h");
    let builder = headers.iter().fold(
        bindgen::Builder::default()
            .rust_target("1.73.0".parse().expect("rust-version"))
            .clang_arg(format!("-I{}", mlx_c.display()))
            .clang_arg("-include")
            .clang_arg(prelude.to_string_lossy())
            .blocklist_function("malloc")
            .blocklist_function("realloc")
            // float16_t is a 16-bit pattern wrapped like bindgen wraps __fp16 on aarch64 (mlx-rs reads `.0`).
            .blocklist_type("float16_t")
            .raw_line(
                "#[repr(transparent)]\n#[derive(Debug, Default, Copy, Clone, Hash, PartialEq, Eq)]\n\
                 pub struct __BindgenFloat16(pub u16);\npub type float16_t = __BindgenFloat16;",
            )
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new())),
        |b, h| b.header(h.to_string_lossy()),
    );
    let bindings = builder.generate().unwrap_or_else(|e| {
        fail(format!(
            "bindgen failed on the mlx-c headers: {e} (is libclang installed? apt-get install libclang-dev)"
        ))
    });
    bindings
        .write_to_file(out_dir.join("bindings.rs"))
        .expect("write bindings.rs");
}

fn main() {
    for var in NATIVE_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=native");
    println!("cargo:rerun-if-changed=build.rs");

    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        fail("this mlx-sys replacement builds only on Linux; on macOS use the published mlx-sys");
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let version = env::var("CARGO_PKG_VERSION").unwrap();

    let mlx_c = mlx_c_source(&version, &out_dir);
    let pinned = pinned_mlx_version(&mlx_c);
    let python = python();
    let wheel = find_wheel(&python);
    if wheel.version != pinned {
        fail(format!(
            "MLX version mismatch: the installed Python wheel ({python} -> {}) is MLX {}, but mlx-c \
             of mlx-sys {version} pins MLX {pinned} (GIT_TAG in {}/CMakeLists.txt). mlx-c does not \
             compile against another MLX, and the Python reference and this extension must share one \
             libmlx. Install mlx[cpu]=={pinned}.",
            wheel.pkg_dir.display(),
            wheel.version,
            mlx_c.display()
        ));
    }
    println!(
        "cargo:rerun-if-changed={}",
        wheel.pkg_dir.join("lib/libmlx.so").display()
    );

    // mlx-c, static, always optimised (even in debug builds of the Rust side), in one CMake build folder per
    // profile and pinned MLX beside the build scripts' own: clippy runs this crate's build script as another
    // variant (a workspace member, compiled by clippy-driver) than maturin's and the binaries', and with an
    // OUT_DIR each, every variant compiled mlx-c again (75-95 s each on a fresh clone). CMake tracks what
    // changed; cargo runs one build at a time per target folder (its lock), so the folder is never shared by
    // two builds at once.
    let shared = out_dir
        .ancestors()
        .nth(2)
        .unwrap_or_else(|| {
            fail(format!(
                "OUT_DIR {} is not <target>/<profile>/build/<crate>/out",
                out_dir.display()
            ))
        })
        .join(format!("mlx-c-{pinned}"));
    let dst = cmake::Config::new(manifest.join("native"))
        .out_dir(&shared)
        .define("MLX_C_SOURCE_DIR", &mlx_c)
        .define("CMAKE_PREFIX_PATH", &wheel.pkg_dir)
        .define("MLX_C_USE_SYSTEM_MLX", "ON")
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("BUILD_SHARED_LIBS", "OFF")
        .define("CMAKE_POSITION_INDEPENDENT_CODE", "ON")
        .profile("Release")
        .build_target("parity_all")
        .build();
    let mlxc_dir = dst.join("build").join("mlx-c");
    if !mlxc_dir.join("libmlxc.a").is_file() {
        fail(format!(
            "cmake finished but {} is missing",
            mlxc_dir.join("libmlxc.a").display()
        ));
    }

    let lib_dir = wheel.pkg_dir.join("lib");
    // The wheel's libmlx needs its bundled BLAS/LAPACK (RPATH $ORIGIN/../../mlx_cpu.libs).
    let deps_dir = wheel.pkg_dir.parent().unwrap().join("mlx_cpu.libs");
    println!("cargo:rustc-link-search=native={}", mlxc_dir.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    // For dependents that link executables or cdylibs (rpath, rpath-link): DEP_MLX_*.
    println!("cargo:lib_dir={}", lib_dir.display());
    println!("cargo:deps_dir={}", deps_dir.display());
    println!("cargo:version={pinned}");
    println!("cargo:python={python}");

    generate_bindings(&mlx_c, &out_dir, &manifest);
}
