//! Porting bugs this port can be started with (`--inject NAME`), each a classic of Python-to-Rust ports
//! and each one the audit must name: the self-test and tests/test_candle.py audit them.

use crate::{fail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Each position predicts its own token: the labels are not shifted.
    NoShift,
    /// RoPE rotates adjacent pairs (2i, 2i+1) instead of the halves (i, i + D/2).
    RopeInterleaved,
    /// Query head h reads kv head h mod K (kv heads tiled) instead of h / (H/K).
    GqaTiled,
    /// RMSNorm's eps is 1e-5 whatever the config says.
    NormEpsFixed,
    /// AdamW's bias correction is the other convention than the settings say.
    BiasCorrectionFlipped,
    /// Each gradient clipped by its own norm instead of the global one.
    ClipPerTensor,
}

pub const BUGS: [(&str, Bug); 6] = [
    ("no_shift", Bug::NoShift),
    ("rope_interleaved", Bug::RopeInterleaved),
    ("gqa_tiled", Bug::GqaTiled),
    ("norm_eps_fixed", Bug::NormEpsFixed),
    ("bias_correction_flipped", Bug::BiasCorrectionFlipped),
    ("clip_per_tensor", Bug::ClipPerTensor),
];

pub fn parse(name: Option<&str>) -> Result<Option<Bug>> {
    let Some(name) = name else { return Ok(None) };
    BUGS.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| Some(*b))
        .ok_or_else(|| {
            let known: Vec<&str> = BUGS.iter().map(|(n, _)| *n).collect();
            fail(format!("unknown --inject {name:?}; known: {}", known.join(", ")))
        })
}

/// RoPE on adjacent pairs (2i, 2i+1) of [B, n, T, D], with the pairs' cos and sin [T, D/2]: the layout of
/// Meta's original Llama code and of `traditional=True` in MLX, not the contract's halves.
pub fn rope_interleaved(
    x: &candle_core::Tensor,
    cos: &candle_core::Tensor,
    sin: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{Tensor, D};
    let (b, n, t, d) = x.dims4()?;
    let pairs = x.reshape((b, n, t, d / 2, 2))?;
    let (even, odd) = (pairs.narrow(D::Minus1, 0, 1)?, pairs.narrow(D::Minus1, 1, 1)?);
    let (cos, sin) = (cos.unsqueeze(D::Minus1)?, sin.unsqueeze(D::Minus1)?);
    let e = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
    let o = (odd.broadcast_mul(&cos)? + even.broadcast_mul(&sin)?)?;
    Tensor::cat(&[&e, &o], D::Minus1)?.reshape((b, n, t, d))
}
