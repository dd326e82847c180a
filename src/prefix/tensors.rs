//! Reading and writing the F32 tensors of small safetensors files (prefixes and PEFT adapters).

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

use super::{PrefixError, Result};

/// A tensor as host floats, with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parses a safetensors buffer, mapping the crate's errors (truncation included) to one variant.
pub fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(bytes).map_err(|e| PrefixError::NotSafetensors(e.to_string()))
}

pub fn metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| PrefixError::NotSafetensors(e.to_string()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Reads one tensor as F32 (converting F16/BF16 exactly) and rejects NaN and infinities.
pub fn read_f32(st: &SafeTensors<'_>, name: &str) -> Result<HostTensor> {
    let view = st
        .tensor(name)
        .map_err(|_| PrefixError::MissingTensor(name.to_string()))?;
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(PrefixError::DType {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(PrefixError::NonFinite {
            name: name.to_string(),
            index,
            value,
        });
    }
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        data,
    })
}

pub fn expect_shape(name: &str, t: &HostTensor, expected: &[usize], why: &str) -> Result<()> {
    if t.shape != expected {
        return Err(PrefixError::Shape {
            name: name.to_string(),
            found: t.shape.clone(),
            expected: expected.to_vec(),
            why: why.to_string(),
        });
    }
    Ok(())
}

/// Serializes F32 tensors with header metadata. Keys are written in sorted order, so the same
/// tensors and metadata always give the same bytes.
pub fn serialize(
    tensors: &[(&str, &HostTensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.to_string(), bytes, t.shape.clone())
        })
        .collect();
    let views = raw
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PrefixError::NotSafetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| PrefixError::NotSafetensors(e.to_string()))
}
