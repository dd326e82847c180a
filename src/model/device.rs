//! Choosing where the model runs and in what precision: `--device cpu|cuda[:N]|auto` and
//! `--dtype f32|bf16|f16`.
//!
//! Asking for something this build or this machine cannot do is an error that says what to do,
//! never a panic deep inside candle.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use super::ModelError;

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The GPU when this binary has CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("bad GPU ordinal in {s:?}: expected cuda:N")),
                None => Err(format!(
                    "unknown device {s:?}: expected cpu, cuda, cuda:N or auto"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// True when this binary was built with `--features cuda`.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Opens the device. `Auto` never fails: it falls back to the CPU.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => {
                if !CUDA_BUILT {
                    return Err(ModelError::Device(format!(
                        "--device {self} asked for a GPU, but this prefixd was built without CUDA \
                         support: rebuild with `scripts/build-cuda` (cargo build --features cuda), \
                         or use --device cpu"
                    )));
                }
                open_cuda(n).map_err(|e| {
                    ModelError::Device(format!(
                        "--device {self}: no usable CUDA GPU {n} ({e}); check nvidia-smi and the \
                         driver, or use --device cpu"
                    ))
                })
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device, String> {
    // cudarc panics rather than returning an error when libcuda.so.1 cannot be loaded at all;
    // catching it keeps "no driver" an ordinary error.
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(d)) => Ok(d),
        // candle appends a backtrace when RUST_BACKTRACE is set: keep the first line.
        Ok(Err(e)) => Err(e.to_string().lines().next().unwrap_or("").to_string()),
        Err(_) => Err("the CUDA driver library could not be loaded".into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize) -> Result<Device, String> {
    Err("built without CUDA".into())
}

/// The precision the encoder computes in. Heads, scores and the pooled vector stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            other => Err(format!(
                "unknown dtype {other:?}: expected f32, bf16 or f16"
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// A short human description of a device, for logs and `/info`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `cpu` or `cuda:N`, as `--device` spells it.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("int8".parse::<Precision>().is_err());
    }

    #[test]
    fn cuda_without_the_feature_or_a_gpu_is_a_clear_error() {
        // On a CPU-only machine (CI) both builds must refuse, with words, not a panic.
        if open_cuda(0).is_ok() {
            return; // a real GPU: nothing to refuse
        }
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
        assert!(matches!(DeviceSpec::Auto.open(), Ok(Device::Cpu)));
    }
}
