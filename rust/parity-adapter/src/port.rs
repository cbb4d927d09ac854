//! What a port implements. Names are the checkpoint's (Hugging Face) parameter names everywhere, or the port's
//! own mapped to them by `Port::checkpoint_name`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Batch, Error, RequestFolder, Result, Tensor, Tensors};

/// What loading did, in checkpoint names. `missing`: parameters of the port's model that no checkpoint
/// tensor filled (a parameter the checkpoint has no name for, such as a bias it lacks, goes here under
/// the name the port would give it); `unexpected`: checkpoint keys the port did not use; `mismatched`:
/// `"<name>: checkpoint [a, b] vs model [c, d]"`, one per shape disagreement; `ignored`: checkpoint keys
/// skipped on purpose (buffers such as `rotary_emb.inv_freq`), not a problem. Empty lists when all is well.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<String>,
    pub ignored: Vec<String>,
}

/// The loss of one batch: the cross-entropy over real next-token targets, the distrust term, and
/// `total = ce + lambda · distrust`. Under accumulation, the mean over the micro-batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    pub ce: f32,
    pub distrust: f32,
    pub total: f32,
}

/// AdamW's state after the updates so far, for the trainable parameters: first and second moments
/// (checkpoint names) and the number of updates applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    pub step: i64,
    pub m: Tensors,
    pub v: Tensors,
}

fn unsupported<T>(what: &str) -> Result<T> {
    Err(Error::Unsupported(format!("this port does not implement {what}")))
}

/// A loaded model and its trainer. Each stage starts from a fresh `load` (or a `resume`), so a port
/// must be deterministic from the request alone: seed whatever it initialises.
pub trait Port: Sized {
    /// Load the request's checkpoint and settings (and LoRA adapters, when `lora_init` is given).
    /// Never strict: a key that does not map goes in the load report, and the stages still run.
    fn load(request: &RequestFolder) -> Result<Self>;
    /// A fresh port from a folder `save` wrote: parameters, optimizer state and step exactly restored.
    fn resume(request: &RequestFolder, dir: &Path) -> Result<Self>;
    fn load_report(&self) -> LoadReport;
    /// Every parameter of the model (trainable or not), float32, by checkpoint name. A port with tied
    /// embeddings has no `lm_head.weight`; LoRA adapters are `<module>.lora_a` [in, r] and `.lora_b` [r, out].
    fn parameters(&self) -> Result<Tensors>;
    /// The parameters named (a subset): what the kit reads before and after updates (the trainable set).
    /// The default copies every parameter and keeps the named ones; a port whose model is large returns
    /// only those. A name the port has no parameter for is left out (the kit says which).
    fn parameters_named(&self, names: &[String]) -> Result<Tensors> {
        let mut all = self.parameters()?;
        Ok(names.iter().filter_map(|n| all.remove_entry(n)).collect())
    }
    /// The parameters the optimizer updates (all, the head, or the adapters, as `settings.trainable` says).
    fn trainable_names(&self) -> Vec<String>;
    /// Logits [B, T, V] and the residual stream after each decoder layer [B, T, hidden].
    fn forward(&mut self, input_ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)>;
    /// The next-token targets and their mask, int32 and float32 [B, T−1]: `input_ids[:, 1:]` and
    /// `attention_mask[:, 1:]` in the reference. A port that does not shift returns what it trains on.
    fn shifted(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)>;
    fn loss(&mut self, batch: &Batch) -> Result<Loss>;
    /// The loss and the gradient of `total` for every trainable parameter: the whole batch in one pass
    /// (no accumulation, no clipping, no update).
    fn gradients(&mut self, batch: &Batch) -> Result<(Loss, Tensors)>;
    /// One update: the batch split in order into `accum_steps` micro-batches, gradients averaged,
    /// clipped when `clip_norm` is set, one AdamW step at the schedule's current learning rate.
    fn step(&mut self, batch: &Batch) -> Result<Loss>;
    fn optimizer_state(&self) -> Result<OptimizerState>;
    /// Everything `resume` needs, into `dir`: a path in a scratch folder that does not exist yet.
    fn save(&self, dir: &Path) -> Result<()>;

    /// Optional: every piece of the forward from the given values of its inputs (docs/protocol.md,
    /// "The forward's pieces"). `given` holds the reference's pieces without the `isolated.forward.` prefix.
    fn pieces(&mut self, _input_ids: &Tensor, _given: &Tensors) -> Result<Tensors> {
        unsupported("the forward's pieces")
    }
    /// Optional: the pieces `pieces` leaves out because the port cannot compute them, each a piece's name or
    /// its last part (`"scores"` for every layer's) with the reason (`"fused attention"`). The harness does
    /// not check those (never passes them) and judges the rest; a piece left out and not named here fails.
    fn pieces_not_computed(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Optional: the loss of given logits [B, T, V] on the batch.
    fn loss_from_logits(&mut self, _logits: &Tensor, _batch: &Batch) -> Result<Loss> {
        unsupported("the loss of given logits")
    }
    /// Optional: one update with given gradients (clip, then AdamW at the current step; no accumulation).
    /// Optional: the checkpoint (Hugging Face) name of one of the port's own parameter names, for a port whose
    /// modules are named otherwise (`layers.0.attention.wq` for `model.layers.0.self_attn.q_proj.weight`). The
    /// kit then takes every name the port returns (parameters, trainable names, gradients, moments) as its own
    /// and writes it under this name, and gives the port the reference's gradients under its own names. The
    /// load report stays in checkpoint names. Default: the port's names are the checkpoint's.
    fn checkpoint_name(&self, own: &str) -> String {
        own.to_string()
    }
    /// This process's rank when the port trains data-parallel: `load` joined the group the request's launcher
    /// started (`RequestFolder::world_size`) and `step` all-reduces as docs/training-step.md states. None (the
    /// default): the port trains on one process, and the data_parallel request is answered unsupported.
    fn rank(&self) -> Option<usize> {
        None
    }
    fn update_from_gradients(&mut self, _grads: &Tensors) -> Result<()> {
        unsupported("an update from given gradients")
    }
}
