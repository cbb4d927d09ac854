//! The model's shape and conventions, read from a Hugging Face `config.json` in either layout transformers
//! writes (RoPE at the top level, or inside `rope_parameters`), with the families' fixed choices.

use serde_json::Value;

use crate::{fail, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low: f64,
        high: f64,
        context: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub theta: f64,
    pub rope: Rope,
    pub tied: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: an RMSNorm over head_dim on every query and key head, before RoPE.
    pub qk_norm: bool,
}

fn number(d: &Value, key: &str) -> Option<f64> {
    d.get(key).and_then(Value::as_f64)
}

fn count(d: &Value, key: &str) -> Result<usize> {
    d.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| fail(format!("config.json lacks the required count {key:?}")))
}

fn flag(d: &Value, key: &str) -> bool {
    d.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl ModelConfig {
    pub fn from_json(d: &Value) -> Result<Self> {
        let family = d.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        if !["llama", "mistral", "qwen2", "qwen3"].contains(&family) {
            return Err(fail(format!("model_type {family:?} is not supported")));
        }
        if d.get("hidden_act").and_then(Value::as_str).is_some_and(|a| a != "silu") {
            return Err(fail("only hidden_act \"silu\" is supported"));
        }
        if d.get("sliding_window").is_some_and(|w| !w.is_null()) && family == "mistral" || flag(d, "use_sliding_window")
        {
            return Err(fail("sliding-window attention is not supported"));
        }
        // transformers 5 keeps RoPE in rope_parameters; transformers 4 wrote rope_theta and rope_scaling on top
        let mut rope = serde_json::Map::new();
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(Value::Object(m)) = d.get(key) {
                rope.extend(m.clone());
            }
        }
        let rope = Value::Object(rope);
        let kind = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let need = |k: &str| number(&rope, k).ok_or_else(|| fail(format!("rope_type {kind:?} needs {k:?}")));
        let scaling = match kind {
            "default" => Rope::Default,
            "linear" => Rope::Linear {
                factor: need("factor")?,
            },
            "llama3" => Rope::Llama3 {
                factor: need("factor")?,
                low: need("low_freq_factor")?,
                high: need("high_freq_factor")?,
                context: need("original_max_position_embeddings")?,
            },
            other => return Err(fail(format!("rope_type {other:?} is not supported"))),
        };
        let heads = count(d, "num_attention_heads")?;
        let hidden = count(d, "hidden_size")?;
        let (qwen2, qwen3) = (family == "qwen2", family == "qwen3");
        let attention_bias = flag(d, "attention_bias");
        let cfg = ModelConfig {
            vocab: count(d, "vocab_size")?,
            hidden,
            intermediate: count(d, "intermediate_size")?,
            layers: count(d, "num_hidden_layers")?,
            heads,
            kv_heads: count(d, "num_key_value_heads").unwrap_or(heads),
            head_dim: count(d, "head_dim").unwrap_or(hidden / heads),
            eps: number(d, "rms_norm_eps").unwrap_or(1e-6),
            theta: number(&rope, "rope_theta")
                .or_else(|| number(d, "rope_theta"))
                .unwrap_or(10000.0),
            rope: scaling,
            tied: flag(d, "tie_word_embeddings"),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: !qwen2 && !qwen3 && flag(d, "mlp_bias"),
            qk_norm: qwen3,
        };
        if cfg.heads % cfg.kv_heads != 0 {
            return Err(fail("num_attention_heads is not a multiple of num_key_value_heads"));
        }
        Ok(cfg)
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The angle per position of each rotated pair i < head_dim / 2 (docs/protocol.md, "RoPE's frequencies").
    pub fn rope_frequencies(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let inv = self.theta.powf(-2.0 * i as f64 / d);
                match self.rope {
                    Rope::Default => inv,
                    Rope::Linear { factor } => inv / factor,
                    Rope::Llama3 {
                        factor,
                        low,
                        high,
                        context,
                    } => {
                        let wavelength = 2.0 * std::f64::consts::PI / inv;
                        if wavelength < context / high {
                            inv
                        } else if wavelength > context / low {
                            inv / factor
                        } else {
                            let s = (context / wavelength - low) / (high - low);
                            (1.0 - s) * inv / factor + s * inv
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_short_wavelengths_slows_long_ones_and_blends_between() {
        let d = serde_json::json!({"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}});
        let cfg = ModelConfig::from_json(&d).unwrap();
        let f = cfg.rope_frequencies();
        let inv = |i: usize| 10000f64.powf(-2.0 * i as f64 / 64.0);
        assert_eq!(f[0], inv(0)); // wavelength 2π < 64 / 4
        assert_eq!(f[31], inv(31) / 8.0); // wavelength far beyond 64
        let between = (0..32).find(|&i| f[i] != inv(i) && f[i] != inv(i) / 8.0).unwrap();
        assert!(f[between] < inv(between) && f[between] > inv(between) / 8.0);
    }

    #[test]
    fn qwen2_biases_q_k_v_only_and_qwen3_norms_heads() {
        let base = serde_json::json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1});
        let mut q2 = base.clone();
        q2["model_type"] = "qwen2".into();
        let c = ModelConfig::from_json(&q2).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm && c.group() == 2);
        let mut q3 = base;
        q3["model_type"] = "qwen3".into();
        assert!(ModelConfig::from_json(&q3).unwrap().qk_norm);
    }
}
