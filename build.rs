//! With `--features cuda`: compiles `src/model/fused/kernels.cu` to PTX with nvcc, so a kernel that
//! does not compile fails the build (and CI), not the first request on a GPU. Without the feature
//! this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/model/fused/kernels.cu";
    println!("cargo::rerun-if-changed={src}");
    // The files kernels.cu includes.
    println!("cargo::rerun-if-changed=src/model/fused/kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("prefixd_kernels.ptx");
    // The same target as candle's own kernels (scripts/install-cuda sets 90: Hopper).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let mut nvcc = Command::new("nvcc");
    nvcc.args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(src);
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Ok(root) = std::env::var(var) {
            nvcc.arg(format!("-I{root}/include"));
            break;
        }
    }
    let status = nvcc.status().unwrap_or_else(|e| {
        panic!("running nvcc failed ({e}); for a CUDA build run scripts/install-cuda and `source .cuda/env`")
    });
    assert!(status.success(), "nvcc could not compile {src}");
}
