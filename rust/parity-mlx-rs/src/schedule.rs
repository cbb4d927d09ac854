//! Learning-rate schedules with MLX's schedulers' float32 arithmetic (`optim.cosine_decay`,
//! `optim.linear_schedule`, `optim.join_schedules`; the reference's schedule.py). Index convention
//! (MLX): the optimizer evaluates the schedule at the number of updates already done, so the first
//! update uses lr(0).
use mlx_rs::{error::Exception, ops, Array, Dtype};

use crate::{
    error::Result,
    settings::{OptimizerSettings, Schedule},
};

/// The learning rate of update `s` (updates already done), float32.
pub fn learning_rate(o: &OptimizerSettings, schedule: &Schedule, s: u64) -> Result<Array> {
    let step = Array::from_slice(&[s], &[]);
    let lr = match schedule {
        Schedule::Constant => Array::from_f32(o.lr as f32),
        Schedule::WarmupCosine {
            warmup_steps,
            warmup_init,
            decay_steps,
            end_lr,
        } => {
            let cosine = |x: &Array| -> std::result::Result<Array, Exception> {
                // optim.cosine_decay(lr, decay_steps, end_lr)
                let s = ops::minimum(x, Array::from_slice(&[*decay_steps as u64], &[]))?;
                let ang = ops::multiply(Array::from_f32((std::f64::consts::PI / *decay_steps as f64) as f32), &s)?;
                let decay = ops::multiply(Array::from_f32(0.5), ops::add(Array::from_f32(1.0), ops::cos(&ang)?)?)?;
                ops::add(
                    Array::from_f32(*end_lr as f32),
                    ops::multiply(&decay, Array::from_f32((o.lr - end_lr) as f32))?,
                )
            };
            if *warmup_steps == 0 {
                cosine(&step)?
            } else {
                // optim.linear_schedule(warmup_init, lr, warmup_steps), joined at warmup_steps.
                let w = *warmup_steps as u64;
                let ws = ops::minimum(&step, Array::from_slice(&[w], &[]))?;
                let warm = ops::add(
                    ops::multiply(&ws, Array::from_f32(((o.lr - warmup_init) / w as f64) as f32))?,
                    Array::from_f32(*warmup_init as f32),
                )?;
                if s < w {
                    warm
                } else {
                    cosine(&ops::subtract(&step, Array::from_slice(&[w], &[]))?)?
                }
            }
        }
    };
    Ok(lr.as_dtype(Dtype::Float32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::settings;

    #[test]
    fn schedule_follows_the_contract() {
        let s = settings("");
        let lr = |step| {
            let a = learning_rate(&s.optimizer, &s.schedule, step).unwrap();
            a.eval().unwrap();
            a.item_exact::<f32>() as f64
        };
        let expect = |s: u64| -> f64 {
            if s < 2 {
                1e-4 + s as f64 * (1e-3 - 1e-4) / 2.0
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * ((s - 2).min(4) as f64) / 4.0).cos()) * 1e-3
            }
        };
        for s in 0..8 {
            assert!((lr(s) - expect(s)).abs() < 1e-9, "s={s}: {} vs {}", lr(s), expect(s));
        }
    }

    #[test]
    fn constant_is_the_optimizer_lr() {
        let s = settings(r#", "optimizer": {"lr": 0.25}"#);
        let a = learning_rate(&s.optimizer, &Schedule::Constant, 7).unwrap();
        a.eval().unwrap();
        assert_eq!(a.item_exact::<f32>(), 0.25);
        assert_eq!(a.dtype(), Dtype::Float32);
    }
}
