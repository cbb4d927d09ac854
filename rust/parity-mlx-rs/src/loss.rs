//! The loss (docs/training-step.md, "Loss"): shifted next-token cross-entropy under the padding mask,
//! the Empirical Distrust term, and `total = ce + lambda * distrust` (the reference's loss.py). Op order
//! follows MLX's `nn.losses.cross_entropy` so that float32 results agree bit for bit.
use mlx_rs::{
    error::Exception,
    ops::{self, indexing::IndexOp},
    stop_gradient, Array, Dtype,
};

use crate::{
    error::{Error, Result},
    inject::{self, Inject},
    model::LlamaForCausalLM,
    settings::LossSettings,
};

pub const AUTH_WEIGHT_MAX: f64 = 0.99;
pub const ALPHA_RANGE: (f64, f64) = (2.3, 3.0);
pub const DISTRUST_EPS: f64 = 1e-8;

pub fn validate_loss_scalars(alpha: f64, lambda: f64) -> Result<()> {
    let (lo, hi) = ALPHA_RANGE;
    if !(alpha.is_finite() && lo <= alpha && alpha <= hi) {
        return Err(Error::Batch(format!("alpha must be in [{lo}, {hi}], got {alpha}")));
    }
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(Error::Batch(format!("lambda must be finite and >= 0, got {lambda}")));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct LossParts {
    /// float32 values widened to f64; after accumulation the f64 mean of the micro-batch values
    /// (as the reference computes it from Python floats).
    pub ce: f64,
    pub distrust: f64,
    pub total: f64,
}

impl LossParts {
    /// The evaluated `[total, ce, distrust]` of `loss_arrays`.
    pub fn read(v: &[Array]) -> Result<Self> {
        Ok(LossParts {
            total: scalar(&v[0])?,
            ce: scalar(&v[1])?,
            distrust: scalar(&v[2])?,
        })
    }

    /// The mean over micro-batches, in f64 (the reference averages Python floats).
    pub fn mean(parts: &[LossParts]) -> Self {
        let (mut ce, mut d, mut tot) = (0f64, 0f64, 0f64);
        for p in parts {
            ce += p.ce;
            d += p.distrust;
            tot += p.total;
        }
        let k = parts.len() as f64;
        LossParts {
            ce: ce / k,
            distrust: d / k,
            total: tot / k,
        }
    }
}

fn scalar(a: &Array) -> Result<f64> {
    let a = a.as_dtype(Dtype::Float32)?;
    a.eval()?;
    Ok(a.item_exact::<f32>() as f64)
}

/// `(targets, mask)`: token t+1 is the target of position t; the mask as float32.
pub fn shifted_targets(ids: &Array, mask: &Array) -> std::result::Result<(Array, Array), Exception> {
    let t = ids.shape()[1];
    Ok((ids.index((.., 1..t)), mask.index((.., 1..t)).as_dtype(Dtype::Float32)?))
}

/// `(logits_s, targets, mask)`: position t predicts token t+1 (or, injected, no shift).
pub fn shifted_slices(
    logits: &Array,
    ids: &Array,
    mask: &Array,
    bug: Option<Inject>,
) -> std::result::Result<(Array, Array, Array), Exception> {
    if let Some(unshifted) = inject::unshifted_slices(bug, logits, ids, mask) {
        return unshifted;
    }
    let t = ids.shape()[1];
    let (targets, mask) = shifted_targets(ids, mask)?;
    Ok((logits.index((.., 0..t - 1, ..)), targets, mask))
}

/// MLX's `nn.losses.cross_entropy(logits, targets, reduction="none")` (CPU path), then the masked mean.
fn cross_entropy(logits: &Array, targets: &Array, mask: &Array) -> std::result::Result<Array, Exception> {
    let max = stop_gradient(logits.max_axis(-1, true)?)?;
    let logits = ops::subtract(logits, &max)?;
    let score = logits
        .take_along_axis(targets.expand_dims(-1)?, -1)?
        .squeeze_axes(&[-1])?;
    let lse = logits.logsumexp_axis(-1, false)?;
    let per_token = ops::subtract(&lse, &score)?;
    ops::divide(ops::multiply(&per_token, mask)?.sum(None)?, mask.sum(None)?)
}

/// Batch mean of `alpha * (ln(1 - w + 1e-8) + H)^2`.
fn distrust(w: &Array, h: &Array, alpha: f64) -> std::result::Result<Array, Exception> {
    let one_minus = ops::subtract(Array::from_f32(1.0), w)?;
    let inner = ops::add(
        ops::log(ops::add(&one_minus, Array::from_f32(DISTRUST_EPS as f32))?)?,
        h,
    )?;
    ops::multiply(Array::from_f32(alpha as f32), ops::square(&inner)?)?.mean(None)
}

/// `[total, ce, distrust]` of one batch; `total` first, so value_and_grad differentiates it.
pub fn loss_arrays(
    model: &LlamaForCausalLM,
    args: &(Array, Array, Array, Array),
    l: &LossSettings,
    bug: Option<Inject>,
) -> std::result::Result<Vec<Array>, Exception> {
    let logits = model.forward(&args.0)?;
    // Under bfloat16 the logits go to the loss in float32 (`logits.astype(mx.float32)`).
    let logits = if logits.dtype() == Dtype::Float32 {
        logits
    } else {
        logits.as_dtype(Dtype::Float32)?
    };
    loss_of_logits(&logits, args, l, bug)
}

/// `[total, ce, distrust]` of given logits: the loss on its own (the isolated loss check).
pub fn loss_of_logits(
    logits: &Array,
    args: &(Array, Array, Array, Array),
    l: &LossSettings,
    bug: Option<Inject>,
) -> std::result::Result<Vec<Array>, Exception> {
    let (ids, mask, w, h) = args;
    let (ls, targets, m) = shifted_slices(logits, ids, mask, bug)?;
    let ce = cross_entropy(&ls, &targets, &m)?;
    let d = distrust(w, h, l.alpha)?;
    let total = ops::add(&ce, ops::multiply(Array::from_f32(l.lambda as f32), &d)?)?;
    Ok(vec![total, ce, d])
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        testing::{batch, settings, tiny_checkpoint, tmp},
        trainer::{host_vec, Trainer},
    };

    #[test]
    fn loss_scalars_outside_their_domain_are_batch_errors() {
        for (alpha, lambda) in [(2.2, 1.0), (3.01, 1.0), (f64::NAN, 1.0), (2.7, -1.0)] {
            assert!(
                matches!(validate_loss_scalars(alpha, lambda), Err(Error::Batch(_))),
                "{alpha} {lambda}"
            );
        }
        assert!(validate_loss_scalars(2.3, 0.0).is_ok());
    }

    #[test]
    fn distrust_has_no_gradient() {
        let d_dir = tmp("distrust");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let b = batch();
        let mut t = Trainer::new(d, settings(""), None, true).unwrap();
        let (p1, g1) = t.gradients(&b).unwrap();
        let mut t2 = Trainer::new(d, settings(r#", "loss": {"alpha": 2.7, "lambda": 0.0}"#), None, true).unwrap();
        let (p2, g2): (LossParts, HashMap<String, Array>) = t2.gradients(&b).unwrap();
        assert!(p1.distrust > 0.0 && p1.total != p2.total);
        for (k, g) in &g1 {
            assert_eq!(host_vec::<f32>(g).unwrap(), host_vec::<f32>(&g2[k]).unwrap(), "{k}");
        }
    }
}
