//! Named tensors and the safetensors files the harness and a port exchange.
//!
//! The protocol uses four dtypes: float32 (every computed float), float64 (only a truth the harness
//! computes), int32 (token ids, targets) and int64 (the optimizer's step counter). Little-endian, as
//! safetensors requires, whatever the machine.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// A named tensor's shape and values, row-major (C order).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Tensors by name, in name order (the order they are written in).
pub type Tensors = BTreeMap<String, Tensor>;

impl Tensor {
    fn checked(shape: Vec<usize>, data: Data, len: usize) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != len {
            return Err(Error::failed(format!(
                "a tensor of shape {shape:?} needs {n} values, got {len}"
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        let len = values.len();
        Self::checked(shape, Data::F32(values), len)
    }

    pub fn i32(shape: Vec<usize>, values: Vec<i32>) -> Result<Self> {
        let len = values.len();
        Self::checked(shape, Data::I32(values), len)
    }

    pub fn i64(shape: Vec<usize>, values: Vec<i64>) -> Result<Self> {
        let len = values.len();
        Self::checked(shape, Data::I64(values), len)
    }

    /// A 0-d float32 (losses).
    pub fn scalar(x: f32) -> Self {
        Tensor {
            shape: vec![],
            data: Data::F32(vec![x]),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as float32 (ints and float64 converted), for a port that computes in float32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as int32 (token ids); floats are refused rather than truncated.
    pub fn to_i32(&self) -> Result<Vec<i32>> {
        match &self.data {
            Data::I32(v) => Ok(v.clone()),
            Data::I64(v) => v.iter().map(|&x| i32::try_from(x).map_err(Error::failed)).collect(),
            _ => Err(Error::failed("expected an integer tensor")),
        }
    }

    /// `self − other`, elementwise, as float32: a parameter's change over some updates.
    pub fn minus(&self, other: &Tensor) -> Result<Tensor> {
        if self.shape != other.shape {
            return Err(Error::failed(format!(
                "shapes differ: {:?} and {:?}",
                self.shape, other.shape
            )));
        }
        let (a, b) = (self.to_f32(), other.to_f32());
        Tensor::f32(self.shape.clone(), a.iter().zip(&b).map(|(x, y)| x - y).collect())
    }

    fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::F64(_) => Dtype::F64,
            Data::I32(_) => Dtype::I32,
            Data::I64(_) => Dtype::I64,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

fn from_le<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// Every tensor of a safetensors file (float32, float64, int32, int64; other dtypes are refused by name).
pub fn read_tensors(path: &Path) -> Result<Tensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
    let mut out = Tensors::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => Data::F32(from_le(raw, f32::from_le_bytes)),
            Dtype::F64 => Data::F64(from_le(raw, f64::from_le_bytes)),
            Dtype::I32 => Data::I32(from_le(raw, i32::from_le_bytes)),
            Dtype::I64 => Data::I64(from_le(raw, i64::from_le_bytes)),
            other => {
                return Err(Error::failed(format!(
                    "{}: {name} is {other:?}; the protocol uses F32, F64, I32, I64",
                    path.display()
                )))
            }
        };
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write tensors to a safetensors file, atomically (a partial file is never left under `path`).
pub fn write_tensors(path: &Path, tensors: &Tensors) -> Result<()> {
    let owned: Vec<(String, Owned)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                Owned {
                    dtype: t.dtype(),
                    shape: t.shape.clone(),
                    bytes: t.bytes(),
                },
            )
        })
        .collect();
    let partial = path.with_extension("partial");
    safetensors::serialize_to_file(owned.iter().map(|(k, o)| (k.as_str(), o)), None, &partial)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_dtype_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tensors::new();
        t.insert(
            "a.f32".into(),
            Tensor::f32(vec![2, 3], vec![1.5, -2.0, 0.0, 3.25, f32::MIN_POSITIVE, 7.0]).unwrap(),
        );
        t.insert(
            "b.i32".into(),
            Tensor::i32(vec![3], vec![-1, 0, 2_000_000_000]).unwrap(),
        );
        t.insert("c.i64".into(), Tensor::i64(vec![], vec![1 << 40]).unwrap());
        t.insert(
            "d.f64".into(),
            Tensor {
                shape: vec![1],
                data: Data::F64(vec![1e-300]),
            },
        );
        let path = dir.path().join("x.safetensors");
        write_tensors(&path, &t).unwrap();
        assert_eq!(read_tensors(&path).unwrap(), t);
        assert!(!path.with_extension("partial").exists());
    }

    #[test]
    fn a_shape_that_does_not_match_the_values_is_refused() {
        assert!(Tensor::f32(vec![2, 2], vec![1.0; 3]).is_err());
    }

    #[test]
    fn floats_are_not_token_ids() {
        assert!(Tensor::scalar(1.0).to_i32().is_err());
    }
}
