//! One update (docs/training-step.md, "One optimizer step"): global-norm clipping, then AdamW in either
//! bias-correction convention at the schedule's learning rate for the number of updates already done.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor, Var};

use crate::inject::Bug;
use crate::settings::Settings;

/// AdamW's moments of the trained parameters and the number of updates applied.
#[derive(Default)]
pub struct Adam {
    pub step: i64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

/// g · min(clip / (‖g‖ + 1e-6), 1), ‖g‖ the L2 norm over every trained tensor together.
pub fn clip(grads: BTreeMap<String, Tensor>, clip: Option<f32>, bug: Option<Bug>) -> Result<BTreeMap<String, Tensor>> {
    let Some(clip) = clip else { return Ok(grads) };
    let scale = |norm: f32| (clip / (norm + 1e-6)).min(1.0) as f64;
    if bug == Some(Bug::ClipPerTensor) {
        return grads
            .into_iter()
            .map(|(k, g)| {
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                Ok((k, g.affine(scale(norm), 0.0)?))
            })
            .collect();
    }
    let mut squares = 0.0f32;
    for g in grads.values() {
        squares += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    }
    let s = scale(squares.sqrt());
    if s >= 1.0 {
        return Ok(grads);
    }
    grads.into_iter().map(|(k, g)| Ok((k, g.affine(s, 0.0)?))).collect()
}

impl Adam {
    /// One AdamW update of `params` with `grads` (the trained parameters' gradients, already averaged and
    /// clipped).
    pub fn update(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        settings: &Settings,
        bug: Option<Bug>,
    ) -> Result<()> {
        let o = &settings.optimizer;
        let lr = settings.learning_rate(self.step as usize) as f32 as f64; // a float32 learning rate, as the reference's
        let t = (self.step + 1) as i32;
        let [b1, b2] = o.betas;
        let correct = o.bias_correction != (bug == Some(Bug::BiasCorrectionFlipped));
        for (name, g) in grads {
            let p = params
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))?;
            let zeros = || g.zeros_like();
            let m = match self.m.get(name) {
                Some(m) => m.clone(),
                None => zeros()?,
            };
            let v = match self.v.get(name) {
                Some(v) => v.clone(),
                None => zeros()?,
            };
            let m = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let decayed = p.as_tensor().affine(1.0 - lr * o.weight_decay, 0.0)?;
            let step = if correct {
                let c1 = 1.0 - b1.powi(t);
                let c2 = (1.0 - b2.powi(t)).sqrt();
                let denominator = (v.sqrt()?.affine(1.0 / c2, 0.0)? + o.eps)?;
                (m.affine(lr / c1, 0.0)? / denominator)?
            } else {
                (m.affine(lr, 0.0)? / (v.sqrt()? + o.eps)?)?
            };
            p.set(&(decayed - step)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        self.step += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn settings(bias_correction: bool) -> Settings {
        Settings::from_json(&format!(
            r#"{{"trainable": "full", "optimizer": {{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
                "weight_decay": 0.1, "bias_correction": {bias_correction}}}, "schedule": {{"kind": "constant"}},
                "clip_norm": 1.0, "accum_steps": 1, "loss": {{"alpha": 2.7, "lambda": 1.0}}}}"#
        ))
        .unwrap()
    }

    fn one_update(bias_correction: bool, grad: f32) -> f64 {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let params = BTreeMap::from([("w".to_string(), p.clone())]);
        let grads = BTreeMap::from([("w".to_string(), Tensor::new(&[grad], &Device::Cpu).unwrap())]);
        let grads = clip(grads, Some(1.0), None).unwrap();
        let mut adam = Adam::default();
        adam.update(&params, &grads, &settings(bias_correction), None).unwrap();
        assert_eq!(adam.step, 1);
        p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64
    }

    #[test]
    fn the_first_update_follows_the_contract_in_both_conventions() {
        // gradient 2 clipped to 1 / (2 + 1e-6) · 2; decay first, then the moments' step
        let g = 2.0 / (2.0 + 1e-6);
        let decayed = 1.0 - 0.01 * 0.1;
        let (m, v) = (0.1 * g, 0.001 * g * g);
        let off = decayed - 0.01 * m / (f64::sqrt(v) + 1e-8);
        let on = decayed - (0.01 / 0.1) * m / (f64::sqrt(v) / f64::sqrt(0.001) + 1e-8);
        assert!(
            (one_update(false, 2.0) - off).abs() < 1e-6,
            "{} vs {off}",
            one_update(false, 2.0)
        );
        assert!(
            (one_update(true, 2.0) - on).abs() < 1e-6,
            "{} vs {on}",
            one_update(true, 2.0)
        );
    }
}
