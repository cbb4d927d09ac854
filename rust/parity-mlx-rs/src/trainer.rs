//! The training step (docs/training-step.md; the reference's trainer.py): a model, its trainable set
//! and its optimizer. `value_and_grad` over the trainable set, accumulation, then clipping and AdamW
//! (optimizer.rs) at the schedule's rate (schedule.rs), on the loss of loss.rs; checkpoints are in
//! checkpoint.rs, the injected bugs in inject.rs. Op order follows the MLX reference so that float32
//! results agree bit for bit where the kernels allow; under `"precision": "bfloat16"` (precision.rs)
//! the gradients, their accumulation, clipping and AdamW run in each parameter's dtype.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
    rc::Rc,
};

use mlx_rs::{
    error::Exception,
    module::{ModuleParameters, Parameter},
    nn, ops,
    transforms::eval,
    Array, Dtype,
};

use crate::{
    config::ModelConfig,
    data::Batch,
    distributed::Group,
    error::{Error, Result},
    inject,
    loss::{loss_arrays, loss_of_logits, shifted_targets, validate_loss_scalars, LossParts},
    model::{scalar_like, LlamaForCausalLM, Pieces},
    optimizer::{clip_grad_norm, AdamW},
    schedule::learning_rate,
    settings::{TrainSettings, Trainable},
    weights::{self, LoadReport},
};

/// The elements of `a` in row-major order (a transposed or broadcast view is copied first).
pub fn host_vec<T: mlx_rs::ArrayElement + Clone>(a: &Array) -> Result<Vec<T>> {
    if a.size() == 0 {
        return Ok(Vec::new());
    }
    let flat = a.reshape(&[-1])?.as_dtype(T::DTYPE)?;
    flat.eval()?;
    let contiguous = match flat.try_as_slice::<T>() {
        Ok(s) => return Ok(s.to_vec()),
        // A 1-D view that is still strided: an elementwise op writes a fresh contiguous buffer.
        Err(_) => ops::multiply(&flat, Array::from_int(1).as_dtype(T::DTYPE)?)?,
    };
    contiguous.eval()?;
    contiguous
        .try_as_slice::<T>()
        .map(|s| s.to_vec())
        .map_err(|e| Error::Mlx(format!("reading an array: {e}")))
}

/// Every rank's micro-batch losses, in rank order, as float32 (as the reference gathers them).
fn gathered(g: &Group, parts: &[LossParts]) -> Result<Vec<LossParts>> {
    let mine: Vec<f32> = parts
        .iter()
        .flat_map(|p| [p.total as f32, p.ce as f32, p.distrust as f32])
        .collect();
    let every = host_vec::<f32>(&g.all_gather(&Array::from_slice(&mine, &[parts.len() as i32, 3]))?)?;
    Ok(every
        .chunks(3)
        .map(|v| LossParts {
            total: v[0] as f64,
            ce: v[1] as f64,
            distrust: v[2] as f64,
        })
        .collect())
}

/// A model, its trainable set and its optimizer; one `step` is one optimizer update.
pub struct Trainer {
    pub cfg: ModelConfig,
    pub settings: TrainSettings,
    pub model: LlamaForCausalLM,
    pub report: LoadReport,
    pub adapter_names: Vec<String>,
    pub optimizer: AdamW,
    /// The ranks this trainer is one of (docs/training-step.md, data parallelism); None: one process.
    pub group: Option<Group>,
}

impl Trainer {
    pub fn new(checkpoint_dir: &Path, settings: TrainSettings, lora_init: Option<&Path>, strict: bool) -> Result<Self> {
        let cfg = ModelConfig::from_dir(checkpoint_dir)?;
        let mut model = LlamaForCausalLM::new(&cfg, settings.seed)?;
        let report = match inject::unloaded_weights(settings.inject) {
            Some(report) => report,
            None => {
                let tensors = weights::read_checkpoint(checkpoint_dir)?;
                let (loaded, report) = weights::match_tensors(&model, tensors, &cfg);
                if strict && !report.ok() {
                    return Err(Error::Weights(format!(
                        "{}: checkpoint does not match the model:\n{}",
                        checkpoint_dir.display(),
                        report.describe()
                    )));
                }
                model.update_flattened(loaded);
                report
            }
        };
        let t = Self::assemble(cfg, settings, model, report, lora_init)?;
        t.eval_params()?;
        Ok(t)
    }

    /// The trainer of a model built from `cfg` (its checkpoint loaded, or not): loaded into the float32
    /// model (as the reference does), then cast to the training precision, then the trainable set chosen
    /// (LoRA adapters added, from `lora_init` when given).
    pub(crate) fn assemble(
        cfg: ModelConfig,
        settings: TrainSettings,
        mut model: LlamaForCausalLM,
        report: LoadReport,
        lora_init: Option<&Path>,
    ) -> Result<Self> {
        settings.precision.cast(&mut model)?;
        let mut t = Trainer {
            cfg,
            settings,
            model,
            report,
            adapter_names: Vec::new(),
            optimizer: AdamW::default(),
            group: None,
        };
        t.setup_trainable(lora_init)?;
        Ok(t)
    }

    /// The dtype the forward pass computes in (bfloat16 or float32).
    pub fn compute_dtype(&self) -> Dtype {
        self.settings.precision.dtype()
    }

    fn setup_trainable(&mut self, lora_init: Option<&Path>) -> Result<()> {
        let s = self.settings.clone();
        if s.trainable == Trainable::Lora {
            self.adapter_names = self
                .model
                .add_lora(s.lora.layers, s.lora.rank, s.lora.scale as f32, s.seed)
                .map_err(|e| Error::Settings(e.what().to_string()))?;
            if let Some(path) = lora_init {
                self.load_adapters(path)?;
            }
        } else if lora_init.is_some() {
            return Err(Error::Settings("lora_init given but trainable is not 'lora'".into()));
        }
        let m = &mut self.model;
        match s.trainable {
            Trainable::Full => m.unfreeze_parameters(true),
            Trainable::Head => {
                m.freeze_parameters(true);
                match (&mut m.lm_head, m.tie_word_embeddings) {
                    (Some(head), false) => head.weight.unfreeze(true),
                    _ => m.model.embed_tokens.weight.unfreeze(true),
                }
                m.model.norm.weight.unfreeze(true);
            }
            Trainable::Lora => {
                m.freeze_parameters(true);
                for layer in m.model.layers.iter_mut() {
                    let a = &mut layer.self_attn;
                    for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                        if lin.lora_a.value.is_some() {
                            lin.lora_a.unfreeze(true);
                            lin.lora_b.unfreeze(true);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn load_adapters(&mut self, path: &Path) -> Result<()> {
        let tensors = weights::read_safetensors(path)?;
        let params = self.model.parameters().flatten();
        let names: HashSet<&String> = self.adapter_names.iter().collect();
        let mut missing: Vec<String> = self
            .adapter_names
            .iter()
            .filter(|n| !tensors.contains_key(*n))
            .cloned()
            .collect();
        let mut unexpected: Vec<String> = tensors.keys().filter(|k| !names.contains(k)).cloned().collect();
        let mut mismatched: Vec<String> = tensors
            .iter()
            .filter(|(k, _)| names.contains(k))
            .filter(|(k, t)| t.shape() != params[k.as_str()].shape() || t.dtype() != Dtype::Float32)
            .map(|(k, t)| {
                let p = params[k.as_str()];
                format!(
                    "{k}: checkpoint {} {}, model {} {}",
                    weights::shape_str(t.shape()),
                    weights::dtype_name(t.dtype()),
                    weights::shape_str(p.shape()),
                    weights::dtype_name(p.dtype())
                )
            })
            .collect();
        missing.sort();
        unexpected.sort();
        mismatched.sort();
        let report = LoadReport {
            missing,
            unexpected,
            mismatched,
            ignored: vec![],
        };
        if !report.ok() {
            return Err(Error::Weights(format!(
                "{}: lora_init does not match the adapters:\n{}",
                path.display(),
                report.describe()
            )));
        }
        let update: HashMap<Rc<str>, Array> = tensors.into_iter().map(|(k, v)| (Rc::from(k.as_str()), v)).collect();
        self.model.update_flattened(update);
        Ok(())
    }

    pub(crate) fn eval_params(&self) -> Result<()> {
        let p = self.model.parameters().flatten();
        eval(p.values().copied())?;
        Ok(())
    }

    pub fn trainable_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .model
            .trainable_parameters()
            .flatten()
            .keys()
            .map(|k| k.to_string())
            .collect();
        v.sort();
        v
    }

    pub fn parameters(&self) -> Vec<(String, Array)> {
        let mut v: Vec<(String, Array)> = self
            .model
            .parameters()
            .flatten()
            .into_iter()
            .map(|(k, a)| (k.to_string(), a.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn forward(&self, ids: &Array) -> Result<(Array, Vec<Array>)> {
        let (logits, hidden) = self.model.forward_with_hidden(ids)?;
        let mut all: Vec<&Array> = hidden.iter().collect();
        all.push(&logits);
        eval(all)?;
        Ok((logits, hidden))
    }

    /// The forward pass in its pieces (`LlamaForCausalLM::pieces`): the own chain without `given`, else
    /// each piece from the given values of its inputs (the isolated forward check). Every given piece
    /// that is read must be there; the error names the missing ones.
    pub fn pieces(&self, ids: &Array, given: Option<&Pieces>) -> Result<Pieces> {
        if let Some(g) = given {
            let missing: Vec<String> = self
                .model
                .given_names()
                .into_iter()
                .filter(|n| !g.contains_key(n))
                .collect();
            if !missing.is_empty() {
                return Err(Error::Batch(format!(
                    "the given pieces lack {} of the forward's inputs: {}",
                    missing.len(),
                    missing.join(", ")
                )));
            }
        }
        // Given pieces arrive as float32; the port computes in its precision (bfloat16 pieces there).
        let dtype = self.compute_dtype();
        let cast: Option<Pieces> = match given {
            Some(g) if dtype != Dtype::Float32 => Some(
                g.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            if v.dtype() == dtype {
                                v.clone()
                            } else {
                                v.as_dtype(dtype)?
                            },
                        ))
                    })
                    .collect::<Result<Pieces>>()?,
            ),
            _ => None,
        };
        let pieces = self.model.pieces(ids, cast.as_ref().or(given))?;
        eval(pieces.values())?;
        Ok(pieces)
    }

    pub fn shifted(&self, ids: &Array, mask: &Array) -> Result<(Array, Array)> {
        let (ids_s, mask_s) = match inject::unshifted_targets(self.settings.inject, ids, mask) {
            Some(unshifted) => unshifted?,
            None => shifted_targets(ids, mask)?,
        };
        let ids_s = ids_s.as_dtype(Dtype::Int32)?;
        eval([&ids_s, &mask_s])?;
        Ok((ids_s, mask_s))
    }

    pub fn loss(&self, batch: &Batch) -> Result<LossParts> {
        let l = &self.settings.loss;
        validate_loss_scalars(l.alpha, l.lambda)?;
        let v = loss_arrays(&self.model, &batch.arrays(), l, self.settings.inject)?;
        eval(v.iter())?;
        LossParts::read(&v)
    }

    /// The loss parts of given logits `[B, T, V]` (the isolated loss check).
    pub fn loss_from_logits(&self, logits: &Array, batch: &Batch) -> Result<LossParts> {
        let l = &self.settings.loss;
        validate_loss_scalars(l.alpha, l.lambda)?;
        let v = loss_of_logits(logits, &batch.arrays(), l, self.settings.inject)?;
        eval(v.iter())?;
        LossParts::read(&v)
    }

    /// One update (clip, then AdamW) with given gradients by name (the isolated optimizer check). Given
    /// gradients arrive as float32; each is cast to its parameter's dtype (bfloat16 under bfloat16, but
    /// float32 for the LoRA adapters), the dtype value_and_grad gives it.
    pub fn update_from_gradients(&mut self, mut grads: HashMap<String, Array>) -> Result<()> {
        {
            let params = self.model.parameters().flatten();
            for (k, g) in grads.iter_mut() {
                if let Some(p) = params.get(k.as_str()) {
                    if g.dtype() != p.dtype() {
                        *g = g.as_dtype(p.dtype())?;
                    }
                }
            }
        }
        self.clip(&mut grads)?;
        self.apply(&grads)
    }

    /// Loss parts and d(total)/d(trainable) of one (micro-)batch, by name.
    fn value_and_grad(&mut self, batch: &Batch) -> Result<(LossParts, HashMap<String, Array>)> {
        let (l, bug) = (self.settings.loss.clone(), self.settings.inject);
        // The trainable arrays before tracing, restored afterwards (value_and_grad leaves tracer
        // copies of them in the module).
        let before: HashMap<Rc<str>, Array> = self
            .model
            .trainable_parameters()
            .flatten()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let loss_fn =
            move |model: &mut LlamaForCausalLM,
                  args: (Array, Array, Array, Array)|
                  -> std::result::Result<Vec<Array>, Exception> { loss_arrays(model, &args, &l, bug) };
        let mut vg = nn::value_and_grad(loss_fn);
        let result = vg(&mut self.model, batch.arrays());
        self.model.update_flattened(before);
        let (vals, grads) = result?;
        let mut out: Vec<&Array> = vals.iter().collect();
        out.extend(grads.values());
        eval(out)?;
        let parts = LossParts::read(&vals)?;
        Ok((parts, grads.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    pub fn gradients(&mut self, batch: &Batch) -> Result<(LossParts, HashMap<String, Array>)> {
        validate_loss_scalars(self.settings.loss.alpha, self.settings.loss.lambda)?;
        if let Some(zeros) = inject::zero_gradients(self, batch) {
            return zeros;
        }
        self.value_and_grad(batch)
    }

    /// One optimizer update (docs/training-step.md, "One optimizer step"): gradients accumulated over
    /// the micro-batches and averaged, clipped, one AdamW step.
    pub fn step(&mut self, batch: &Batch) -> Result<LossParts> {
        validate_loss_scalars(self.settings.loss.alpha, self.settings.loss.lambda)?;
        let mut micro = batch.split(self.settings.accum_steps as usize)?;
        if let Some(g) = &self.group {
            // this rank's contiguous share of every micro-batch
            micro = micro
                .iter()
                .map(|mb| Ok(mb.split(g.size())?.swap_remove(g.rank())))
                .collect::<Result<_>>()?;
        }
        if let Some(loss) = inject::loss_without_update(self, &micro) {
            return loss;
        }
        let n = micro.len();
        let mut grads: Option<HashMap<String, Array>> = None;
        let mut parts = Vec::with_capacity(n);
        for mb in &micro {
            let (p, g) = self.value_and_grad(mb)?;
            grads = Some(match grads {
                None => g,
                Some(acc) => {
                    let mut sum = HashMap::new();
                    for (k, a) in acc {
                        let b = &g[&k];
                        sum.insert(k, ops::add(&a, b)?);
                    }
                    eval(sum.values())?;
                    sum
                }
            });
            parts.push(p);
        }
        let mut grads = grads.unwrap_or_default();
        if n > 1 {
            // `g / n`, n a Python int: in the gradient's dtype (bfloat16 gradients stay bfloat16).
            for g in grads.values_mut() {
                let k = scalar_like(n as f32, g)?;
                *g = ops::divide(&*g, &k)?;
            }
        }
        if let Some(g) = &self.group {
            // all-summed, divided by the world size (in the gradient's dtype), in one order on every rank: the
            // collectives pair up by call order, and a HashMap's order differs from process to process
            let mut names: Vec<String> = grads.keys().cloned().collect();
            names.sort();
            for name in names {
                let grad = grads.get_mut(&name).expect("a key of grads");
                let world = scalar_like(g.size() as f32, grad)?;
                *grad = ops::divide(&g.all_sum(grad)?, &world)?;
            }
            eval(grads.values())?;
            parts = gathered(g, &parts)?;
        }
        self.clip(&mut grads)?;
        self.apply(&grads)?;
        Ok(LossParts::mean(&parts))
    }

    /// `optim.clip_grad_norm` when `clip_norm` is set, over the module tree's order.
    fn clip(&self, grads: &mut HashMap<String, Array>) -> Result<()> {
        match self.settings.clip_norm {
            Some(max_norm) => clip_grad_norm(grads, &self.model.ordered_names(), max_norm),
            None => Ok(()),
        }
    }

    /// One AdamW update at the schedule's learning rate for the updates already done.
    fn apply(&mut self, grads: &HashMap<String, Array>) -> Result<()> {
        let s = &self.settings;
        let lr = learning_rate(&s.optimizer, &s.schedule, self.optimizer.step)?;
        let updated = self
            .optimizer
            .update(&s.optimizer, lr, &self.model.parameters().flatten(), grads)?;
        if !inject::update_dropped(s.inject) {
            self.model.update_flattened(updated);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{settings, tiny_checkpoint, tmp};

    #[test]
    fn loads_strictly_and_ignores_rotary_buffers() {
        let d_dir = tmp("load");
        let d = d_dir.path();
        tiny_checkpoint(d, false);
        let t = Trainer::new(d, settings(""), None, true).unwrap();
        assert!(t.report.ok());
        assert_eq!(
            t.report.ignored,
            vec!["model.layers.0.self_attn.rotary_emb.inv_freq".to_string()]
        );
        // A tied config does not match an untied checkpoint: lm_head.weight is unexpected.
        let d2_dir = tmp("load-tied");
        let d2 = d2_dir.path();
        tiny_checkpoint(d2, false);
        let cfg = std::fs::read_to_string(d2.join("config.json"))
            .unwrap()
            .replace("\"tie_word_embeddings\":false", "\"tie_word_embeddings\":true");
        std::fs::write(d2.join("config.json"), cfg).unwrap();
        let err = Trainer::new(d2, settings(""), None, true).err().unwrap().to_string();
        assert!(err.contains("unexpected (1): lm_head.weight"), "{err}");
    }
}
