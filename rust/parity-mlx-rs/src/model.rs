//! The Llama module tree, named exactly like a Hugging Face checkpoint
//! (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), built from mlx-rs modules.
//!
//! Every operation mirrors the MLX reference (`reference/model.py`) op for op, so that float32 results
//! agree to the last bits where MLX's kernels allow: `x @ W.T (+ b)`, `mx.fast.rms_norm`,
//! `mx.fast.rope` (non-traditional), attention written out (scores, causal softmax, mix; kv heads
//! repeated for the query heads), `silu(x) = x * sigmoid(x)`. The forward pass and its pieces (the
//! isolated forward check, `pieces`) share these functions.
use std::collections::HashMap;

use mlx_rs::{
    error::Exception,
    fast,
    macros::ModuleParameters,
    module::{ModuleParameters as _, Param},
    ops, random, Array, Dtype,
};

use crate::config::ModelConfig;

type R<T> = std::result::Result<T, Exception>;

/// A Python float scalar in an MLX op with `like`: MLX converts it to `like`'s dtype (a weak scalar,
/// it does not promote), rounding the float32 value (`float(x)`, then bfloat16 for a bfloat16 `like`).
/// For float32 it is `Array::from_f32(x)` itself, so float32 results stay exactly what they were.
pub fn scalar_like(x: f32, like: &Array) -> R<Array> {
    let s = Array::from_f32(x);
    match like.dtype() {
        Dtype::Float32 => Ok(s),
        d @ (Dtype::Bfloat16 | Dtype::Float16) => s.as_dtype(d),
        _ => Ok(s),
    }
}

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
            bias: Param::new(if bias {
                Some(Array::zeros::<f32>(&[out_dims])?)
            } else {
                None
            }),
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

    /// With an adapter: `y + (scale * ((x @ lora_a) @ lora_b)).astype(y.dtype)`. The adapter path is
    /// float32 (float32 adapters promote a bfloat16 `x`); under bfloat16 its sum is rounded to `y`'s
    /// bfloat16 before the add (mlx-lm's LoRALinear); under float32 the cast is no op and is skipped.
    pub fn forward(&self, x: &Array) -> R<Array> {
        let mut y = ops::matmul(x, self.weight.value.t())?;
        if let Some(b) = &self.bias.value {
            y = ops::add(&y, b)?;
        }
        if let (Some(s), Some(a), Some(b)) = (self.lora_scale, &self.lora_a.value, &self.lora_b.value) {
            let low = ops::matmul(ops::matmul(x, a)?, b)?;
            let mut z = ops::multiply(Array::from_f32(s), &low)?;
            if z.dtype() != y.dtype() {
                z = z.as_dtype(y.dtype())?;
            }
            y = ops::add(&y, z)?;
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
        Ok(RmsNorm {
            weight: Param::new(Array::ones::<f32>(&[dims])?),
            eps: eps as f32,
        })
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
        Ok(Embedding {
            weight: Param::new(ops::multiply(&w, Array::from_f32(scale))?),
        })
    }

    pub fn forward(&self, ids: &Array) -> R<Array> {
        self.weight.value.take_axis(ids, 0)
    }

    pub fn as_linear(&self, x: &Array) -> R<Array> {
        ops::matmul(x, self.weight.value.t())
    }
}

/// Pieces of the forward pass by name (`harness/pieces.py`): `embed`, `layer.{i}.<piece>`, `head.norm`,
/// `head.logits`; inside one layer the bare piece names, with `input` the residual entering it.
pub type Pieces = HashMap<String, Array>;

/// The pieces of one decoder layer, in the order the layer computes them.
pub const LAYER_PIECES: [&str; 16] = [
    "input_norm",
    "q",
    "k",
    "v",
    "q_rope",
    "k_rope",
    "scores",
    "probs",
    "attn",
    "o_proj",
    "post_norm",
    "gate",
    "up",
    "act",
    "down",
    "output",
];

/// The layer pieces that the pieces computed from given values read: all but the last two, `down`
/// (only the own chain's `output` reads it) and `output` (the model reads it as the next layer's `input`).
const LAYER_PIECES_READ: &[&str] = LAYER_PIECES.split_at(LAYER_PIECES.len() - 2).0;

/// `p[key]`; a missing key is an error naming `{prefix}{key}`.
fn lookup<'a>(p: &'a Pieces, prefix: &str, key: &str) -> R<&'a Array> {
    p.get(key)
        .ok_or_else(|| Exception::custom(format!("the given pieces lack '{prefix}{key}'")))
}

/// One layer's pieces as they are computed: each reads its inputs from the own chain, or from the given
/// values when there are any (`x = own if given is None else given` in the reference).
struct Chain<'g> {
    own: Pieces,
    given: Option<&'g Pieces>,
    /// The layer's name prefix (`layer.{i}.`), for errors.
    prefix: &'g str,
}

impl Chain<'_> {
    fn x(&self, key: &str) -> R<&Array> {
        lookup(self.given.unwrap_or(&self.own), self.prefix, key)
    }

    fn put(&mut self, key: &str, value: Array) {
        self.own.insert(key.to_string(), value);
    }
}

/// Causal self-attention in the pieces the isolated checks judge one by one: project, rotate, score,
/// weigh, mix. Written out rather than fused (as the reference is), so each piece is a value.
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
    /// Qwen3's per-head norms of the queries and keys (`ModelConfig::qk_norm`).
    #[param]
    pub q_norm: Option<RmsNorm>,
    #[param]
    pub k_norm: Option<RmsNorm>,
    pub n_heads: i32,
    pub n_kv: i32,
    pub head_dim: i32,
    pub rope_theta: f32,
    /// A scaled RoPE's periods (`1 / inv_freq`, `[head_dim / 2]` float32), which `fast::rope` takes as
    /// `freqs` in place of `base`; `None` for the unscaled RoPE of base `rope_theta`.
    pub rope_freqs: Option<Array>,
}

impl Attention {
    fn new(cfg: &ModelConfig, seed: &mut u64) -> R<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qkv_b, o_b) = (cfg.qkv_bias, cfg.o_bias);
        let mut next = || {
            *seed += 1;
            *seed
        };
        Ok(Attention {
            q_proj: Linear::new(d, cfg.num_attention_heads * hd, qkv_b, next())?,
            k_proj: Linear::new(d, cfg.num_key_value_heads * hd, qkv_b, next())?,
            v_proj: Linear::new(d, cfg.num_key_value_heads * hd, qkv_b, next())?,
            o_proj: Linear::new(cfg.num_attention_heads * hd, d, o_b, next())?,
            q_norm: if cfg.qk_norm() {
                Some(RmsNorm::new(hd, cfg.rms_norm_eps)?)
            } else {
                None
            },
            k_norm: if cfg.qk_norm() {
                Some(RmsNorm::new(hd, cfg.rms_norm_eps)?)
            } else {
                None
            },
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: hd,
            rope_theta: cfg.rope_theta as f32,
            rope_freqs: cfg.rope_freqs().map(|f| Array::from_slice(&f, &[hd / 2])),
        })
    }

    /// `head_dim ** -0.5`, computed in double precision as Python does, then rounded to float32.
    pub fn scale(&self) -> f32 {
        (self.head_dim as f64).powf(-0.5) as f32
    }

    /// `[B, T, n * D]` -> `[B, n, T, D]`.
    fn heads(&self, y: &Array, n: i32) -> R<Array> {
        let (b, t) = (y.shape()[0], y.shape()[1]);
        y.reshape(&[b, t, n, self.head_dim])?.transpose_axes(&[0, 2, 1, 3])
    }

    /// q `[B, H, T, D]`, k and v `[B, K, T, D]`; with Qwen3's norms q and k each head normed over D.
    pub fn project(&self, x: &Array) -> R<(Array, Array, Array)> {
        let mut q = self.heads(&self.q_proj.forward(x)?, self.n_heads)?;
        let mut k = self.heads(&self.k_proj.forward(x)?, self.n_kv)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        Ok((q, k, self.heads(&self.v_proj.forward(x)?, self.n_kv)?))
    }

    /// Non-traditional RoPE (HF's rotate_half), offset 0: base `rope_theta`, or for a scaled RoPE
    /// (linear, llama3) no base and the scaled periods as `freqs` (MLX takes exactly one of the two).
    /// It reads positions from axis -2, hence `[B, heads, T, D]`.
    pub fn rope(&self, x: &Array) -> R<Array> {
        match &self.rope_freqs {
            None => fast::rope(x, self.head_dim, false, self.rope_theta, 1.0, 0, None),
            Some(freqs) => fast::rope(x, self.head_dim, false, None::<f32>, 1.0, 0, freqs),
        }
    }

    /// Query head h reads kv head `h / (H / K)`: each kv head repeated, not the heads tiled.
    pub fn kv_for_queries(&self, kv: &Array) -> R<Array> {
        Array::repeat_axis::<f32>(kv.clone(), self.n_heads / self.n_kv, 1)
    }

    /// `scale * q k^T`, `[B, H, T, T]`, before the mask; `scale` a Python float (q's dtype).
    pub fn scores(&self, q: &Array, k: &Array) -> R<Array> {
        let q = ops::multiply(q, scalar_like(self.scale(), q)?)?;
        ops::matmul(&q, self.kv_for_queries(k)?.transpose_axes(&[0, 1, 3, 2])?)
    }

    /// Softmax over keys with the causal mask: query t sees keys 0..=t.
    pub fn probs(scores: &Array) -> R<Array> {
        let t = scores.shape()[scores.ndim() - 1];
        let pos = Array::arange::<_, i32>(None, t, None)?;
        let causal = pos.reshape(&[1, t])?.le(pos.reshape(&[t, 1])?)?;
        let masked = ops::select(&causal, scores, scalar_like(f32::NEG_INFINITY, scores)?)?;
        ops::softmax_axis(&masked, -1, None)
    }

    /// The heads' weighted values, merged: `[B, T, H * D]`, the input of o_proj.
    pub fn mix(&self, probs: &Array, v: &Array) -> R<Array> {
        let o = ops::matmul(probs, self.kv_for_queries(v)?)?;
        let (b, t) = (o.shape()[0], o.shape()[2]);
        o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, t, -1])
    }

    pub fn forward(&self, x: &Array) -> R<Array> {
        let (q, k, v) = self.project(x)?;
        let probs = Self::probs(&self.scores(&self.rope(&q)?, &self.rope(&k)?)?)?;
        self.o_proj.forward(&self.mix(&probs, &v)?)
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

    /// `silu(gate) * up`, `silu(x) = x * sigmoid(x)`.
    pub fn activation(gate: &Array, up: &Array) -> R<Array> {
        ops::multiply(ops::multiply(gate, ops::sigmoid(gate)?)?, up)
    }

    pub fn forward(&self, x: &Array) -> R<Array> {
        self.down_proj.forward(&Self::activation(
            &self.gate_proj.forward(x)?,
            &self.up_proj.forward(x)?,
        )?)
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

    /// Every piece of the layer (`LAYER_PIECES`, and `input`). Without `given`: the layer's own chain
    /// from `h`. With `given` (the reference's pieces, bare names, `input` included): each piece from
    /// the given values of its inputs, and `output` the whole layer from `given["input"]`, so a bug
    /// stays in the piece it is in.
    pub fn pieces(&self, h: &Array, given: Option<&Pieces>) -> R<Pieces> {
        self.pieces_named(h, given, "")
    }

    /// `pieces`, naming a missing given piece with `prefix`.
    fn pieces_named(&self, h: &Array, given: Option<&Pieces>, prefix: &str) -> R<Pieces> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut c = Chain {
            own: Pieces::from([("input".to_string(), h.clone())]),
            given,
            prefix,
        };
        c.put("input_norm", self.input_layernorm.forward(c.x("input")?)?);
        let (q, k, v) = a.project(c.x("input_norm")?)?;
        c.put("q", q);
        c.put("k", k);
        c.put("v", v);
        c.put("q_rope", a.rope(c.x("q")?)?);
        c.put("k_rope", a.rope(c.x("k")?)?);
        c.put("scores", a.scores(c.x("q_rope")?, c.x("k_rope")?)?);
        c.put("probs", Attention::probs(c.x("scores")?)?);
        c.put("attn", a.mix(c.x("probs")?, c.x("v")?)?);
        c.put("o_proj", a.o_proj.forward(c.x("attn")?)?);
        let residual = ops::add(c.x("input")?, c.x("o_proj")?)?;
        c.put("post_norm", self.post_attention_layernorm.forward(&residual)?);
        c.put("gate", m.gate_proj.forward(c.x("post_norm")?)?);
        c.put("up", m.up_proj.forward(c.x("post_norm")?)?);
        c.put("act", Mlp::activation(c.x("gate")?, c.x("up")?)?);
        c.put("down", m.down_proj.forward(c.x("act")?)?);
        let output = match given {
            None => ops::add(&residual, c.x("down")?)?,
            Some(g) => self.forward(lookup(g, prefix, "input")?)?,
        };
        c.put("output", output);
        Ok(c.own)
    }

    pub fn forward(&self, h: &Array) -> R<Array> {
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
            model: LlamaModel {
                embed_tokens,
                layers,
                norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps)?,
            },
            lm_head,
            tie_word_embeddings: cfg.tie_word_embeddings,
        })
    }

    /// Every parameter cast to `dtype` (MLX's `astype`, round to nearest even): the model of a bfloat16
    /// run, before its checkpoint is loaded (which then casts each tensor to its parameter's dtype) and
    /// before LoRA adapters (float32) are added.
    pub fn cast_parameters(&mut self, dtype: Dtype) -> R<()> {
        for (_, p) in self.parameters_mut().flatten() {
            if p.dtype() != dtype {
                *p = p.as_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// Logits and the residual stream after each decoder layer (before the final norm).
    pub fn forward_with_hidden(&self, ids: &Array) -> R<(Array, Vec<Array>)> {
        let mut h = self.model.embed_tokens.forward(ids)?;
        let mut hidden = Vec::with_capacity(self.model.layers.len());
        for layer in &self.model.layers {
            h = layer.forward(&h)?;
            hidden.push(h.clone());
        }
        Ok((self.head(&self.model.norm.forward(&h)?)?, hidden))
    }

    /// Logits of the final-normed residual: lm_head, or the embedding transposed when tied.
    pub fn head(&self, x: &Array) -> R<Array> {
        match &self.lm_head {
            Some(head) if !self.tie_word_embeddings => head.forward(x),
            _ => self.model.embed_tokens.as_linear(x),
        }
    }

    /// The forward pass in its pieces (`embed`, `layer.{i}.<piece>`, `head.norm`, `head.logits`): the
    /// own chain, or with `given` each piece from the given values of its inputs (`given_names` lists
    /// the ones read; other keys are ignored).
    pub fn pieces(&self, ids: &Array, given: Option<&Pieces>) -> R<Pieces> {
        let mut own = Pieces::new();
        let mut h = self.model.embed_tokens.forward(ids)?;
        own.insert("embed".into(), h.clone());
        for (i, layer) in self.model.layers.iter().enumerate() {
            let prefix = format!("layer.{i}.");
            let inputs = match given {
                None => None,
                Some(g) => {
                    let mut inputs: Pieces = g
                        .iter()
                        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_string(), v.clone())))
                        .collect();
                    inputs.insert("input".into(), lookup(g, "", &Self::layer_input(i))?.clone());
                    Some(inputs)
                }
            };
            for (k, v) in layer.pieces_named(&h, inputs.as_ref(), &prefix)? {
                if k != "input" {
                    own.insert(format!("{prefix}{k}"), v);
                }
            }
            h = own[&format!("{prefix}output")].clone();
        }
        let last = Self::layer_input(self.model.layers.len());
        let norm = self.model.norm.forward(match given {
            None => &h,
            Some(g) => lookup(g, "", &last)?,
        })?;
        own.insert("head.norm".into(), norm);
        let logits = self.head(lookup(given.unwrap_or(&own), "", "head.norm")?)?;
        own.insert("head.logits".into(), logits);
        Ok(own)
    }

    /// The residual entering layer `i` (after layer `i - 1`), by piece name.
    fn layer_input(i: usize) -> String {
        if i == 0 {
            "embed".into()
        } else {
            format!("layer.{}.output", i - 1)
        }
    }

    /// The given pieces that `pieces` reads: `embed`, each layer's pieces but `down`, `head.norm`.
    pub fn given_names(&self) -> Vec<String> {
        let mut out = vec!["embed".to_string()];
        for i in 0..self.model.layers.len() {
            out.extend(LAYER_PIECES_READ.iter().map(|p| format!("layer.{i}.{p}")));
            out.push(format!("layer.{i}.output"));
        }
        out.push("head.norm".into());
        out
    }

    /// Every piece name, in the order the forward pass computes them.
    pub fn piece_names(&self) -> Vec<String> {
        let mut out = vec!["embed".to_string()];
        for i in 0..self.model.layers.len() {
            out.extend(LAYER_PIECES.iter().map(|p| format!("layer.{i}.{p}")));
        }
        out.extend(["head.norm".to_string(), "head.logits".to_string()]);
        out
    }

    pub fn forward(&self, ids: &Array) -> R<Array> {
        Ok(self.forward_with_hidden(ids)?.0)
    }

    /// Adapt q/k/v/o of the last `layers` layers; returns the adapter parameter names.
    pub fn add_lora(&mut self, layers: i32, rank: i32, scale: f32, seed: u64) -> R<Vec<String>> {
        let n = self.model.layers.len() as i32;
        if !(1 <= layers && layers <= n) {
            return Err(Exception::custom(format!(
                "lora.layers must be in 1..{n}, got {layers}"
            )));
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
            for (n, l) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                lin(&mut out, format!("{p}.self_attn.{n}"), l);
            }
            if a.q_norm.is_some() {
                out.push(format!("{p}.self_attn.q_norm.weight"));
                out.push(format!("{p}.self_attn.k_norm.weight"));
            }
            let m = &layer.mlp;
            for (n, l) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::host_vec;

    /// A tiny random model: hidden 16, 2 layers, 4 query heads on 2 kv heads, head_dim 4; optionally
    /// tied, with biases, and with LoRA on the last layer (lora_b random, so the adapter is live).
    fn tiny(tied: bool, bias: bool, lora: bool) -> LlamaForCausalLM {
        let cfg = serde_json::json!({"model_type": "llama", "vocab_size": 24, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": tied, "attention_bias": bias,
            "mlp_bias": bias});
        let mut m = LlamaForCausalLM::new(&ModelConfig::from_value(&cfg).unwrap(), 7).unwrap();
        if bias {
            for (k, p) in m.parameters_mut().flatten() {
                if k.ends_with(".bias") {
                    let shape = p.shape().to_vec();
                    *p = uniform(k.len() as u64, 0.5, &shape).unwrap();
                }
            }
        }
        if lora {
            m.add_lora(1, 2, 2.0, 3).unwrap();
            let a = &mut m.model.layers[1].self_attn;
            for (i, lin) in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]
                .into_iter()
                .enumerate()
            {
                let shape = lin.lora_b.value.as_ref().unwrap().shape().to_vec();
                lin.lora_b = Param::new(Some(uniform(100 + i as u64, 0.3, &shape).unwrap()));
            }
        }
        m
    }

    fn ids() -> Array {
        let v: Vec<i32> = (0..14).map(|i| (i * 5 + 2) % 24).collect();
        Array::from_slice(&v, &[2, 7])
    }

    fn host(a: &Array) -> Vec<f32> {
        host_vec::<f32>(a).unwrap()
    }

    #[test]
    fn pieces_from_the_own_chain_reproduce_it_and_the_forward() {
        for (tied, bias, lora) in [(false, false, false), (true, true, true)] {
            let m = tiny(tied, bias, lora);
            let chain = m.pieces(&ids(), None).unwrap();
            let mut names: Vec<String> = chain.keys().cloned().collect();
            names.sort();
            let mut expected = m.piece_names();
            expected.sort();
            assert_eq!(names, expected);
            assert_eq!(chain["layer.0.q"].shape(), &[2, 4, 7, 4]);
            assert_eq!(chain["layer.0.k_rope"].shape(), &[2, 2, 7, 4]);
            assert_eq!(chain["layer.1.probs"].shape(), &[2, 4, 7, 7]);
            assert_eq!(chain["layer.1.attn"].shape(), &[2, 7, 16]);
            assert_eq!(chain["head.logits"].shape(), &[2, 7, 24]);
            // Each piece from the chain's own values of its inputs is the chain's value, bit for bit:
            // the same ops on the same inputs (`output` is the whole layer, the same ops again).
            let again = m.pieces(&ids(), Some(&chain)).unwrap();
            for n in m.piece_names() {
                assert_eq!(
                    host(&chain[&n]),
                    host(&again[&n]),
                    "{n} (tied={tied}, bias={bias}, lora={lora})"
                );
            }
            // The chain is the forward pass.
            let (logits, hidden) = m.forward_with_hidden(&ids()).unwrap();
            for (i, h) in hidden.iter().enumerate() {
                assert_eq!(host(h), host(&chain[&format!("layer.{i}.output")]), "layer {i}");
            }
            assert_eq!(host(&logits), host(&chain["head.logits"]));
            // Causal: a query sees no later key.
            let p = host(&chain["layer.0.probs"]);
            assert!(p.iter().enumerate().all(|(n, &x)| (n % 7 <= (n / 7) % 7) || x == 0.0));
        }
    }

    #[test]
    fn bf16_pieces_are_all_bfloat16_and_the_adapter_path_is_rounded() {
        // Every piece of a bfloat16 model is bfloat16: a float32 constant (a scalar array, which MLX
        // promotes) anywhere in the chain would leave a float32 piece behind.
        for (tied, bias, lora) in [(false, false, false), (true, true, true)] {
            let mut m = tiny(tied, bias, lora);
            let adapters: Vec<(String, Array)> = m
                .parameters()
                .flatten()
                .into_iter()
                .filter(|(k, _)| k.ends_with(".lora_a") || k.ends_with(".lora_b"))
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            m.cast_parameters(Dtype::Bfloat16).unwrap();
            // Adapters kept float32 (cast_parameters comes before add_lora in a trainer; here by hand).
            m.update_flattened(
                adapters
                    .into_iter()
                    .map(|(k, v)| (std::rc::Rc::from(k.as_str()), v))
                    .collect(),
            );
            let chain = m.pieces(&ids(), None).unwrap();
            for (n, v) in &chain {
                assert_eq!(
                    v.dtype(),
                    Dtype::Bfloat16,
                    "{n} (tied={tied}, bias={bias}, lora={lora})"
                );
            }
            let again = m.pieces(&ids(), Some(&chain)).unwrap();
            for n in m.piece_names() {
                assert_eq!(host(&chain[&n]), host(&again[&n]), "{n}");
            }
            let (logits, _) = m.forward_with_hidden(&ids()).unwrap();
            assert_eq!(host(&logits), host(&chain["head.logits"]));
        }
        // An adapted projection: y = x W^T in bfloat16, plus bf16(scale * (x @ a) @ b) from float32.
        let mut lin = Linear::new(8, 6, false, 1).unwrap();
        lin.weight = Param::new(lin.weight.value.as_dtype(Dtype::Bfloat16).unwrap());
        lin.add_lora(2, 2.0, 5).unwrap();
        lin.lora_b = Param::new(Some(uniform(6, 0.3, &[2, 6]).unwrap()));
        let x = uniform(7, 1.0, &[3, 8]).unwrap().as_dtype(Dtype::Bfloat16).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dtype(), Dtype::Bfloat16);
        let base = ops::matmul(&x, lin.weight.value.t()).unwrap();
        let low = ops::matmul(
            ops::matmul(&x, lin.lora_a.value.as_ref().unwrap()).unwrap(),
            lin.lora_b.value.as_ref().unwrap(),
        )
        .unwrap();
        assert_eq!(low.dtype(), Dtype::Float32);
        let want = ops::add(
            &base,
            ops::multiply(Array::from_f32(2.0), &low)
                .unwrap()
                .as_dtype(Dtype::Bfloat16)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(host(&y), host(&want));
    }

    #[test]
    fn given_names_are_exactly_what_the_pieces_read() {
        let m = tiny(false, false, false);
        let chain = m.pieces(&ids(), None).unwrap();
        let only: Pieces = m
            .given_names()
            .into_iter()
            .map(|n| (n.clone(), chain[&n].clone()))
            .collect();
        m.pieces(&ids(), Some(&only)).unwrap();
        for n in m.given_names() {
            let mut less = only.clone();
            less.remove(&n);
            let err = m.pieces(&ids(), Some(&less)).err().unwrap();
            assert_eq!(err.what(), format!("the given pieces lack '{n}'"));
        }
    }

    #[test]
    fn each_piece_reads_the_given_values() {
        // A changed given input changes the pieces that consume it and no other.
        let m = tiny(false, false, false);
        let chain = m.pieces(&ids(), None).unwrap();
        let mut given = chain.clone();
        given.insert(
            "layer.1.q_rope".into(),
            ops::multiply(&chain["layer.1.q_rope"], Array::from_f32(2.0)).unwrap(),
        );
        let out = m.pieces(&ids(), Some(&given)).unwrap();
        for n in m.piece_names() {
            assert_eq!(host(&chain[&n]) != host(&out[&n]), n == "layer.1.scores", "{n}");
        }
    }

    fn config(extra: serde_json::Value) -> ModelConfig {
        let mut cfg = serde_json::json!({"vocab_size": 24, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 500.0});
        cfg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ModelConfig::from_value(&cfg).unwrap()
    }

    #[test]
    fn qwen2_has_qkv_biases_and_no_o_proj_bias_and_loads_by_the_same_names() {
        let cfg = config(serde_json::json!({"model_type": "qwen2", "attention_bias": true}));
        let m = LlamaForCausalLM::new(&cfg, 7).unwrap();
        let params = m.parameters().flatten();
        for i in 0..2 {
            for (proj, bias) in [("q_proj", true), ("k_proj", true), ("v_proj", true), ("o_proj", false)] {
                let k = format!("model.layers.{i}.self_attn.{proj}.bias");
                assert_eq!(params.contains_key(k.as_str()), bias, "{k}");
            }
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                assert!(!params.contains_key(format!("model.layers.{i}.mlp.{proj}.bias").as_str()));
            }
        }
        assert_eq!(params["model.layers.1.self_attn.k_proj.bias"].shape(), &[8]);
        // The checkpoint name map lists exactly the model's parameters, for every family.
        for cfg in [
            cfg,
            config(serde_json::json!({})),
            config(serde_json::json!({"attention_bias": true, "mlp_bias": true})),
            config(serde_json::json!({"model_type": "mistral", "attention_bias": true, "tie_word_embeddings": true})),
        ] {
            let m = LlamaForCausalLM::new(&cfg, 7).unwrap();
            let mut want: Vec<String> = m.parameters().flatten().keys().map(|k| k.to_string()).collect();
            want.sort();
            let mut got: Vec<String> = crate::weights::name_map(&cfg).into_values().collect();
            got.sort();
            assert_eq!(got, want, "{:?}", cfg.model_type);
            let mut ordered = m.ordered_names();
            ordered.sort();
            assert_eq!(ordered, want);
            // And a checkpoint of the model's own tensors loads with nothing missing or left over.
            let tensors: HashMap<String, Array> = m
                .parameters()
                .flatten()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let (loaded, report) = crate::weights::match_tensors(&m, tensors, &cfg);
            assert!(report.ok(), "{}", report.describe());
            assert_eq!(loaded.len(), want.len());
        }
    }

    #[test]
    fn scaled_rope_passes_periods_as_freqs() {
        let x = uniform(9, 1.0, &[1, 2, 5, 4]).unwrap();
        let plain = tiny(false, false, false);
        let a = &plain.model.layers[0].self_attn;
        assert!(a.rope_freqs.is_none());
        // Linear scaling by 4 rotates position p as the unscaled RoPE rotates p / 4 (MLX's `scale`).
        let lin = LlamaForCausalLM::new(
            &config(serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 4.0}})),
            7,
        )
        .unwrap();
        let l = &lin.model.layers[0].self_attn;
        assert_eq!(l.rope_freqs.as_ref().unwrap().shape(), &[2]);
        let want = fast::rope(&x, 4, false, 500.0f32, 0.25, 0, None).unwrap();
        let got = l.rope(&x).unwrap();
        for (g, w) in host(&got).iter().zip(host(&want)) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
        assert_ne!(host(&got), host(&a.rope(&x).unwrap()));
        // llama3 with factor 1 leaves every frequency as it is: the unscaled RoPE, to rounding.
        let l3 = LlamaForCausalLM::new(
            &config(
                serde_json::json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0,
                "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8}}),
            ),
            7,
        )
        .unwrap();
        let got = l3.model.layers[0].self_attn.rope(&x).unwrap();
        for (g, w) in host(&got).iter().zip(host(&a.rope(&x).unwrap())) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn query_heads_read_repeated_kv_heads() {
        // Query head h reads kv head h / (H / K): zero kv head 1, and only query heads 2 and 3 score 0.
        let m = tiny(false, false, false);
        let a = &m.model.layers[0].self_attn;
        let q = uniform(5, 1.0, &[1, 4, 3, 4]).unwrap();
        let live = uniform(6, 1.0, &[1, 1, 3, 4]).unwrap();
        let k = ops::concatenate(&[live, Array::zeros::<f32>(&[1, 1, 3, 4]).unwrap()], 1).unwrap();
        let s = host(&a.scores(&q, &k).unwrap());
        for (h, block) in s.chunks(9).enumerate() {
            assert_eq!(block.iter().all(|&x| x == 0.0), h >= 2, "head {h}");
        }
    }
}
