//! Model configuration from a Hugging Face `config.json`, with Hugging Face's defaults
//! (docs/training-step.md, "Model").
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub head_dim: i32,
    /// LlamaConfig's default 1e-6 (not MLX's RMSNorm default 1e-5).
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// LlamaConfig's default false (not mlx-lm's true).
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

fn int(d: &Value, key: &str) -> Result<Option<i64>> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| Error::Config(format!("config.json: {key} must be an integer, got {v}"))),
    }
}

fn req_int(d: &Value, key: &str) -> Result<i32> {
    int(d, key)?
        .map(|v| v as i32)
        .ok_or_else(|| Error::Config(format!("config.json lacks the required key '{key}'")))
}

fn float(d: &Value, key: &str, default: f64) -> Result<f64> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::Config(format!("config.json: {key} must be a number, got {v}"))),
    }
}

fn boolean(d: &Value, key: &str, default: bool) -> Result<bool> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::Config(format!("config.json: {key} must be a boolean, got {v}"))),
    }
}

impl ModelConfig {
    pub fn from_value(d: &Value) -> Result<Self> {
        let model_type = d.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        if model_type != "llama" {
            return Err(Error::Config(format!("model_type '{model_type}' is not supported (only 'llama')")));
        }
        let act = d.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(Error::Config(format!("hidden_act '{act}' is not supported (only 'silu')")));
        }
        let rope = d.get("rope_parameters").filter(|v| v.is_object());
        let rope_type = rope
            .and_then(|r| r.get("rope_type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = d.get("rope_scaling").filter(|v| !v.is_null());
        if rope_type != "default" || scaling.is_some() {
            return Err(Error::Config(format!(
                "rope scaling is not supported (rope_type='{rope_type}', rope_scaling={})",
                scaling.map(|v| v.to_string()).unwrap_or_else(|| "None".into())
            )));
        }
        let heads = req_int(d, "num_attention_heads")?;
        let hidden = req_int(d, "hidden_size")?;
        let kv = match int(d, "num_key_value_heads")? {
            Some(0) | None => heads,
            Some(v) => v as i32,
        };
        let head_dim = match int(d, "head_dim")? {
            Some(0) | None => {
                if heads == 0 {
                    return Err(Error::Config("num_attention_heads must be > 0".into()));
                }
                hidden / heads
            }
            Some(v) => v as i32,
        };
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t,
            None => float(d, "rope_theta", 10000.0)?,
        };
        let cfg = ModelConfig {
            vocab_size: req_int(d, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req_int(d, "intermediate_size")?,
            num_hidden_layers: req_int(d, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: float(d, "rms_norm_eps", 1e-6)?,
            rope_theta,
            tie_word_embeddings: boolean(d, "tie_word_embeddings", false)?,
            attention_bias: boolean(d, "attention_bias", false)?,
            mlp_bias: boolean(d, "mlp_bias", false)?,
        };
        if cfg.num_key_value_heads <= 0 || cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads={} is not a multiple of num_key_value_heads={}",
                cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        Ok(cfg)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = if dir.is_dir() { dir.join("config.json") } else { dir.to_path_buf() };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("no config.json at {} ({e})", path.display())))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_value(&v)
    }

    /// The config as Hugging Face writes it (saved with checkpoints).
    pub fn to_hf_value(&self) -> Value {
        serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_hugging_face() {
        let v = serde_json::json!({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4});
        let c = ModelConfig::from_value(&v).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rejects_bad_gqa() {
        let v = serde_json::json!({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3});
        assert!(ModelConfig::from_value(&v).is_err());
    }
}
