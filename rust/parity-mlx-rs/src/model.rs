//! The Llama module tree, named exactly like a Hugging Face checkpoint
//! (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), built from mlx-rs modules.
//!
//! Every operation mirrors the MLX reference (`reference/model.py`) op for op, so that float32 results
//! agree to the last bits where MLX's kernels allow: `x @ W.T (+ b)`, `mx.fast.rms_norm`,
//! `mx.fast.rope` (non-traditional), `mx.fast.scaled_dot_product_attention` with a causal mask,
//! `silu(x) = x * sigmoid(x)`.
use mlx_rs::{
    error::Exception,
    fast::{self, ScaledDotProductAttentionMask},
    macros::ModuleParameters,
    module::{ModuleParameters as _, Param},
    ops, random, Array,
};

use crate::config::ModelConfig;

type R<T> = std::result::Result<T, Exception>;

/// Seeded uniform initialisation, `U(-bound, bound)`, from an explicit key (never MLX's global
/// generator, which the Python side shares in the same process).
pub fn uniform(seed: u64, bound: f32, shape: &[i32]) -> R<Array> {
    let key = random::key(seed)?;
    random::uniform::<_, f32>(-bound, bound, shape, Some(&key))
}

/// `y = x W^T (+ b)`, with an optional LoRA adapter `+ scale * (x @ lora_a) @ lora_b`.
#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct Linear {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub bias: Param<Option<Array>>,
    #[param]
    pub lora_a: Param<Option<Array>>,
    #[param]
    pub lora_b: Param<Option<Array>>,
    pub lora_scale: Option<f32>,
}

impl Linear {
    pub fn new(in_dims: i32, out_dims: i32, bias: bool, seed: u64) -> R<Self> {
        let bound = 1.0 / (in_dims as f32).sqrt();
        Ok(Linear {
            weight: Param::new(uniform(seed, bound, &[out_dims, in_dims])?),
            bias: Param::new(if bias { Some(Array::zeros::<f32>(&[out_dims])?) } else { None }),
            lora_a: Param::new(None),
            lora_b: Param::new(None),
            lora_scale: None,
        })
    }

    pub fn in_dims(&self) -> i32 {
        self.weight.value.shape()[1]
    }

    pub fn out_dims(&self) -> i32 {
        self.weight.value.shape()[0]
    }

    /// A fresh adapter: `lora_a ~ U(-1/sqrt(in), 1/sqrt(in))` of shape `[in, rank]`, `lora_b = 0`.
    pub fn add_lora(&mut self, rank: i32, scale: f32, seed: u64) -> R<()> {
        let (i, o) = (self.in_dims(), self.out_dims());
        let bound = 1.0 / (i as f32).sqrt();
        self.lora_a = Param::new(Some(uniform(seed, bound, &[i, rank])?));
        self.lora_b = Param::new(Some(Array::zeros::<f32>(&[rank, o])?));
        self.lora_scale = Some(scale);
        Ok(())
    }

    pub fn forward(&self, x: &Array) -> R<Array> {
        let mut y = ops::matmul(x, self.weight.value.t())?;
        if let Some(b) = &self.bias.value {
            y = ops::add(&y, b)?;
        }
        if let (Some(s), Some(a), Some(b)) = (self.lora_scale, &self.lora_a.value, &self.lora_b.value) {
            let low = ops::matmul(ops::matmul(x, a)?, b)?;
            y = ops::add(&y, ops::multiply(Array::from_f32(s), &low)?)?;
        }
        Ok(y)
    }
}

/// `mx.fast.rms_norm(x, weight, eps)`.
#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct RmsNorm {
    #[param]
    pub weight: Param<Array>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(dims: i32, eps: f64) -> R<Self> {
        Ok(RmsNorm { weight: Param::new(Array::ones::<f32>(&[dims])?), eps: eps as f32 })
    }

    pub fn forward(&self, x: &Array) -> R<Array> {
        fast::rms_norm(x, Some(&self.weight.value), self.eps)
    }
}

/// `weight[ids]`; `as_linear(x) = x @ weight.T` for tied heads.
#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct Embedding {
    #[param]
    pub weight: Param<Array>,
}

impl Embedding {
    pub fn new(vocab: i32, dims: i32, seed: u64) -> R<Self> {
        let scale = (1.0 / dims as f32).sqrt();
        let key = random::key(seed)?;
        let w = random::normal::<f32>(&[vocab, dims], None, None, Some(&key))?;
        Ok(Embedding { weight: Param::new(ops::multiply(&w, Array::from_f32(scale))?) })
    }

    pub fn forward(&self, ids: &Array) -> R<Array> {
        self.weight.value.take_axis(ids, 0)
    }

    pub fn as_linear(&self, x: &Array) -> R<Array> {
        ops::matmul(x, self.weight.value.t())
    }
}

#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct Attention {
    #[param]
    pub q_proj: Linear,
    #[param]
    pub k_proj: Linear,
    #[param]
    pub v_proj: Linear,
    #[param]
    pub o_proj: Linear,
    pub n_heads: i32,
    pub n_kv: i32,
    pub head_dim: i32,
    pub rope_theta: f32,
}

impl Attention {
    fn new(cfg: &ModelConfig, seed: &mut u64) -> R<Self> {
        let (d, b, hd) = (cfg.hidden_size, cfg.attention_bias, cfg.head_dim);
        let mut next = || {
            *seed += 1;
            *seed
        };
        Ok(Attention {
            q_proj: Linear::new(d, cfg.num_attention_heads * hd, b, next())?,
            k_proj: Linear::new(d, cfg.num_key_value_heads * hd, b, next())?,
            v_proj: Linear::new(d, cfg.num_key_value_heads * hd, b, next())?,
            o_proj: Linear::new(cfg.num_attention_heads * hd, d, b, next())?,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: hd,
            rope_theta: cfg.rope_theta as f32,
        })
    }

    fn forward(&self, x: &Array) -> R<Array> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32| -> R<Array> {
            y.reshape(&[b, t, n, self.head_dim])?.transpose_axes(&[0, 2, 1, 3])
        };
        let q = heads(self.q_proj.forward(x)?, self.n_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.n_kv)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv)?;
        // RoPE reads positions from axis -2, hence [B, H, T, D]; the fused attention shares kv heads.
        let q = fast::rope(&q, self.head_dim, false, self.rope_theta, 1.0, 0, None)?;
        let k = fast::rope(&k, self.head_dim, false, self.rope_theta, 1.0, 0, None)?;
        let scale = (self.head_dim as f64).powf(-0.5) as f32;
        let o = fast::scaled_dot_product_attention(&q, &k, &v, scale, ScaledDotProductAttentionMask::Causal, None)?;
        let o = o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, t, -1])?;
        self.o_proj.forward(&o)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct Mlp {
    #[param]
    pub gate_proj: Linear,
    #[param]
    pub up_proj: Linear,
    #[param]
    pub down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &ModelConfig, seed: &mut u64) -> R<Self> {
        let (d, f, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        *seed += 3;
        Ok(Mlp {
            gate_proj: Linear::new(d, f, b, *seed - 2)?,
            up_proj: Linear::new(d, f, b, *seed - 1)?,
            down_proj: Linear::new(f, d, b, *seed)?,
        })
    }

    fn forward(&self, x: &Array) -> R<Array> {
        let g = self.gate_proj.forward(x)?;
        let silu = ops::multiply(&g, ops::sigmoid(&g)?)?;
        self.down_proj.forward(&ops::multiply(&silu, self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct DecoderLayer {
    #[param]
    pub self_attn: Attention,
    #[param]
    pub mlp: Mlp,
    #[param]
    pub input_layernorm: RmsNorm,
    #[param]
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, seed: &mut u64) -> R<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::new(cfg, seed)?,
            mlp: Mlp::new(cfg, seed)?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps)?,
        })
    }

    fn forward(&self, h: &Array) -> R<Array> {
        let h = ops::add(h, self.self_attn.forward(&self.input_layernorm.forward(h)?)?)?;
        ops::add(&h, self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct LlamaModel {
    #[param]
    pub embed_tokens: Embedding,
    #[param]
    pub layers: Vec<DecoderLayer>,
    #[param]
    pub norm: RmsNorm,
}

#[derive(Debug, Clone, ModuleParameters)]
#[module(root = mlx_rs)]
pub struct LlamaForCausalLM {
    #[param]
    pub model: LlamaModel,
    #[param]
    pub lm_head: Option<Linear>,
    pub tie_word_embeddings: bool,
}

impl LlamaForCausalLM {
    /// A randomly initialised model (seeded); weights come from `weights::load`.
    pub fn new(cfg: &ModelConfig, seed: u64) -> R<Self> {
        let mut s = seed.wrapping_mul(1_000_003);
        let embed_tokens = Embedding::new(cfg.vocab_size, cfg.hidden_size, s)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::new(cfg, &mut s)?);
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            s += 1;
            Some(Linear::new(cfg.hidden_size, cfg.vocab_size, false, s)?)
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel { embed_tokens, layers, norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps)? },
            lm_head,
            tie_word_embeddings: cfg.tie_word_embeddings,
        })
    }

    /// Logits and the residual stream after each decoder layer (before the final norm).
    pub fn forward_with_hidden(&self, ids: &Array) -> R<(Array, Vec<Array>)> {
        let mut h = self.model.embed_tokens.forward(ids)?;
        let mut hidden = Vec::with_capacity(self.model.layers.len());
        for layer in &self.model.layers {
            h = layer.forward(&h)?;
            hidden.push(h.clone());
        }
        let h = self.model.norm.forward(&h)?;
        let logits = match &self.lm_head {
            Some(head) if !self.tie_word_embeddings => head.forward(&h)?,
            _ => self.model.embed_tokens.as_linear(&h)?,
        };
        Ok((logits, hidden))
    }

    pub fn forward(&self, ids: &Array) -> R<Array> {
        Ok(self.forward_with_hidden(ids)?.0)
    }

    /// Adapt q/k/v/o of the last `layers` layers; returns the adapter parameter names.
    pub fn add_lora(&mut self, layers: i32, rank: i32, scale: f32, seed: u64) -> R<Vec<String>> {
        let n = self.model.layers.len() as i32;
        if !(1 <= layers && layers <= n) {
            return Err(Exception::custom(format!("lora.layers must be in 1..{n}, got {layers}")));
        }
        let mut names = Vec::new();
        let mut s = seed.wrapping_mul(7_919).wrapping_add(17);
        for i in (n - layers)..n {
            let attn = &mut self.model.layers[i as usize].self_attn;
            for (proj, lin) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                s += 1;
                lin.add_lora(rank, scale, s)?;
                names.push(format!("model.layers.{i}.self_attn.{proj}.lora_a"));
                names.push(format!("model.layers.{i}.self_attn.{proj}.lora_b"));
            }
        }
        Ok(names)
    }

    /// Parameter names in the reference's module-tree order (MLX `tree_flatten` order), used where
    /// the order of a floating-point sum matters (the global gradient norm).
    pub fn ordered_names(&self) -> Vec<String> {
        let mut out = vec!["model.embed_tokens.weight".to_string()];
        let lin = |out: &mut Vec<String>, p: String, l: &Linear| {
            out.push(format!("{p}.weight"));
            if l.bias.value.is_some() {
                out.push(format!("{p}.bias"));
            }
            if l.lora_a.value.is_some() {
                out.push(format!("{p}.lora_a"));
                out.push(format!("{p}.lora_b"));
            }
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            for (n, l) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                lin(&mut out, format!("{p}.self_attn.{n}"), l);
            }
            let m = &layer.mlp;
            for (n, l) in [("gate_proj", &m.gate_proj), ("up_proj", &m.up_proj), ("down_proj", &m.down_proj)] {
                lin(&mut out, format!("{p}.mlp.{n}"), l);
            }
            out.push(format!("{p}.input_layernorm.weight"));
            out.push(format!("{p}.post_attention_layernorm.weight"));
        }
        out.push("model.norm.weight".into());
        if let Some(h) = &self.lm_head {
            lin(&mut out, "lm_head".into(), h);
        }
        debug_assert_eq!(out.len(), self.parameters().flatten().len());
        out
    }
}
