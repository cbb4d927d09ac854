//! The loss of docs/training-step.md: the cross-entropy over real next-token targets plus λ times the
//! Empirical Distrust term, which depends on the data only.

use candle_core::{Device, Result, Tensor, D};

use crate::inject::Bug;
use crate::settings::LossWeights;

/// A batch as the loss reads it: token ids [B, T] (u32), the mask [B, T] (float32) and the per-row data.
pub struct Rows {
    pub ids: Tensor,
    pub mask: Tensor,
    pub auth_weight: Vec<f32>,
    pub prov_entropy: Vec<f32>,
}

/// The loss of one batch; `ce` and `total` are tracked by autograd.
pub struct Parts {
    pub ce: Tensor,
    pub distrust: f32,
    pub total: Tensor,
}

/// The targets and their mask [B, T−1]: the ids and the mask from position 1 on.
pub fn shifted(ids: &Tensor, mask: &Tensor, bug: Option<Bug>) -> Result<(Tensor, Tensor)> {
    if bug == Some(Bug::NoShift) {
        return Ok((ids.clone(), mask.clone()));
    }
    let t = ids.dim(1)?;
    Ok((ids.narrow(1, 1, t - 1)?, mask.narrow(1, 1, t - 1)?))
}

/// mean_b α · (ln(1 − auth_weight_b + 1e-8) + prov_entropy_b)², in float32; inputs out of range are errors.
pub fn distrust(rows: &Rows, w: &LossWeights) -> std::result::Result<f32, String> {
    let mut sum = 0.0f32;
    for (&a, &e) in rows.auth_weight.iter().zip(&rows.prov_entropy) {
        if !((0.0..=0.99).contains(&a) && e >= 0.0 && e.is_finite()) {
            return Err(format!(
                "auth_weight {a} must be in [0, 0.99] and prov_entropy {e} finite and >= 0"
            ));
        }
        let x = (1.0 - a + 1e-8f32).ln() + e;
        sum += w.alpha * x * x;
    }
    Ok(sum / rows.auth_weight.len() as f32)
}

/// The loss of logits [B, T, V] on `rows`.
pub fn loss(logits: &Tensor, rows: &Rows, w: &LossWeights, bug: Option<Bug>) -> Result<Parts> {
    let (targets, mask) = shifted(&rows.ids, &rows.mask, bug)?;
    let n = targets.dim(1)?;
    let logits = logits.narrow(1, 0, n)?.contiguous()?;
    let top = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&top)?.exp()?.sum_keepdim(D::Minus1)?.log()? + top)?;
    let picked = logits.gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?;
    let per_token = (lse - picked)?.squeeze(D::Minus1)?;
    let ce = ((per_token * &mask)?.sum_all()? / mask.sum_all()?.to_scalar::<f32>()? as f64)?;
    let d = distrust(rows, w).map_err(candle_core::Error::Msg)?;
    let total = (&ce + (w.lambda * d) as f64)?;
    Ok(Parts { ce, distrust: d, total })
}

/// A float32 [B, T] tensor from int32 values.
pub fn mask(values: &[i32], shape: (usize, usize)) -> Result<Tensor> {
    Tensor::from_vec(
        values.iter().map(|&m| m as f32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_vocab_over_real_next_tokens_only() {
        let logits = Tensor::zeros((1, 4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let rows = Rows {
            ids: Tensor::new(&[[1u32, 2, 3, 0]], &Device::Cpu).unwrap(),
            mask: mask(&[1, 1, 1, 0], (1, 4)).unwrap(),
            auth_weight: vec![0.5],
            prov_entropy: vec![1.0],
        };
        let w = LossWeights {
            alpha: 2.7,
            lambda: 0.5,
        };
        let parts = loss(&logits, &rows, &w, None).unwrap();
        let ce = parts.ce.to_scalar::<f32>().unwrap();
        assert!((ce - 5f32.ln()).abs() < 1e-6);
        let d = 2.7 * ((0.5f32 + 1e-8).ln() + 1.0).powi(2);
        assert!((parts.distrust - d).abs() < 1e-6);
        assert!((parts.total.to_scalar::<f32>().unwrap() - (ce + 0.5 * d)).abs() < 1e-6);
        let (targets, m) = shifted(&rows.ids, &rows.mask, None).unwrap();
        assert_eq!(targets.to_vec2::<u32>().unwrap(), [[2, 3, 0]]);
        assert_eq!(m.to_vec2::<f32>().unwrap(), [[1.0, 1.0, 0.0]]);
    }
}
