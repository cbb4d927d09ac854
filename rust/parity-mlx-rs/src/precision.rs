//! Training precisions (docs/training-step.md, "Precision"): float32 everywhere, or bfloat16 the way
//! mlx-lm trains a bfloat16 model (the reference's precision.py). Under bfloat16 every checkpoint tensor
//! is a bfloat16 parameter and the forward runs in bfloat16; LoRA adapters stay float32, the logits go to
//! the loss in float32, and each gradient, AdamW moment and update keeps its parameter's dtype.
use mlx_rs::Dtype;
use serde::Serialize;

use crate::{error::Result, model::LlamaForCausalLM};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Float32,
    Bfloat16,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(Precision::Float32),
            "bfloat16" => Some(Precision::Bfloat16),
            _ => None,
        }
    }

    /// The dtype of the checkpoint's parameters and of the forward pass.
    pub fn dtype(&self) -> Dtype {
        match self {
            Precision::Float32 => Dtype::Float32,
            Precision::Bfloat16 => Dtype::Bfloat16,
        }
    }

    /// The model in this precision (the reference's `model.set_dtype`): under bfloat16 every parameter,
    /// the checkpoint's tensors as loaded into float32, is cast to bfloat16 (rounded to nearest even).
    /// Called before the LoRA adapters exist, so they stay float32.
    pub fn cast(&self, model: &mut LlamaForCausalLM) -> Result<()> {
        let dtype = self.dtype();
        if dtype != Dtype::Float32 {
            model.cast_parameters(dtype)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mlx_rs::{ops, Array};

    use super::*;
    use crate::{
        testing::{batch, bf16, dtypes, flat, settings, tiny_checkpoint, tmp},
        trainer::{host_vec, Trainer},
        weights,
    };

    /// bfloat16 except the LoRA adapters, which are float32.
    fn expected_dtype(name: &str) -> Dtype {
        if name.ends_with(".lora_a") || name.ends_with(".lora_b") {
            Dtype::Float32
        } else {
            Dtype::Bfloat16
        }
    }

    #[test]
    fn bf16_loads_every_checkpoint_tensor_as_bfloat16_rounded() {
        let d_dir = tmp("bf16-load");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let saved = weights::read_checkpoint(d).unwrap();
        let t = Trainer::new(d, bf16(""), None, true).unwrap();
        assert!(t.report.ok(), "{}", t.report.describe());
        assert_eq!(t.compute_dtype(), Dtype::Bfloat16);
        let mut rounded = 0;
        for (k, p) in t.parameters() {
            assert_eq!(p.dtype(), Dtype::Bfloat16, "{k}");
            // MLX's astype of the float32 tensor: round to nearest even.
            let want = saved[&k].as_dtype(Dtype::Bfloat16).unwrap();
            assert_eq!(host_vec::<f32>(&p).unwrap(), host_vec::<f32>(&want).unwrap(), "{k}");
            rounded += (host_vec::<f32>(&p).unwrap() != host_vec::<f32>(&saved[&k]).unwrap()) as usize;
        }
        assert!(rounded > 10, "{rounded} tensors changed by rounding");
        // A float16 checkpoint, too; and float32 stays float32 under the default precision.
        let h_dir = tmp("bf16-load-f16");
        let h = h_dir.path();
        std::fs::copy(d.join("config.json"), h.join("config.json")).unwrap();
        let half: Vec<(String, Array)> = saved
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float16).unwrap()))
            .collect();
        Array::save_safetensors(
            half.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            h.join("model.safetensors"),
        )
        .unwrap();
        let th = Trainer::new(h, bf16(""), None, true).unwrap();
        for (k, p) in th.parameters() {
            assert_eq!(p.dtype(), Dtype::Bfloat16, "{k}");
            let want = saved[&k]
                .as_dtype(Dtype::Float16)
                .unwrap()
                .as_dtype(Dtype::Bfloat16)
                .unwrap();
            assert_eq!(host_vec::<f32>(&p).unwrap(), host_vec::<f32>(&want).unwrap(), "{k}");
        }
        let f = Trainer::new(d, settings(""), None, true).unwrap();
        assert!(dtypes(&f).values().all(|&dt| dt == Dtype::Float32));
        // The forward pass runs in bfloat16: logits and hidden states are bfloat16.
        let (logits, hidden) = t.forward(&batch().arrays().0).unwrap();
        assert_eq!(logits.dtype(), Dtype::Bfloat16);
        assert!(hidden.iter().all(|h| h.dtype() == Dtype::Bfloat16));
    }

    #[test]
    fn bf16_lora_adapters_stay_float32() {
        let d_dir = tmp("bf16-lora");
        let d = d_dir.path();
        tiny_checkpoint(d, true);
        let lora = r#", "trainable": "lora", "lora": {"rank": 2, "layers": 1, "scale": 2.0}"#;
        let mut t = Trainer::new(d, bf16(lora), None, true).unwrap();
        let names = t.trainable_names();
        assert_eq!(names.len(), 8);
        for (k, dt) in dtypes(&t) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        // lora_init is loaded as float32 (and must be float32).
        let init: Vec<(String, Array)> = t
            .parameters()
            .into_iter()
            .filter(|(k, _)| names.contains(k))
            .map(|(k, v)| (k.clone(), ops::add(&v, Array::from_f32(0.125)).unwrap()))
            .collect();
        let init_path = d.join("adapters.safetensors");
        Array::save_safetensors(init.iter().map(|(k, v)| (k.as_str(), v)), None, &init_path).unwrap();
        let t2 = Trainer::new(d, bf16(lora), Some(&init_path), true).unwrap();
        for (k, dt) in dtypes(&t2) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        // A step: adapter gradients and moments float32, the frozen bfloat16 weights unchanged.
        let before = flat(&t);
        let (_, g) = t.gradients(&batch()).unwrap();
        assert!(g.values().all(|g| g.dtype() == Dtype::Float32));
        t.step(&batch()).unwrap();
        let after = flat(&t);
        for ((k, a), (_, b)) in before.iter().zip(&after) {
            if !names.contains(k) {
                assert_eq!(a, b, "{k} is frozen");
            }
        }
        assert!(before
            .iter()
            .zip(&after)
            .any(|((k, a), (_, b))| k.ends_with(".lora_b") && a != b));
        for (k, dt) in dtypes(&t) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        assert!(t
            .optimizer
            .m
            .values()
            .chain(t.optimizer.v.values())
            .all(|a| a.dtype() == Dtype::Float32));
    }
}
