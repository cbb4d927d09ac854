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
    /// Rows `lo..hi` along the first axis (a slice of a batch).
    pub fn rows(&self, lo: usize, hi: usize) -> Result<Tensor> {
        let n = self.shape.first().copied().unwrap_or(0);
        if lo > hi || hi > n {
            return Err(Error::failed(format!(
                "rows {lo}..{hi} of a tensor of shape {:?}",
                self.shape
            )));
        }
        let row: usize = self.shape[1..].iter().product();
        let (a, b) = (lo * row, hi * row);
        let data = match &self.data {
            Data::F32(v) => Data::F32(v[a..b].to_vec()),
            Data::F64(v) => Data::F64(v[a..b].to_vec()),
            Data::I32(v) => Data::I32(v[a..b].to_vec()),
            Data::I64(v) => Data::I64(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = hi - lo;
        Ok(Tensor { shape, data })
    }

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

/// bfloat16 bits widened to float32: exact (bfloat16 is float32's upper half).
fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// IEEE half bits widened to float32: exact (every half value is a float32 value).
fn f16_to_f32(b: [u8; 2]) -> f32 {
    let h = u16::from_le_bytes(b);
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let (exp, frac) = (i32::from((h >> 10) & 0x1f), f32::from(h & 0x3ff));
    sign * match exp {
        0 => frac * 2f32.powi(-24),                     // subnormal: frac · 2^-24
        31 if frac == 0.0 => f32::INFINITY,             // infinity
        31 => f32::NAN,                                 // NaN
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15), // normal
    }
}

/// Every tensor of a safetensors file: float32, float64, int32, int64, and bfloat16 or float16 (a checkpoint's
/// stored dtype) read as the float32 values they are, exactly. Other dtypes are refused by name.
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
            Dtype::BF16 => Data::F32(from_le(raw, bf16_to_f32)),
            Dtype::F16 => Data::F32(from_le(raw, f16_to_f32)),
            other => {
                return Err(Error::failed(format!(
                    "{}: {name} is {other:?}; readable: F32, F64, I32, I64, BF16, F16",
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
    fn bfloat16_and_float16_read_as_their_exact_float32_values() {
        let dir = tempfile::tempdir().unwrap();
        let half = |dtype, bits: &[u16]| Owned {
            dtype,
            shape: vec![bits.len()],
            bytes: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        };
        // bfloat16: 1.5, -2, the smallest subnormal (2^-133), the largest finite
        let bf = half(Dtype::BF16, &[0x3FC0, 0xC000, 0x0001, 0x7F7F]);
        // float16: 1.5, -2, the smallest subnormal (2^-24), the largest finite (65504), infinity
        let f16 = half(Dtype::F16, &[0x3E00, 0xC000, 0x0001, 0x7BFF, 0x7C00]);
        let path = dir.path().join("h.safetensors");
        safetensors::serialize_to_file([("bf", &bf), ("f16", &f16)], None, &path).unwrap();
        let t = read_tensors(&path).unwrap();
        assert_eq!(
            t["bf"].data,
            Data::F32(vec![
                1.5,
                -2.0,
                f32::from_bits(0x0001_0000),
                f32::from_bits(0x7F7F_0000)
            ])
        );
        assert_eq!(
            t["f16"].data,
            Data::F32(vec![1.5, -2.0, 2f32.powi(-24), 65504.0, f32::INFINITY])
        );
    }

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
