//! The parameters the config implies, filled from a Hugging Face checkpoint (one file or shards) and, for
//! LoRA, from the request's initial adapters; what did not fit goes in the load report.

use std::collections::BTreeMap;
use std::path::Path;

use parity_adapter::{read_tensors, LoadReport, Tensor};

use crate::config::ModelConfig;
use crate::settings::{Settings, Trainable};
use crate::{fail, Result};

/// The projections LoRA adapts.
pub const ADAPTED: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// Every parameter the config implies, by checkpoint name, with its shape.
pub fn expected(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, d, q, kv, i) = (
        cfg.hidden,
        cfg.head_dim,
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.intermediate,
    );
    let mut out = BTreeMap::new();
    out.insert("model.embed_tokens.weight".into(), vec![cfg.vocab, h]);
    out.insert("model.norm.weight".into(), vec![h]);
    if !cfg.tied {
        out.insert("lm_head.weight".into(), vec![cfg.vocab, h]);
    }
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        let projections = [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
        ];
        for (name, out_dim, in_dim) in projections {
            out.insert(format!("{p}.{name}.weight"), vec![out_dim, in_dim]);
            if cfg.qkv_bias {
                out.insert(format!("{p}.{name}.bias"), vec![out_dim]);
            }
        }
        out.insert(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        if cfg.o_bias {
            out.insert(format!("{p}.self_attn.o_proj.bias"), vec![h]);
        }
        if cfg.qk_norm {
            out.insert(format!("{p}.self_attn.q_norm.weight"), vec![d]);
            out.insert(format!("{p}.self_attn.k_norm.weight"), vec![d]);
        }
        for (name, out_dim, in_dim) in [("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i)] {
            out.insert(format!("{p}.{name}.weight"), vec![out_dim, in_dim]);
            if cfg.mlp_bias {
                out.insert(format!("{p}.{name}.bias"), vec![out_dim]);
            }
        }
        out.insert(format!("{p}.input_layernorm.weight"), vec![h]);
        out.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
    }
    out
}

/// The adapters of q/k/v/o in the last `layers` layers, `<module>.lora_a` [in, r] and `.lora_b` [r, out].
pub fn adapters(cfg: &ModelConfig, settings: &Settings) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let Some(lora) = settings.lora.as_ref().filter(|_| settings.trainable == Trainable::Lora) else {
        return out;
    };
    let shapes = expected(cfg);
    for l in cfg.layers.saturating_sub(lora.layers)..cfg.layers {
        for m in ADAPTED {
            let module = format!("model.layers.{l}.self_attn.{m}");
            let w = &shapes[&format!("{module}.weight")];
            out.insert(format!("{module}.lora_a"), vec![w[1], lora.rank]);
            out.insert(format!("{module}.lora_b"), vec![lora.rank, w[0]]);
        }
    }
    out
}

/// Every tensor of the checkpoint folder's safetensors files (one, or the shards), float32.
pub fn read_checkpoint(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| fail(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(fail(format!("no .safetensors file in {}", dir.display())));
    }
    let mut out = BTreeMap::new();
    for f in files {
        out.extend(read_tensors(&f)?);
    }
    Ok(out)
}

/// The parameters filled from `source` where name and shape match, else zero, and what did not fit.
pub fn fill(
    shapes: &BTreeMap<String, Vec<usize>>,
    mut source: BTreeMap<String, Tensor>,
    report: &mut LoadReport,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, shape) in shapes {
        let t = match source.remove(name) {
            Some(t) if &t.shape == shape => t,
            Some(t) => {
                report
                    .mismatched
                    .push(format!("{name}: checkpoint {:?} vs model {shape:?}", t.shape));
                zeros(shape)?
            }
            None => {
                report.missing.push(name.clone());
                zeros(shape)?
            }
        };
        out.insert(name.clone(), t);
    }
    for key in source.into_keys() {
        if key.ends_with("rotary_emb.inv_freq") {
            report.ignored.push(key);
        } else {
            report.unexpected.push(key);
        }
    }
    Ok(out)
}

fn zeros(shape: &[usize]) -> Result<Tensor> {
    Tensor::f32(shape.to_vec(), vec![0.0; shape.iter().product()])
}

/// Fresh adapters where the request gives none: lora_a ~ U(−1/√in, 1/√in) from a fixed seed, lora_b = 0.
pub fn fresh_adapters(shapes: &BTreeMap<String, Vec<usize>>) -> Result<BTreeMap<String, Tensor>> {
    let mut state: u64 = 0x5eed_ca4d_1e00;
    let mut uniform = move || {
        // splitmix64: deterministic across processes and machines
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    shapes
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = if name.ends_with("lora_a") {
                let bound = 1.0 / (shape[0] as f64).sqrt();
                (0..n).map(|_| ((2.0 * uniform() - 1.0) * bound) as f32).collect()
            } else {
                vec![0.0; n]
            };
            Ok((name.clone(), Tensor::f32(shape.clone(), values)?))
        })
        .collect()
}
