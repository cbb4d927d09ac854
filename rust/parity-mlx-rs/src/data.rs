//! Batches (docs/training-step.md, "Batch"): validated on the host, cut into micro-batches for
//! accumulation, handed to MLX as arrays (the reference's `validate_batch`, `split_batch`, `to_mx_batch`).
use mlx_rs::Array;

use crate::{
    error::{Error, Result},
    loss::AUTH_WEIGHT_MAX,
};

/// A host batch, validated (docs/training-step.md, "Batch").
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<i32>,
    pub attention_mask: Vec<i32>,
    pub auth_weight: Vec<f32>,
    pub prov_entropy: Vec<f32>,
    pub b: usize,
    pub t: usize,
}

impl Batch {
    /// The four arrays of a batch, each with its shape, as the Python and protocol callers hold them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input_ids: Vec<i32>,
        ids_shape: &[usize],
        attention_mask: Vec<f64>,
        mask_shape: &[usize],
        auth_weight: Vec<f64>,
        w_shape: &[usize],
        prov_entropy: Vec<f64>,
        h_shape: &[usize],
    ) -> Result<Self> {
        // Validated in float64 (as the reference does), computed in float32.
        let bad = |m: String| Err(Error::Batch(m));
        if ids_shape.len() != 2 || ids_shape[1] < 2 {
            return bad(format!("input_ids must be [B, T] with T >= 2, got shape {ids_shape:?}"));
        }
        if mask_shape != ids_shape {
            return bad(format!(
                "attention_mask shape {mask_shape:?} differs from input_ids shape {ids_shape:?}"
            ));
        }
        let (b, t) = (ids_shape[0], ids_shape[1]);
        if attention_mask.iter().any(|&m| m != 0.0 && m != 1.0) {
            return bad("attention_mask must hold only 0 and 1".into());
        }
        let attention_mask: Vec<i32> = attention_mask.iter().map(|&m| m as i32).collect();
        for r in 0..b {
            let row = &attention_mask[r * t..(r + 1) * t];
            if row.windows(2).any(|w| w[1] > w[0]) {
                return bad("attention_mask must be right padding (1s then 0s) in every row".into());
            }
            if row.iter().sum::<i32>() < 2 {
                return bad("every row needs at least 2 tokens, so it has a target to predict".into());
            }
        }
        for (name, arr, shape) in [
            ("auth_weight", &auth_weight, w_shape),
            ("prov_entropy", &prov_entropy, h_shape),
        ] {
            if shape != [b] {
                return bad(format!("{name} must have shape ({b},), got {shape:?}"));
            }
            let nonfinite: Vec<usize> = arr
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_finite())
                .map(|(i, _)| i)
                .collect();
            if !nonfinite.is_empty() {
                return bad(format!("{name} holds non-finite values at {nonfinite:?}"));
            }
        }
        // 0.99 stored as float32 is 0.9900000095: it still means 0.99, as in the reference.
        let in_range = |w: f64| w >= 0.0 && (w <= AUTH_WEIGHT_MAX || (w as f32) <= (AUTH_WEIGHT_MAX as f32));
        let rows: Vec<usize> = (0..b).filter(|&i| !in_range(auth_weight[i])).collect();
        if !rows.is_empty() {
            let vals: Vec<f64> = rows.iter().map(|&i| auth_weight[i]).collect();
            return bad(format!(
                "auth_weight must be in [0, {AUTH_WEIGHT_MAX}]; rows {rows:?} hold {vals:?}"
            ));
        }
        let rows: Vec<usize> = (0..b).filter(|&i| prov_entropy[i] < 0.0).collect();
        if !rows.is_empty() {
            let vals: Vec<f64> = rows.iter().map(|&i| prov_entropy[i]).collect();
            return bad(format!("prov_entropy must be >= 0; rows {rows:?} hold {vals:?}"));
        }
        let auth_weight: Vec<f32> = auth_weight.iter().map(|&x| x as f32).collect();
        let prov_entropy: Vec<f32> = prov_entropy.iter().map(|&x| x as f32).collect();
        Ok(Batch {
            input_ids,
            attention_mask,
            auth_weight,
            prov_entropy,
            b,
            t,
        })
    }

    /// Micro-batches for accumulation: the batch cut in order into `parts` equal slices.
    pub fn split(&self, parts: usize) -> Result<Vec<Batch>> {
        if self.b % parts != 0 {
            return Err(Error::Settings(format!(
                "batch size {} is not divisible by accum_steps={parts}",
                self.b
            )));
        }
        let n = self.b / parts;
        Ok((0..parts)
            .map(|i| Batch {
                input_ids: self.input_ids[i * n * self.t..(i + 1) * n * self.t].to_vec(),
                attention_mask: self.attention_mask[i * n * self.t..(i + 1) * n * self.t].to_vec(),
                auth_weight: self.auth_weight[i * n..(i + 1) * n].to_vec(),
                prov_entropy: self.prov_entropy[i * n..(i + 1) * n].to_vec(),
                b: n,
                t: self.t,
            })
            .collect())
    }

    /// (input_ids, attention_mask, auth_weight, prov_entropy) as MLX arrays.
    pub fn arrays(&self) -> (Array, Array, Array, Array) {
        let (b, t) = (self.b as i32, self.t as i32);
        (
            Array::from_slice(&self.input_ids, &[b, t]),
            Array::from_slice(&self.attention_mask, &[b, t]),
            Array::from_slice(&self.auth_weight, &[b]),
            Array::from_slice(&self.prov_entropy, &[b]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::batch;

    #[test]
    fn split_cuts_rows_in_order_and_needs_a_divisible_batch() {
        let b = batch();
        let parts = b.split(2).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].input_ids, b.input_ids[..8]);
        assert_eq!(parts[1].attention_mask, b.attention_mask[8..]);
        assert_eq!(parts[1].auth_weight, vec![b.auth_weight[1]]);
        let err = b.split(3).err().unwrap();
        assert!(matches!(err, Error::Settings(_)), "{err}");
        assert!(err.to_string().contains("not divisible by accum_steps=3"), "{err}");
    }

    #[test]
    fn rejects_batches_outside_the_domain() {
        let new =
            |mask: Vec<f64>, w: f64| Batch::new(vec![5; 4], &[1, 4], mask, &[1, 4], vec![w], &[1], vec![0.5], &[1]);
        assert!(new(vec![1., 1., 1., 0.], 0.5).is_ok());
        let left_padded = new(vec![0., 1., 1., 1.], 0.5).err().unwrap().to_string();
        assert!(left_padded.contains("right padding"), "{left_padded}");
        let too_short = new(vec![1., 0., 0., 0.], 0.5).err().unwrap().to_string();
        assert!(too_short.contains("at least 2 tokens"), "{too_short}");
        // 0.99 as float32 still means 0.99; the next float32 above it does not.
        assert!(new(vec![1.; 4], 0.99f32 as f64).is_ok());
        let above = new(vec![1.; 4], 0.9900001).err().unwrap().to_string();
        assert!(above.starts_with("auth_weight must be in [0, 0.99]"), "{above}");
    }
}
