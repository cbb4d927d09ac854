//! The optimizer (docs/training-step.md, "One optimizer step"): MLX's `optim.clip_grad_norm`, then MLX's
//! `optim.AdamW` written out with both bias-correction conventions. Each update runs in its gradient's
//! dtype, as MLX's Python does (a Python float constant takes the dtype of the array it meets:
//! `model::scalar_like`).
use std::{collections::HashMap, rc::Rc};

use mlx_rs::{module::FlattenedModuleParamRef, ops, transforms::eval, Array};

use crate::{
    error::{Error, Result},
    model::scalar_like,
    settings::OptimizerSettings,
};

/// `optim.clip_grad_norm(grads, max_norm)`: the squared norms summed in module-tree order (`order`),
/// `0.0 + sum(g1^2) + sum(g2^2) + ...` (the Python floats in the dtype of the array they meet: a
/// bfloat16 norm for bfloat16 gradients), `normalizer = minimum(max_norm / (norm + 1e-6), 1.0)`.
pub fn clip_grad_norm(grads: &mut HashMap<String, Array>, order: &[String], max_norm: f64) -> Result<()> {
    let mut acc: Option<Array> = None;
    for name in order.iter().filter(|n| grads.contains_key(*n)) {
        let sq = ops::square(&grads[name])?.sum(None)?;
        acc = Some(match acc {
            None => ops::add(scalar_like(0.0, &sq)?, &sq)?,
            Some(a) => ops::add(&a, &sq)?,
        });
    }
    let Some(acc) = acc else {
        return Ok(());
    };
    let total_norm = ops::sqrt(&acc)?;
    let normalizer = ops::minimum(
        ops::divide(
            scalar_like(max_norm as f32, &total_norm)?,
            ops::add(&total_norm, scalar_like(1e-6, &total_norm)?)?,
        )?,
        scalar_like(1.0, &total_norm)?,
    )?;
    for g in grads.values_mut() {
        *g = ops::multiply(&*g, &normalizer)?;
    }
    Ok(())
}

/// AdamW's state: the updates done, the moments by parameter name, and the learning rate of the last
/// update (MLX keeps it in the optimizer state).
#[derive(Default)]
pub struct AdamW {
    /// Updates already done.
    pub step: u64,
    pub m: HashMap<String, Array>,
    pub v: HashMap<String, Array>,
    pub last_lr: Option<Array>,
}

impl AdamW {
    /// MLX's `optim.AdamW.apply_single` for every gradient, at learning rate `lr_f32` (the schedule read
    /// at the updates already done): the updated parameters by name. Each update runs in its gradient's
    /// dtype: `lr.astype(g.dtype)`, the Python float constants in that dtype, `m` and `v` zeros of the
    /// parameter's dtype, and the bias corrections computed in float32 (`b ** step` with a uint64 step)
    /// and then cast to it.
    pub fn update(
        &mut self,
        o: &OptimizerSettings,
        lr_f32: Array,
        params: &FlattenedModuleParamRef,
        grads: &HashMap<String, Array>,
    ) -> Result<HashMap<Rc<str>, Array>> {
        let t = self.step + 1;
        let (b1, b2) = o.betas;
        let f = |x: f64| Array::from_f32(x as f32);
        let step_arr = Array::from_slice(&[t], &[]);
        let mut new_params: HashMap<Rc<str>, Array> = HashMap::new();
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        for name in names {
            let g = &grads[name];
            let dt = g.dtype();
            // A Python float meeting an array of the gradient's dtype (identical to `f` for float32).
            let d = |x: f64| scalar_like(x as f32, g);
            let lr = if dt == lr_f32.dtype() {
                lr_f32.clone()
            } else {
                lr_f32.as_dtype(dt)?
            };
            let p = params
                .get(name.as_str())
                .ok_or_else(|| Error::Mlx(format!("gradient for unknown parameter {name}")))?;
            let m0 = match self.m.get(name) {
                Some(m) => m.clone(),
                None => ops::zeros_like(p)?,
            };
            let v0 = match self.v.get(name) {
                Some(v) => v.clone(),
                None => ops::zeros_like(p)?,
            };
            // parameter * (1 - lr * weight_decay)
            let decayed = ops::multiply(*p, ops::subtract(d(1.0)?, ops::multiply(&lr, d(o.weight_decay)?)?)?)?;
            let m = ops::add(ops::multiply(d(b1)?, &m0)?, ops::multiply(d(1.0 - b1)?, g)?)?;
            let v = ops::add(
                ops::multiply(d(b2)?, &v0)?,
                ops::multiply(d(1.0 - b2)?, ops::square(g)?)?,
            )?;
            let updated = if o.bias_correction {
                // (lr / (1 - b1**step)).astype(g.dtype), rsqrt(1 - b2**step).astype(g.dtype): float32
                // inside (b ** step is float32 against the uint64 step), rounded to the gradient's dtype.
                let mut c1 = ops::divide(&lr, ops::subtract(f(1.0), ops::power(f(b1), &step_arr)?)?)?;
                let mut c2 = ops::rsqrt(ops::subtract(f(1.0), ops::power(f(b2), &step_arr)?)?)?;
                if c1.dtype() != dt {
                    c1 = c1.as_dtype(dt)?;
                }
                if c2.dtype() != dt {
                    c2 = c2.as_dtype(dt)?;
                }
                let num = ops::multiply(&c1, &m)?;
                let den = ops::add(ops::multiply(ops::sqrt(&v)?, &c2)?, d(o.eps)?)?;
                ops::subtract(&decayed, ops::divide(&num, &den)?)?
            } else {
                let num = ops::multiply(&lr, &m)?;
                ops::subtract(&decayed, ops::divide(&num, ops::add(ops::sqrt(&v)?, d(o.eps)?)?)?)?
            };
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
            new_params.insert(Rc::from(name.as_str()), updated);
        }
        let mut all: Vec<&Array> = new_params.values().collect();
        all.extend(self.m.values());
        all.extend(self.v.values());
        eval(all)?;
        self.step = t;
        self.last_lr = Some(lr_f32);
        Ok(new_params)
    }
}

#[cfg(test)]
mod tests {
    use mlx_rs::Dtype;

    use super::*;
    use crate::{
        model::Pieces,
        testing::{batch, bf16, dtypes, flat, tiny_checkpoint, tmp},
        trainer::{host_vec, Trainer},
    };

    #[test]
    fn clip_scales_every_gradient_to_the_max_norm() {
        let mut grads: HashMap<String, Array> = [
            ("a".to_string(), Array::from_slice(&[3.0f32, 0.0], &[2])),
            ("b".to_string(), Array::from_slice(&[4.0f32], &[1])),
        ]
        .into();
        let order = vec!["b".to_string(), "a".to_string()];
        clip_grad_norm(&mut grads, &order, 1.0).unwrap();
        let a = host_vec::<f32>(&grads["a"]).unwrap();
        let b = host_vec::<f32>(&grads["b"]).unwrap();
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6, "{a:?} {b:?}");
        // Below the max norm nothing changes.
        clip_grad_norm(&mut grads, &order, 10.0).unwrap();
        assert_eq!(host_vec::<f32>(&grads["b"]).unwrap(), b);
    }

    #[test]
    fn bf16_given_gradients_are_cast_to_their_parameters_dtype() {
        let d_dir = tmp("bf16-given");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let b = batch();
        let mut a = Trainer::new(d, bf16(""), None, true).unwrap();
        let mut c = Trainer::new(d, bf16(""), None, true).unwrap();
        let (_, g) = a.gradients(&b).unwrap();
        // Given as float32 (the bfloat16 values exactly): the same update as from the own gradients.
        let given: HashMap<String, Array> = g
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float32).unwrap()))
            .collect();
        a.update_from_gradients(g).unwrap();
        c.update_from_gradients(given).unwrap();
        assert_eq!(flat(&a), flat(&c));
        assert!(dtypes(&c).values().all(|&dt| dt == Dtype::Bfloat16));
        assert!(c
            .optimizer
            .m
            .values()
            .chain(c.optimizer.v.values())
            .all(|x| x.dtype() == Dtype::Bfloat16));
        // Given pieces arrive as float32 and are computed from in bfloat16: the own chain, reproduced.
        let ids = b.arrays().0;
        let own = a.pieces(&ids, None).unwrap();
        let given: Pieces = own
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float32).unwrap()))
            .collect();
        let again = a.pieces(&ids, Some(&given)).unwrap();
        for (k, v) in &own {
            assert_eq!(v.dtype(), Dtype::Bfloat16, "{k}");
            assert_eq!(again[k].dtype(), Dtype::Bfloat16, "{k}");
            assert_eq!(host_vec::<f32>(v).unwrap(), host_vec::<f32>(&again[k]).unwrap(), "{k}");
        }
    }
}
