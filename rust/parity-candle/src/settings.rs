//! The trainer settings of a request (`settings.json` of a fixture, docs/training-step.md).

use serde::Deserialize;

use crate::{fail, Result};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    Full,
    Lora,
    Head,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Lora {
    pub rank: usize,
    pub layers: usize,
    pub scale: f32,
}

#[derive(Clone, Debug, Deserialize)]
/// Read as float64, as the reference reads JSON numbers: 1 − β is formed before rounding to float32
/// (1 − 0.999f32 is 1.3e-5 away from 0.001).
pub struct Optimizer {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    WarmupCosine {
        warmup_steps: usize,
        warmup_init: f64,
        decay_steps: usize,
        end_lr: f64,
    },
}

#[derive(Clone, Debug, Deserialize)]
pub struct LossWeights {
    pub alpha: f32,
    pub lambda: f32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    pub trainable: Trainable,
    pub lora: Option<Lora>,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip_norm: Option<f32>,
    pub accum_steps: usize,
    pub loss: LossWeights,
    #[serde(default = "float32")]
    pub precision: String,
}

fn float32() -> String {
    "float32".into()
}

impl Settings {
    pub fn from_json(text: &str) -> Result<Self> {
        let s: Settings = serde_json::from_str(text).map_err(|e| fail(format!("settings: {e}")))?;
        if s.precision != "float32" {
            return Err(crate::unsupported(format!(
                "precision {:?}: this port trains in float32 only (candle's CPU bfloat16 kernels round otherwise than \
                 the contract's MLX conventions)",
                s.precision
            )));
        }
        if s.trainable == Trainable::Lora && s.lora.is_none() {
            return Err(fail("settings: trainable \"lora\" needs a \"lora\" section"));
        }
        if !((2.3..=3.0).contains(&s.loss.alpha) && s.loss.lambda >= 0.0 && s.loss.lambda.is_finite()) {
            return Err(fail(format!(
                "settings: alpha {} or lambda {} out of range",
                s.loss.alpha, s.loss.lambda
            )));
        }
        if s.accum_steps == 0 {
            return Err(fail("settings: accum_steps must be at least 1"));
        }
        Ok(s)
    }

    /// The learning rate of update number `s` (0 for the first): read before the step count grows.
    pub fn learning_rate(&self, s: usize) -> f64 {
        let lr = self.optimizer.lr;
        match self.schedule {
            Schedule::Constant => lr,
            Schedule::WarmupCosine {
                warmup_steps,
                warmup_init,
                decay_steps,
                end_lr,
            } => {
                if s < warmup_steps {
                    warmup_init + s as f64 * (lr - warmup_init) / warmup_steps as f64
                } else {
                    let done = (s - warmup_steps).min(decay_steps) as f64 / decay_steps as f64;
                    end_lr + 0.5 * (1.0 + (std::f64::consts::PI * done).cos()) * (lr - end_lr)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(schedule: &str) -> Settings {
        Settings::from_json(&format!(
            r#"{{"trainable": "full", "optimizer": {{"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                "weight_decay": 0.0, "bias_correction": false}}, "schedule": {schedule}, "clip_norm": null,
                "accum_steps": 1, "loss": {{"alpha": 2.7, "lambda": 1.0}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn warmup_then_cosine_is_read_before_the_step_count_grows() {
        let s = settings(
            r#"{"kind": "warmup_cosine", "warmup_steps": 2, "warmup_init": 1e-4, "decay_steps": 4, "end_lr": 0.0}"#,
        );
        assert_eq!(s.learning_rate(0), 1e-4);
        assert!((s.learning_rate(1) - 5.5e-4).abs() < 1e-15);
        assert_eq!(s.learning_rate(2), 1e-3);
        assert!((s.learning_rate(4) - 5e-4).abs() < 1e-15);
        assert!(s.learning_rate(6).abs() < 1e-15 && s.learning_rate(9).abs() < 1e-15);
    }

    #[test]
    fn bfloat16_is_refused_as_unsupported_and_bad_loss_weights_as_errors() {
        let text = r#"{"trainable": "head", "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": 0.0, "bias_correction": false}, "schedule": {"kind": "constant"}, "clip_norm": null,
            "accum_steps": 1, "loss": {"alpha": 2.7, "lambda": 1.0}, "precision": "bfloat16"}"#;
        assert!(matches!(
            Settings::from_json(text),
            Err(parity_adapter::Error::Unsupported(_))
        ));
        let text = text.replace("\"bfloat16\"", "\"float32\"").replace("2.7", "1.0");
        assert!(matches!(
            Settings::from_json(&text),
            Err(parity_adapter::Error::Failed(_))
        ));
    }
}
