//! Fixtures of the unit tests: a tiny checkpoint, a batch, settings, temporary folders.
use std::{collections::HashMap, path::Path};

use mlx_rs::{module::ModuleParameters, Array, Dtype};
use serde_json::json;

use crate::{
    config::ModelConfig,
    data::Batch,
    model::{uniform, LlamaForCausalLM},
    settings::TrainSettings,
    trainer::{host_vec, Trainer},
};

/// A tiny checkpoint written with mlx-rs itself: hidden 16, 2 layers, 4 heads on 2 kv heads.
pub fn tiny_checkpoint(dir: &Path, tied: bool) {
    let cfg = json!({"model_type": "llama", "vocab_size": 24, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied});
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let c = ModelConfig::from_value(&cfg).unwrap();
    let model = LlamaForCausalLM::new(&c, 42).unwrap();
    let params: Vec<(String, Array)> = model
        .parameters()
        .flatten()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut tensors: Vec<(String, Array)> = params;
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        uniform(1, 1.0, &[2]).unwrap(),
    ));
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        dir.join("model.safetensors"),
    )
    .unwrap();
}

pub fn batch() -> Batch {
    let ids: Vec<i32> = (0..16).map(|i| (i * 7 + 3) % 24).collect();
    let mask: Vec<f64> = vec![1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.];
    Batch::new(ids, &[2, 8], mask, &[2, 8], vec![0.3, 0.9], &[2], vec![0.5, 1.25], &[2]).unwrap()
}

/// A fresh directory removed when the returned guard drops.
pub fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("parity-mlx-rs-test-{name}-"))
        .tempdir()
        .unwrap()
}

pub fn settings(extra: &str) -> TrainSettings {
    TrainSettings::from_json(&format!(
        r#"{{"schedule": {{"kind": "warmup_cosine", "warmup_steps": 2, "warmup_init": 1e-4, "decay_steps": 4, "end_lr": 0.0}},
            "clip_norm": 1.0, "accum_steps": 2, "steps": 4, "checkpoint_at": 2 {extra}}}"#
    ))
    .unwrap()
}

pub fn flat(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.parameters()
        .into_iter()
        .map(|(k, v)| (k, host_vec::<f32>(&v).unwrap()))
        .collect()
}

/// `settings` under `"precision": "bfloat16"`, plus `extra`.
pub fn bf16(extra: &str) -> TrainSettings {
    settings(&format!(r#", "precision": "bfloat16" {extra}"#))
}

/// Every parameter's dtype, by name.
pub fn dtypes(t: &Trainer) -> HashMap<String, Dtype> {
    t.parameters().into_iter().map(|(k, v)| (k, v.dtype())).collect()
}
