//! The deliberate porting bugs of the harness's self-test (settings key "inject"; the harness names them
//! in harness/backends/mlx_rs.py, RUST_INJECTIONS). Each bug's code is here and nowhere else: the trainer
//! asks this module at the one point where the bug changes what happens, and gets `None` (or `false`)
//! when the bug is off.
use std::collections::HashMap;

use mlx_rs::{error::Exception, module::ModuleParameters, ops, Array, Dtype};
use serde::Serialize;

use crate::{data::Batch, error::Result, loss::LossParts, trainer::Trainer, weights::LoadReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inject {
    /// The model keeps its random initialisation; the load report says nothing.
    WeightsNotLoaded,
    /// The loss compares logits[:, :] with input_ids[:, :] (no shift).
    NoShift,
    /// step() computes the loss and applies no update; gradients() returns zeros.
    ForwardOnly,
    /// Gradients and optimizer moments are computed, parameters never change.
    OptimizerDisconnected,
}

impl Inject {
    pub const NAMES: [&'static str; 4] = [
        "weights_not_loaded",
        "no_shift",
        "forward_only",
        "optimizer_disconnected",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "weights_not_loaded" => Inject::WeightsNotLoaded,
            "no_shift" => Inject::NoShift,
            "forward_only" => Inject::ForwardOnly,
            "optimizer_disconnected" => Inject::OptimizerDisconnected,
            _ => return None,
        })
    }
}

/// weights_not_loaded: the checkpoint is never read; the random initialisation stays and the load
/// report is empty.
pub fn unloaded_weights(bug: Option<Inject>) -> Option<LoadReport> {
    (bug == Some(Inject::WeightsNotLoaded)).then(LoadReport::default)
}

/// no_shift: the targets of the loss, `(ids, mask)`, unshifted: position t "predicts" token t.
pub fn unshifted_targets(
    bug: Option<Inject>,
    ids: &Array,
    mask: &Array,
) -> Option<std::result::Result<(Array, Array), Exception>> {
    (bug == Some(Inject::NoShift)).then(|| Ok((ids.clone(), mask.as_dtype(Dtype::Float32)?)))
}

/// no_shift: `(logits, targets, mask)` with none of them sliced.
pub fn unshifted_slices(
    bug: Option<Inject>,
    logits: &Array,
    ids: &Array,
    mask: &Array,
) -> Option<std::result::Result<(Array, Array, Array), Exception>> {
    unshifted_targets(bug, ids, mask).map(|r| r.map(|(targets, mask)| (logits.clone(), targets, mask)))
}

/// forward_only: the loss, and zeros for every trainable parameter's gradient.
pub fn zero_gradients(t: &Trainer, batch: &Batch) -> Option<Result<(LossParts, HashMap<String, Array>)>> {
    (t.settings.inject == Some(Inject::ForwardOnly)).then(|| {
        let parts = t.loss(batch)?;
        let params = t.model.trainable_parameters().flatten();
        let mut zeros = HashMap::new();
        for (k, p) in params {
            zeros.insert(k.to_string(), ops::zeros_like(p)?);
        }
        Ok((parts, zeros))
    })
}

/// forward_only (the seed's silent fallback): the loss of the micro-batches, and no update at all.
pub fn loss_without_update(t: &Trainer, micro: &[Batch]) -> Option<Result<LossParts>> {
    (t.settings.inject == Some(Inject::ForwardOnly)).then(|| {
        let parts = micro.iter().map(|mb| t.loss(mb)).collect::<Result<Vec<_>>>()?;
        Ok(LossParts::mean(&parts))
    })
}

/// optimizer_disconnected: the moments and the update counter advance, the parameters never receive
/// the update.
pub fn update_dropped(bug: Option<Inject>) -> bool {
    bug == Some(Inject::OptimizerDisconnected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::LlamaForCausalLM,
        testing::{batch, flat, settings, tiny_checkpoint, tmp},
    };

    fn injected(name: &str) -> String {
        format!(r#", "inject": "{name}""#)
    }

    #[test]
    fn names_parse_to_their_bug_and_serialize_back() {
        for name in Inject::NAMES {
            let bug = Inject::parse(name).unwrap();
            assert_eq!(serde_json::to_value(bug).unwrap(), name);
        }
        assert_eq!(Inject::parse("nonsense"), None);
    }

    #[test]
    fn weights_not_loaded_keeps_the_random_initialisation() {
        let d_dir = tmp("inject-weights");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let t = Trainer::new(d, settings(&injected("weights_not_loaded")), None, true).unwrap();
        let fresh = LlamaForCausalLM::new(&t.cfg, t.settings.seed).unwrap();
        let loaded = Trainer::new(d, settings(""), None, true).unwrap();
        assert_eq!(t.report, LoadReport::default());
        assert_ne!(flat(&t), flat(&loaded));
        for (k, v) in flat(&t) {
            let p = fresh.parameters().flatten()[k.as_str()].clone();
            assert_eq!(v, crate::trainer::host_vec::<f32>(&p).unwrap(), "{k}");
        }
    }

    #[test]
    fn no_shift_trains_on_the_unshifted_tokens() {
        let d_dir = tmp("inject-shift");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let b = batch();
        let (ids, mask, _, _) = b.arrays();
        let t = Trainer::new(d, settings(&injected("no_shift")), None, true).unwrap();
        let (targets, m) = t.shifted(&ids, &mask).unwrap();
        assert_eq!(targets.shape(), &[2, 8]);
        assert_eq!(m.shape(), &[2, 8]);
        let right = Trainer::new(d, settings(""), None, true).unwrap();
        assert_eq!(right.shifted(&ids, &mask).unwrap().0.shape(), &[2, 7]);
        assert_ne!(t.loss(&b).unwrap().ce, right.loss(&b).unwrap().ce);
    }

    #[test]
    fn forward_only_gives_zero_gradients_and_no_update() {
        let d_dir = tmp("inject-forward");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let b = batch();
        let mut t = Trainer::new(d, settings(&injected("forward_only")), None, true).unwrap();
        let (_, g) = t.gradients(&b).unwrap();
        assert_eq!(g.len(), t.trainable_names().len());
        assert!(g
            .values()
            .all(|g| crate::trainer::host_vec::<f32>(g).unwrap().iter().all(|&x| x == 0.0)));
        let before = flat(&t);
        let loss = t.step(&b).unwrap();
        assert!(loss.total > 0.0);
        assert_eq!(before, flat(&t));
        assert_eq!(t.optimizer.step, 0);
    }

    #[test]
    fn optimizer_disconnected_advances_the_optimizer_but_not_the_parameters() {
        let d_dir = tmp("inject-optimizer");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let b = batch();
        let mut f = Trainer::new(d, settings(&injected("optimizer_disconnected")), None, true).unwrap();
        let before = flat(&f);
        f.step(&b).unwrap();
        assert_eq!(before, flat(&f));
        assert_eq!(f.optimizer.step, 1);
        assert_eq!(f.optimizer.m.len(), f.trainable_names().len());
    }
}
