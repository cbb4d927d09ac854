//! Model configuration from a Hugging Face `config.json`, with Hugging Face's defaults
//! (docs/training-step.md, "Model").
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, Result};

/// The model families this port builds: one module tree, differing only in which projections carry a
/// bias (and in what their config.json may ask for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];
pub const SUPPORTED_ROPE_TYPES: [&str; 3] = ["default", "linear", "llama3"];

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
            ModelType::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// The RoPE frequencies' scaling (transformers' `rope_type`): none, `linear` (every inverse frequency
/// divided by `factor`) or `llama3` (transformers' `_compute_llama3_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
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
    pub rope_scaling: RopeScaling,
    /// LlamaConfig's default false (not mlx-lm's true).
    pub tie_word_embeddings: bool,
    /// q_proj, k_proj and v_proj carry a bias: `attention_bias` (llama, mistral); always (qwen2).
    pub qkv_bias: bool,
    /// o_proj carries a bias: `attention_bias` (llama, mistral); never (qwen2).
    pub o_bias: bool,
    /// gate_proj, up_proj and down_proj carry a bias: `mlp_bias` (llama, mistral); never (qwen2).
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

/// `key` of the rope dict `r` as a number; absent (or null) is an error naming the key.
fn rope_float(r: &Value, key: &str, rope_type: &str, source: &str) -> Result<f64> {
    match r.get(key) {
        None | Some(Value::Null) => Err(Error::Config(format!(
            "rope scaling: rope_type '{rope_type}' needs the key '{key}' in {source}, which lacks it"
        ))),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::Config(format!("config.json: {key} ({source}) must be a number, got {v}"))),
    }
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5: `{"rope_type", "rope_theta",
/// scaling keys}`) or from the top-level `rope_theta` and `rope_scaling` (transformers 4; null, or a
/// dict naming its type `rope_type` or, older, `type`). As the reference does, the two dicts are merged
/// key by key, `rope_parameters` winning (`{**rope_scaling, **rope_parameters}`); `rope_theta` comes
/// from the merged dict, else the top level, else 10000.
fn rope_settings(d: &Value) -> Result<(f64, RopeScaling)> {
    let dict = |key: &str| -> Result<serde_json::Map<String, Value>> {
        match d.get(key) {
            None | Some(Value::Null) => Ok(Default::default()),
            Some(Value::Object(m)) => Ok(m.clone()),
            Some(v) => Err(Error::Config(format!(
                "config.json: {key} must be a dict or null, got {v}"
            ))),
        }
    };
    let mut merged = dict("rope_scaling")?;
    merged.extend(dict("rope_parameters")?);
    let source = "rope_parameters (or rope_scaling)";
    let r = &Value::Object(merged);
    let theta = match r.get("rope_theta").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::Config(format!("config.json: rope_theta must be a number, got {v}")))?,
        None => float(d, "rope_theta", 10000.0)?,
    };
    let rope_type = match r
        .get("rope_type")
        .filter(|v| !v.is_null())
        .or_else(|| r.get("type").filter(|v| !v.is_null()))
    {
        None => "default",
        Some(Value::String(t)) => t.as_str(),
        Some(v) => {
            return Err(Error::Config(format!(
                "config.json: rope_type must be a string, got {v}"
            )))
        }
    };
    let f = |key: &str| rope_float(r, key, rope_type, source);
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: f("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::Config(format!(
                "rope scaling: rope_type '{other}' is not supported (supported: {})",
                SUPPORTED_ROPE_TYPES.map(|t| format!("'{t}'")).join(", ")
            )))
        }
    };
    Ok((theta, scaling))
}

impl ModelConfig {
    /// Qwen3's RMSNorm over head_dim on each query and key head, before RoPE (`q_norm`, `k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.model_type == ModelType::Qwen3
    }

    pub fn from_value(d: &Value) -> Result<Self> {
        let model_type = match d.get("model_type") {
            None | Some(Value::Null) => ModelType::Llama,
            Some(Value::String(t)) => match t.as_str() {
                "llama" => ModelType::Llama,
                "mistral" => ModelType::Mistral,
                "qwen2" => ModelType::Qwen2,
                "qwen3" => ModelType::Qwen3,
                other => {
                    return Err(Error::Config(format!(
                        "model_type '{other}' is not supported (supported: {})",
                        SUPPORTED_MODEL_TYPES.map(|t| format!("'{t}'")).join(", ")
                    )))
                }
            },
            Some(v) => {
                return Err(Error::Config(format!(
                    "config.json: model_type must be a string, got {v}"
                )))
            }
        };
        match model_type {
            ModelType::Mistral => {
                if let Some(w) = d.get("sliding_window").filter(|v| !v.is_null()) {
                    return Err(Error::Config(format!(
                        "mistral: sliding_window={w}: sliding-window attention is not supported; only sliding_window null"
                    )));
                }
            }
            ModelType::Qwen2 | ModelType::Qwen3 => {
                if boolean(d, "use_sliding_window", false)? {
                    return Err(Error::Config(format!(
                        "{}: use_sliding_window=true: sliding-window attention is not supported; only use_sliding_window false",
                        model_type.as_str()
                    )));
                }
            }
            ModelType::Llama => {}
        }
        if let Some(Value::Array(types)) = d.get("layer_types") {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(Error::Config(format!(
                    "layer_types has {t} layers: only full_attention is supported"
                )));
            }
        }
        let act = d.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(Error::Config(format!(
                "hidden_act '{act}' is not supported (only 'silu')"
            )));
        }
        let (rope_theta, rope_scaling) = rope_settings(d)?;
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
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            ModelType::Llama | ModelType::Mistral => {
                let attn = boolean(d, "attention_bias", false)?;
                (attn, attn, boolean(d, "mlp_bias", false)?)
            }
            // Qwen3Attention: attention_bias on all four projections; Qwen3MLP without.
            ModelType::Qwen3 => {
                let attn = boolean(d, "attention_bias", false)?;
                (attn, attn, false)
            }
            // Qwen2Attention: q/k/v with a bias, o_proj without; Qwen2MLP without.
            ModelType::Qwen2 => (true, false, false),
        };
        let cfg = ModelConfig {
            model_type,
            vocab_size: req_int(d, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req_int(d, "intermediate_size")?,
            num_hidden_layers: req_int(d, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: float(d, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: boolean(d, "tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
        };
        if cfg.num_key_value_heads <= 0 || cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads={} is not a multiple of num_key_value_heads={}",
                cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        Ok(cfg)
    }

    /// RoPE's inverse frequencies, `rope_theta^(-2i / head_dim)` for `i < head_dim / 2`, scaled as
    /// `rope_scaling` says; computed in double precision.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| self.rope_theta.powf(-((2 * i) as f64) / hd))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_ctx = original_max_position_embeddings;
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.into_iter()
                    .map(|inv| {
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        let llama = if wavelen > low_wavelen { inv / factor } else { inv };
                        let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                        // not (wavelen < high) and not (wavelen > low), as the reference writes it (NaN: medium).
                        let medium = wavelen.partial_cmp(&high_wavelen) != Some(std::cmp::Ordering::Less)
                            && wavelen.partial_cmp(&low_wavelen) != Some(std::cmp::Ordering::Greater);
                        if medium {
                            smoothed
                        } else {
                            llama
                        }
                    })
                    .collect()
            }
        }
    }

    /// The periods `1 / inv_freq` (float32) that MLX's `fast.rope` takes as `freqs` (angle = position
    /// / period) for a scaled RoPE; `None` without scaling, where `fast.rope` takes `base = rope_theta`.
    pub fn rope_freqs(&self) -> Option<Vec<f32>> {
        match self.rope_scaling {
            RopeScaling::Default => None,
            _ => Some(self.rope_inv_freq().into_iter().map(|f| (1.0 / f) as f32).collect()),
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = if dir.is_dir() {
            dir.join("config.json")
        } else {
            dir.to_path_buf()
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("no config.json at {} ({e})", path.display())))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_value(&v)
    }

    /// The config as transformers 5 writes it (saved with checkpoints): RoPE in `rope_parameters`
    /// (`rope_type`, `rope_theta` and the scaling's keys), as the reference writes it; `from_value`
    /// reads it back as this config.
    pub fn to_hf_value(&self) -> Value {
        let mut rope = serde_json::json!({"rope_type": self.rope_scaling.rope_type(), "rope_theta": self.rope_theta});
        let scaling = match self.rope_scaling {
            RopeScaling::Default => serde_json::json!({}),
            RopeScaling::Linear { factor } => serde_json::json!({"factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({"factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                // An integer, as transformers validates it (it warns on 8192.0).
                "original_max_position_embeddings": if original_max_position_embeddings.fract() == 0.0 {
                    serde_json::json!(original_max_position_embeddings as i64)
                } else {
                    serde_json::json!(original_max_position_embeddings)
                }})
            }
        };
        rope.as_object_mut()
            .unwrap()
            .extend(scaling.as_object().unwrap().clone());
        let mut v = serde_json::json!({
            "model_type": self.model_type.as_str(),
            "architectures": [self.model_type.architecture()],
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        let obj = v.as_object_mut().unwrap();
        match self.model_type {
            ModelType::Llama | ModelType::Mistral => {
                debug_assert_eq!(self.qkv_bias, self.o_bias);
                obj.insert("attention_bias".into(), self.qkv_bias.into());
                obj.insert("mlp_bias".into(), self.mlp_bias.into());
                if self.model_type == ModelType::Mistral {
                    obj.insert("sliding_window".into(), Value::Null);
                }
            }
            ModelType::Qwen2 => {
                obj.insert("use_sliding_window".into(), false.into());
            }
            ModelType::Qwen3 => {
                obj.insert("attention_bias".into(), self.qkv_bias.into());
                obj.insert("use_sliding_window".into(), false.into());
            }
        }
        v
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

    fn base() -> Value {
        serde_json::json!({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4})
    }

    fn with(extra: Value) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    fn err(v: Value) -> String {
        ModelConfig::from_value(&v).unwrap_err().to_string()
    }

    fn llama3() -> Value {
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    }

    #[test]
    fn both_rope_layouts_parse_to_the_same_config() {
        // transformers 5: everything in rope_parameters; transformers 4: rope_theta at the top level and
        // the scaling in rope_scaling (named by rope_type, or by the older key type).
        let mut rope5 = llama3();
        rope5["rope_theta"] = serde_json::json!(500000.0);
        let t5 = ModelConfig::from_value(&with(serde_json::json!({"rope_parameters": rope5}))).unwrap();
        let t4 = ModelConfig::from_value(&with(
            serde_json::json!({"rope_theta": 500000.0, "rope_scaling": llama3()}),
        ))
        .unwrap();
        let mut old = llama3();
        let ty = old.as_object_mut().unwrap().remove("rope_type").unwrap();
        old["type"] = ty;
        let t4_old =
            ModelConfig::from_value(&with(serde_json::json!({"rope_theta": 500000.0, "rope_scaling": old}))).unwrap();
        assert_eq!(t5, t4);
        assert_eq!(t5, t4_old);
        assert_eq!(t5.rope_theta, 500000.0);
        assert_eq!(
            t5.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0
            }
        );
        // Unscaled, both layouts.
        let d5 = ModelConfig::from_value(&with(
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
        ))
        .unwrap();
        let d4 = ModelConfig::from_value(&with(serde_json::json!({"rope_theta": 1e6, "rope_scaling": null}))).unwrap();
        assert_eq!(d5, d4);
        assert_eq!((d5.rope_theta, &d5.rope_scaling), (1e6, &RopeScaling::Default));
        assert_eq!(d5.rope_freqs(), None);
        let lin5 = ModelConfig::from_value(&with(
            serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 2, "rope_theta": 1e4}}),
        ))
        .unwrap();
        let lin4 = ModelConfig::from_value(&with(
            serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
        ))
        .unwrap();
        assert_eq!(lin5, lin4);
        assert_eq!(lin5.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        // Both present: merged key by key, rope_parameters winning (as the reference merges them).
        let both = ModelConfig::from_value(&with(serde_json::json!({"rope_theta": 1.0,
            "rope_scaling": {"type": "linear", "factor": 2.0, "rope_theta": 2.0},
            "rope_parameters": {"factor": 4.0, "rope_theta": 3.0}})))
        .unwrap();
        assert_eq!(
            (both.rope_theta, &both.rope_scaling),
            (3.0, &RopeScaling::Linear { factor: 4.0 })
        );
    }

    #[test]
    fn model_types_and_their_biases() {
        let llama = ModelConfig::from_value(&base()).unwrap();
        assert_eq!(llama.model_type, ModelType::Llama);
        assert_eq!((llama.qkv_bias, llama.o_bias, llama.mlp_bias), (false, false, false));
        let l = ModelConfig::from_value(&with(serde_json::json!({"attention_bias": true, "mlp_bias": true}))).unwrap();
        assert_eq!((l.qkv_bias, l.o_bias, l.mlp_bias), (true, true, true));
        // Mistral: as llama; sliding_window null (or absent) only.
        let m = ModelConfig::from_value(&with(
            serde_json::json!({"model_type": "mistral", "sliding_window": null}),
        ))
        .unwrap();
        assert_eq!(m.model_type, ModelType::Mistral);
        assert_eq!((m.qkv_bias, m.o_bias, m.mlp_bias), (false, false, false));
        let m = ModelConfig::from_value(&with(
            serde_json::json!({"model_type": "mistral", "attention_bias": true}),
        ))
        .unwrap();
        assert_eq!((m.qkv_bias, m.o_bias, m.mlp_bias), (true, true, false));
        // Qwen2: q/k/v with a bias, o_proj and the MLP without, whatever attention_bias says.
        for extra in [
            serde_json::json!({"model_type": "qwen2"}),
            serde_json::json!({"model_type": "qwen2", "attention_bias": true, "use_sliding_window": false,
                "sliding_window": 4096}),
            serde_json::json!({"model_type": "qwen2", "attention_bias": false}),
        ] {
            let q = ModelConfig::from_value(&with(extra)).unwrap();
            assert_eq!(q.model_type, ModelType::Qwen2);
            assert_eq!((q.qkv_bias, q.o_bias, q.mlp_bias), (true, false, false));
        }
    }

    #[test]
    fn unsupported_configs_are_named() {
        let e = err(with(
            serde_json::json!({"model_type": "mistral", "sliding_window": 4096}),
        ));
        assert!(e.contains("sliding_window") && e.contains("not supported"), "{e}");
        let e = err(with(
            serde_json::json!({"model_type": "qwen2", "use_sliding_window": true}),
        ));
        assert!(e.contains("use_sliding_window") && e.contains("not supported"), "{e}");
        let e = err(with(serde_json::json!({"model_type": "gemma"})));
        assert!(e.contains("model_type") && e.contains("'gemma'"), "{e}");
        assert!(
            e.contains("'llama'") && e.contains("'mistral'") && e.contains("'qwen2'"),
            "{e}"
        );
        for ty in ["dynamic", "yarn"] {
            let e = err(with(
                serde_json::json!({"rope_parameters": {"rope_type": ty, "factor": 2.0}}),
            ));
            assert!(e.contains(&format!("'{ty}'")) && e.contains("rope_type"), "{e}");
            let e = err(with(serde_json::json!({"rope_scaling": {"type": ty, "factor": 2.0}})));
            assert!(e.contains(&format!("'{ty}'")), "{e}");
        }
        // A scaling key missing is named.
        for key in [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ] {
            let mut r = llama3();
            r.as_object_mut().unwrap().remove(key);
            let e = err(with(serde_json::json!({"rope_parameters": r})));
            assert!(e.contains(&format!("'{key}'")) && e.contains("llama3"), "{key}: {e}");
        }
        let e = err(with(serde_json::json!({"rope_scaling": {"rope_type": "linear"}})));
        assert!(e.contains("'factor'"), "{e}");
    }

    #[test]
    fn llama3_inverse_frequencies() {
        // head_dim 8, theta 1e4: inv_freq = 1, 0.1, 0.01, 0.001; wavelengths 2pi/inv_freq = 6.28, 62.8,
        // 628, 6283 against low_wavelen 64/1 = 64 and high_wavelen 64/4 = 16: the first kept, the second
        // smoothed (smooth = (64 / 62.83 - 1) / 3), the last two divided by 8. Expected values from plain
        // Python math (python3 -c, the same formula written out independently).
        let cfg = with(
            serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 8,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        );
        let c = ModelConfig::from_value(&cfg).unwrap();
        let expected = [1.0, 0.013042256043820465, 0.00125, 0.000125];
        let got = c.rope_inv_freq();
        assert_eq!(got.len(), 4);
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() <= 1e-15 * e, "{got:?} vs {expected:?}");
        }
        let periods = c.rope_freqs().unwrap();
        let want = [1.0f32, 76.67385126009765f64 as f32, 800.0, 8000.0];
        for (g, e) in periods.iter().zip(want) {
            assert!((g - e).abs() <= 1e-6 * e, "{periods:?} vs {want:?}");
        }
        // Unscaled inverse frequencies are theta^(-2i/d); linear divides them by the factor.
        let d = ModelConfig::from_value(&with(serde_json::json!({"head_dim": 8, "rope_theta": 10000.0}))).unwrap();
        for (g, e) in d.rope_inv_freq().iter().zip([1.0, 0.1, 0.01, 0.001]) {
            assert!((g - e).abs() <= 1e-15, "{g} vs {e}");
        }
        let l = ModelConfig::from_value(&with(
            serde_json::json!({"head_dim": 8, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ))
        .unwrap();
        for (g, e) in l.rope_inv_freq().iter().zip([0.25, 0.025, 0.0025, 0.00025]) {
            assert!((g - e).abs() <= 1e-15, "{g} vs {e}");
        }
        assert_eq!(l.rope_freqs().unwrap(), vec![4.0f32, 40.0, 400.0, 4000.0]);
    }

    #[test]
    fn the_saved_config_reads_back_as_itself() {
        for extra in [
            serde_json::json!({"attention_bias": true, "rope_theta": 5e5}),
            serde_json::json!({"model_type": "mistral", "mlp_bias": true,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
            serde_json::json!({"model_type": "qwen2", "tie_word_embeddings": true, "rope_parameters": llama3()}),
        ] {
            let c = ModelConfig::from_value(&with(extra)).unwrap();
            let v = c.to_hf_value();
            assert_eq!(v["model_type"], c.model_type.as_str());
            assert_eq!(v["rope_parameters"]["rope_type"], c.rope_scaling.rope_type());
            assert!(v.get("rope_theta").is_none() && v.get("rope_scaling").is_none());
            if let RopeScaling::Llama3 { .. } = c.rope_scaling {
                assert_eq!(
                    v["rope_parameters"]["original_max_position_embeddings"],
                    serde_json::json!(64)
                );
            }
            assert_eq!(ModelConfig::from_value(&v).unwrap(), c);
        }
    }

    #[test]
    fn rejects_bad_gqa() {
        let v = serde_json::json!({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3});
        assert!(ModelConfig::from_value(&v).is_err());
    }
}
