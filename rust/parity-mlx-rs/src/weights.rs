//! Checkpoint keys → parameters, and strict loading of Hugging Face safetensors (single or sharded).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    rc::Rc,
};

use mlx_rs::{module::ModuleParameters, Array, Dtype};
use serde_json::Value;

use crate::{
    config::ModelConfig,
    error::{Error, Result},
    model::LlamaForCausalLM,
};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Parameters no checkpoint key fills.
    pub missing: Vec<String>,
    /// Checkpoint keys that fill no parameter.
    pub unexpected: Vec<String>,
    /// `"key: checkpoint (4, 8) float16, model (8, 4) float32"`.
    pub mismatched: Vec<String>,
    /// Rotary buffers (`rotary_emb.inv_freq`), skipped.
    pub ignored: Vec<String>,
}

impl LoadReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        for (title, items) in [
            ("missing", &self.missing),
            ("unexpected", &self.unexpected),
            ("mismatched", &self.mismatched),
        ] {
            if !items.is_empty() {
                lines.push(format!("  {title} ({}): {}", items.len(), items.join(", ")));
            }
        }
        if lines.is_empty() {
            "  all keys matched".into()
        } else {
            lines.join("\n")
        }
    }
}

/// Checkpoint key → parameter name for every parameter a checkpoint must provide (the explicit map;
/// our module tree is named like the checkpoint, so it is the identity on the keys it lists).
pub fn name_map(cfg: &ModelConfig) -> BTreeMap<String, String> {
    let mut keys = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    if !cfg.tie_word_embeddings {
        keys.push("lm_head.weight".into());
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        for (proj, bias) in [
            ("q_proj", cfg.qkv_bias),
            ("k_proj", cfg.qkv_bias),
            ("v_proj", cfg.qkv_bias),
            ("o_proj", cfg.o_bias),
        ] {
            keys.push(format!("{p}self_attn.{proj}.weight"));
            if bias {
                keys.push(format!("{p}self_attn.{proj}.bias"));
            }
        }
        if cfg.qk_norm() {
            keys.push(format!("{p}self_attn.q_norm.weight"));
            keys.push(format!("{p}self_attn.k_norm.weight"));
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            keys.push(format!("{p}mlp.{proj}.weight"));
            if cfg.mlp_bias {
                keys.push(format!("{p}mlp.{proj}.bias"));
            }
        }
        keys.push(format!("{p}input_layernorm.weight"));
        keys.push(format!("{p}post_attention_layernorm.weight"));
    }
    keys.into_iter().map(|k| (k.clone(), k)).collect()
}

fn is_ignored(key: &str) -> bool {
    key == "rotary_emb.inv_freq" || key.ends_with(".rotary_emb.inv_freq")
}

/// The safetensors files of a checkpoint folder: `model.safetensors` or the shards of its index.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Weights(format!("{} is not a valid shard index: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::Weights(format!("{} is not a valid shard index: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        files.sort();
        let absent: Vec<String> = files
            .iter()
            .filter(|f| !f.exists())
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        if !absent.is_empty() {
            return Err(Error::Io(format!(
                "{} names shards that are not there: {}",
                index.display(),
                absent.join(", ")
            )));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Io(format!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )))
}

pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Array>> {
    Array::load_safetensors(path)
        .map_err(|e| Error::Weights(format!("{}: not a readable safetensors file ({e})", path.display())))
}

/// Every tensor of a checkpoint folder, by key.
pub fn read_checkpoint(dir: &Path) -> Result<HashMap<String, Array>> {
    let mut tensors = HashMap::new();
    for f in checkpoint_files(dir)? {
        let part = read_safetensors(&f)?;
        let mut dup: Vec<&String> = part.keys().filter(|k| tensors.contains_key(*k)).collect();
        if !dup.is_empty() {
            dup.sort();
            return Err(Error::Weights(format!(
                "{}: keys also present in another shard: {dup:?}",
                f.display()
            )));
        }
        tensors.extend(part);
    }
    Ok(tensors)
}

/// The dtypes a checkpoint stores weights in: any of them loads into a float32 parameter.
fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 | Dtype::Float64)
}

pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "bool",
        Dtype::Uint8 => "uint8",
        Dtype::Uint16 => "uint16",
        Dtype::Uint32 => "uint32",
        Dtype::Uint64 => "uint64",
        Dtype::Int8 => "int8",
        Dtype::Int16 => "int16",
        Dtype::Int32 => "int32",
        Dtype::Int64 => "int64",
        Dtype::Float16 => "float16",
        Dtype::Float32 => "float32",
        Dtype::Float64 => "float64",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Complex64 => "complex64",
    }
}

/// A shape as Python prints a tuple: `(4, 8)`, `(8,)`, `()`.
pub fn shape_str(shape: &[i32]) -> String {
    match shape {
        [] => "()".into(),
        [a] => format!("({a},)"),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Pair checkpoint tensors with model parameters through the name map; report every problem.
pub fn match_tensors(
    model: &LlamaForCausalLM,
    tensors: HashMap<String, Array>,
    cfg: &ModelConfig,
) -> (HashMap<Rc<str>, Array>, LoadReport) {
    let nmap = name_map(cfg);
    let params = model.parameters().flatten();
    let mut report = LoadReport::default();
    let mut loaded: HashMap<Rc<str>, Array> = HashMap::new();
    let mut mismatched_keys = HashSet::new();
    let mut keys: Vec<String> = tensors.keys().cloned().collect();
    keys.sort();
    let mut tensors = tensors;
    for key in keys {
        if is_ignored(&key) {
            report.ignored.push(key);
            continue;
        }
        let target = match nmap.get(&key) {
            Some(t) if params.contains_key(t.as_str()) => t,
            _ => {
                report.unexpected.push(key);
                continue;
            }
        };
        let t = tensors.remove(&key).unwrap();
        let p = params[target.as_str()];
        if t.shape() != p.shape() || !(is_float(t.dtype()) && is_float(p.dtype())) {
            report.mismatched.push(format!(
                "{key}: checkpoint {} {}, model {} {}",
                shape_str(t.shape()),
                dtype_name(t.dtype()),
                shape_str(p.shape()),
                dtype_name(p.dtype())
            ));
            mismatched_keys.insert(key);
            continue;
        }
        // bfloat16 and float16 checkpoints load into the float32 parameters (master weights): exact.
        let t = if t.dtype() == p.dtype() {
            t
        } else {
            t.as_dtype(p.dtype()).expect("a float cast")
        };
        loaded.insert(Rc::from(target.as_str()), t);
    }
    let mut missing: Vec<String> = nmap
        .values()
        .filter(|v| !loaded.contains_key(v.as_str()) && !mismatched_keys.contains(*v))
        .cloned()
        .collect();
    missing.sort();
    report.missing = missing;
    (loaded, report)
}
