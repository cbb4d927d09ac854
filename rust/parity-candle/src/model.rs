//! The Llama-family forward pass on candle, piece by piece (docs/training-step.md, "Model"), so that the
//! whole pass and each piece on given inputs (the isolated check) are the same functions.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::ModelConfig;
use crate::inject::Bug;

/// The model at its current parameters: those trained are tracked by autograd, the rest detached.
pub struct Model<'a> {
    pub cfg: &'a ModelConfig,
    pub params: BTreeMap<String, Tensor>,
    pub lora_scale: f64,
    pub bug: Option<Bug>,
}

/// The forward's pieces by the protocol's names (`embed`, `layer.{i}.<piece>`, `head.norm`, `head.logits`).
pub type Pieces = BTreeMap<String, Tensor>;

impl Model<'_> {
    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.p("model.embed_tokens.weight")?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden))
    }

    /// RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · weight.
    pub fn norm(&self, x: &Tensor, weight: &str) -> Result<Tensor> {
        let eps = if self.bug == Some(Bug::NormEpsFixed) {
            1e-5
        } else {
            self.cfg.eps
        };
        let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&scale)?.broadcast_mul(self.p(weight)?)
    }

    /// y = x Wᵀ (+ b) (+ scale · (x A) B for an adapted projection), on the last axis of x.
    pub fn linear(&self, x: &Tensor, module: &str) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let x2 = x.reshape((rows, inner))?;
        let w = self.p(&format!("{module}.weight"))?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = self.params.get(&format!("{module}.bias")) {
            y = y.broadcast_add(b)?;
        }
        if let (Some(a), Some(b)) = (
            self.params.get(&format!("{module}.lora_a")),
            self.params.get(&format!("{module}.lora_b")),
        ) {
            y = (y + x2.matmul(a)?.matmul(b)?.affine(self.lora_scale, 0.0)?)?;
        }
        let mut shape = dims;
        *shape.last_mut().unwrap() = y.dim(1)?;
        y.reshape(shape)
    }

    /// [B, T, n·D] → [B, T, n, D].
    fn heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, n, self.cfg.head_dim))
    }

    /// The q, k, v heads of layer `l` from its normed input, q and k after Qwen3's per-head norms.
    pub fn qkv(&self, l: usize, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let a = format!("model.layers.{l}.self_attn");
        let mut q = self.heads(&self.linear(x, &format!("{a}.q_proj"))?, self.cfg.heads)?;
        let mut k = self.heads(&self.linear(x, &format!("{a}.k_proj"))?, self.cfg.kv_heads)?;
        let v = self.heads(&self.linear(x, &format!("{a}.v_proj"))?, self.cfg.kv_heads)?;
        if self.cfg.qk_norm {
            q = self.norm(&q, &format!("{a}.q_norm.weight"))?;
            k = self.norm(&k, &format!("{a}.k_norm.weight"))?;
        }
        let t = |x: Tensor| x.transpose(1, 2)?.contiguous();
        Ok((t(q)?, t(k)?, t(v)?))
    }

    /// cos and sin of every position's angle for each pair, [T, D/2], computed in float64 and rounded once.
    fn angles(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let f = self.cfg.rope_frequencies();
        let a: Vec<f64> = (0..t).flat_map(|p| f.iter().map(move |fi| p as f64 * fi)).collect();
        let cos: Vec<f32> = a.iter().map(|x| x.cos() as f32).collect();
        let sin: Vec<f32> = a.iter().map(|x| x.sin() as f32).collect();
        let shape = (t, f.len());
        Ok((
            Tensor::from_vec(cos, shape, &Device::Cpu)?,
            Tensor::from_vec(sin, shape, &Device::Cpu)?,
        ))
    }

    /// RoPE at positions 0..T−1 of [B, n, T, D]: the halves (i, i + D/2) rotated together.
    pub fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let (cos, sin) = self.angles(t)?;
        if self.bug == Some(Bug::RopeInterleaved) {
            return crate::inject::rope_interleaved(x, &cos, &sin);
        }
        let (cos, sin) = (Tensor::cat(&[&cos, &cos], 1)?, Tensor::cat(&[&sin, &sin], 1)?);
        let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// Key/value heads [B, K, T, D] for every query head [B, H, T, D]: head h reads kv head h / (H/K).
    pub fn for_queries(&self, kv: &Tensor) -> Result<Tensor> {
        let (b, k, t, d) = kv.dims4()?;
        let n = self.cfg.group();
        if n == 1 {
            return Ok(kv.clone());
        }
        let spread = if self.bug == Some(Bug::GqaTiled) {
            kv.unsqueeze(1)?.broadcast_as((b, n, k, t, d))?
        } else {
            kv.unsqueeze(2)?.broadcast_as((b, k, n, t, d))?
        };
        spread.contiguous()?.reshape((b, k * n, t, d))
    }

    pub fn scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        q.matmul(&self.for_queries(k)?.t()?)?.affine(scale, 0.0)
    }

    /// Softmax over keys with key j > query t at −∞.
    pub fn probs(&self, scores: &Tensor) -> Result<Tensor> {
        let t = scores.dim(D::Minus1)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|q| (0..t).map(move |k| if k > q { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let s = scores.broadcast_add(&Tensor::from_vec(mask, (t, t), &Device::Cpu)?)?;
        let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// probs · v, heads merged: [B, T, H·D].
    pub fn attn(&self, probs: &Tensor, v: &Tensor) -> Result<Tensor> {
        let o = probs.matmul(&self.for_queries(v)?)?;
        let (b, h, t, d) = o.dims4()?;
        o.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
    }

    /// Decoder layer `l` on its input [B, T, hidden].
    pub fn layer(&self, l: usize, input: &Tensor) -> Result<Tensor> {
        let p = format!("model.layers.{l}");
        let xn = self.norm(input, &format!("{p}.input_layernorm.weight"))?;
        let (q, k, v) = self.qkv(l, &xn)?;
        let probs = self.probs(&self.scores(&self.rope(&q)?, &self.rope(&k)?)?)?;
        let o = self.linear(&self.attn(&probs, &v)?, &format!("{p}.self_attn.o_proj"))?;
        let h = (input + o)?;
        let pn = self.norm(&h, &format!("{p}.post_attention_layernorm.weight"))?;
        let gate = self.linear(&pn, &format!("{p}.mlp.gate_proj"))?;
        let up = self.linear(&pn, &format!("{p}.mlp.up_proj"))?;
        h + self.linear(&(gate.silu()? * up)?, &format!("{p}.mlp.down_proj"))?
    }

    pub fn head_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.norm(h, "model.norm.weight")
    }

    pub fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        if self.cfg.tied {
            let (b, t, hidden) = normed.dims3()?;
            let w = self.p("model.embed_tokens.weight")?;
            return normed
                .reshape((b * t, hidden))?
                .matmul(&w.t()?)?
                .reshape((b, t, self.cfg.vocab));
        }
        self.linear(normed, "lm_head")
    }

    /// Logits [B, T, V] and the residual after every layer, from token ids [B, T] (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = self.embed(ids)?;
        let mut hidden = Vec::with_capacity(self.cfg.layers);
        for l in 0..self.cfg.layers {
            h = self.layer(l, &h)?;
            hidden.push(h.clone());
        }
        Ok((self.logits(&self.head_norm(&h)?)?, hidden))
    }

    /// Every piece from the given values of its inputs (docs/protocol.md, "The forward's pieces"); `given`
    /// holds the reference's pieces by the same names.
    pub fn pieces(&self, ids: &Tensor, given: &BTreeMap<String, Tensor>) -> Result<Pieces> {
        let g = |name: &str| {
            given
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("isolated_inputs lacks {name}")))
        };
        let mut out = Pieces::new();
        out.insert("embed".into(), self.embed(ids)?);
        for l in 0..self.cfg.layers {
            let p = format!("model.layers.{l}");
            let at = |piece: &str| format!("layer.{l}.{piece}");
            let input = if l == 0 {
                g("embed")?
            } else {
                g(&format!("layer.{}.output", l - 1))?
            };
            out.insert(
                at("input_norm"),
                self.norm(input, &format!("{p}.input_layernorm.weight"))?,
            );
            let (q, k, v) = self.qkv(l, g(&at("input_norm"))?)?;
            out.insert(at("q"), q);
            out.insert(at("k"), k);
            out.insert(at("v"), v);
            out.insert(at("q_rope"), self.rope(g(&at("q"))?)?);
            out.insert(at("k_rope"), self.rope(g(&at("k"))?)?);
            out.insert(at("scores"), self.scores(g(&at("q_rope"))?, g(&at("k_rope"))?)?);
            out.insert(at("probs"), self.probs(g(&at("scores"))?)?);
            out.insert(at("attn"), self.attn(g(&at("probs"))?, g(&at("v"))?)?);
            out.insert(
                at("o_proj"),
                self.linear(g(&at("attn"))?, &format!("{p}.self_attn.o_proj"))?,
            );
            let h = (input + g(&at("o_proj"))?)?;
            out.insert(
                at("post_norm"),
                self.norm(&h, &format!("{p}.post_attention_layernorm.weight"))?,
            );
            out.insert(
                at("gate"),
                self.linear(g(&at("post_norm"))?, &format!("{p}.mlp.gate_proj"))?,
            );
            out.insert(
                at("up"),
                self.linear(g(&at("post_norm"))?, &format!("{p}.mlp.up_proj"))?,
            );
            out.insert(at("act"), (g(&at("gate"))?.silu()? * g(&at("up"))?)?);
            out.insert(at("down"), self.linear(g(&at("act"))?, &format!("{p}.mlp.down_proj"))?);
            out.insert(at("output"), self.layer(l, input)?);
        }
        let last = g(&format!("layer.{}.output", self.cfg.layers - 1))?;
        out.insert("head.norm".into(), self.head_norm(last)?);
        out.insert("head.logits".into(), self.logits(g("head.norm")?)?);
        Ok(out)
    }
}

/// Token ids as candle's index type.
pub fn ids(values: &[i32], shape: (usize, usize)) -> Result<Tensor> {
    let v: Vec<u32> = values.iter().map(|&x| x as u32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A float32 tensor's values, row-major.
pub fn values(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}
