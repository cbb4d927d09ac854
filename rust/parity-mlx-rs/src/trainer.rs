//! The training step (docs/training-step.md): shifted CE + distrust loss, value_and_grad over the
//! trainable set, accumulation, clipping, AdamW with both bias-correction conventions, schedules,
//! checkpoints. Op order follows the MLX reference (and MLX's own `optim.AdamW`, `clip_grad_norm`,
//! schedulers) so that float32 results agree bit for bit where the kernels allow. Under
//! `"precision": "bfloat16"` each of them runs in its operands' dtype as MLX's Python does (a Python float
//! constant takes the dtype of the array it meets: `model::scalar_like`), the gradients, their
//! accumulation, clipping and AdamW in each parameter's dtype.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
    rc::Rc,
};

use mlx_rs::{
    error::Exception,
    module::{ModuleParameters, Parameter},
    nn,
    ops::{self, indexing::IndexOp},
    stop_gradient,
    transforms::eval,
    Array, Dtype,
};
use serde_json::{json, Value};

use crate::{
    config::ModelConfig,
    error::{Error, Result},
    model::{scalar_like, LlamaForCausalLM, Pieces},
    settings::{validate_loss_scalars, Inject, Schedule, TrainSettings, Trainable},
    weights::{self, LoadReport},
};

pub const CHECKPOINT_FORMAT: &str = "mlx-parity-checkpoint/1";
pub const AUTH_WEIGHT_MAX: f64 = 0.99;
pub const DISTRUST_EPS: f64 = 1e-8;

/// A host batch, validated (docs/training-step.md, "Batch").
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<i32>,
    pub attention_mask: Vec<i32>,
    pub auth_weight: Vec<f32>,
    pub prov_entropy: Vec<f32>,
    pub b: usize,
    pub t: usize,
}

impl Batch {
    pub fn new(
        input_ids: Vec<i32>,
        ids_shape: &[usize],
        attention_mask: Vec<f64>,
        mask_shape: &[usize],
        auth_weight: Vec<f64>,
        w_shape: &[usize],
        prov_entropy: Vec<f64>,
        h_shape: &[usize],
    ) -> Result<Self> {
        // Validated in float64 (as the reference does), computed in float32.
        let bad = |m: String| Err(Error::Batch(m));
        if ids_shape.len() != 2 || ids_shape[1] < 2 {
            return bad(format!("input_ids must be [B, T] with T >= 2, got shape {ids_shape:?}"));
        }
        if mask_shape != ids_shape {
            return bad(format!(
                "attention_mask shape {mask_shape:?} differs from input_ids shape {ids_shape:?}"
            ));
        }
        let (b, t) = (ids_shape[0], ids_shape[1]);
        if attention_mask.iter().any(|&m| m != 0.0 && m != 1.0) {
            return bad("attention_mask must hold only 0 and 1".into());
        }
        let attention_mask: Vec<i32> = attention_mask.iter().map(|&m| m as i32).collect();
        for r in 0..b {
            let row = &attention_mask[r * t..(r + 1) * t];
            if row.windows(2).any(|w| w[1] > w[0]) {
                return bad("attention_mask must be right padding (1s then 0s) in every row".into());
            }
            if row.iter().sum::<i32>() < 2 {
                return bad("every row needs at least 2 tokens, so it has a target to predict".into());
            }
        }
        for (name, arr, shape) in [
            ("auth_weight", &auth_weight, w_shape),
            ("prov_entropy", &prov_entropy, h_shape),
        ] {
            if shape != [b] {
                return bad(format!("{name} must have shape ({b},), got {shape:?}"));
            }
            let nonfinite: Vec<usize> = arr
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_finite())
                .map(|(i, _)| i)
                .collect();
            if !nonfinite.is_empty() {
                return bad(format!("{name} holds non-finite values at {nonfinite:?}"));
            }
        }
        // 0.99 stored as float32 is 0.9900000095: it still means 0.99, as in the reference.
        let in_range = |w: f64| w >= 0.0 && (w <= AUTH_WEIGHT_MAX || (w as f32) <= (AUTH_WEIGHT_MAX as f32));
        let rows: Vec<usize> = (0..b).filter(|&i| !in_range(auth_weight[i])).collect();
        if !rows.is_empty() {
            let vals: Vec<f64> = rows.iter().map(|&i| auth_weight[i]).collect();
            return bad(format!(
                "auth_weight must be in [0, {AUTH_WEIGHT_MAX}]; rows {rows:?} hold {vals:?}"
            ));
        }
        let rows: Vec<usize> = (0..b).filter(|&i| prov_entropy[i] < 0.0).collect();
        if !rows.is_empty() {
            let vals: Vec<f64> = rows.iter().map(|&i| prov_entropy[i]).collect();
            return bad(format!("prov_entropy must be >= 0; rows {rows:?} hold {vals:?}"));
        }
        let auth_weight: Vec<f32> = auth_weight.iter().map(|&x| x as f32).collect();
        let prov_entropy: Vec<f32> = prov_entropy.iter().map(|&x| x as f32).collect();
        Ok(Batch {
            input_ids,
            attention_mask,
            auth_weight,
            prov_entropy,
            b,
            t,
        })
    }

    /// Micro-batches for accumulation: the batch cut in order into `parts` equal slices.
    pub fn split(&self, parts: usize) -> Result<Vec<Batch>> {
        if self.b % parts != 0 {
            return Err(Error::Settings(format!(
                "batch size {} is not divisible by accum_steps={parts}",
                self.b
            )));
        }
        let n = self.b / parts;
        Ok((0..parts)
            .map(|i| Batch {
                input_ids: self.input_ids[i * n * self.t..(i + 1) * n * self.t].to_vec(),
                attention_mask: self.attention_mask[i * n * self.t..(i + 1) * n * self.t].to_vec(),
                auth_weight: self.auth_weight[i * n..(i + 1) * n].to_vec(),
                prov_entropy: self.prov_entropy[i * n..(i + 1) * n].to_vec(),
                b: n,
                t: self.t,
            })
            .collect())
    }

    /// (input_ids, attention_mask, auth_weight, prov_entropy) as MLX arrays.
    pub fn arrays(&self) -> (Array, Array, Array, Array) {
        let (b, t) = (self.b as i32, self.t as i32);
        (
            Array::from_slice(&self.input_ids, &[b, t]),
            Array::from_slice(&self.attention_mask, &[b, t]),
            Array::from_slice(&self.auth_weight, &[b]),
            Array::from_slice(&self.prov_entropy, &[b]),
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LossParts {
    /// float32 values widened to f64; after accumulation the f64 mean of the micro-batch values
    /// (as the reference computes it from Python floats).
    pub ce: f64,
    pub distrust: f64,
    pub total: f64,
}

/// `(logits_s, targets, mask)`: position t predicts token t+1 (or, injected, no shift).
pub fn shifted_slices(
    logits: &Array,
    ids: &Array,
    mask: &Array,
    no_shift: bool,
) -> std::result::Result<(Array, Array, Array), Exception> {
    let t = ids.shape()[1];
    if no_shift {
        return Ok((logits.clone(), ids.clone(), mask.as_dtype(Dtype::Float32)?));
    }
    Ok((
        logits.index((.., 0..t - 1, ..)),
        ids.index((.., 1..t)),
        mask.index((.., 1..t)).as_dtype(Dtype::Float32)?,
    ))
}

/// MLX's `nn.losses.cross_entropy(logits, targets, reduction="none")` (CPU path), then the masked mean.
fn cross_entropy(logits: &Array, targets: &Array, mask: &Array) -> std::result::Result<Array, Exception> {
    let max = stop_gradient(logits.max_axis(-1, true)?)?;
    let logits = ops::subtract(logits, &max)?;
    let score = logits
        .take_along_axis(targets.expand_dims(-1)?, -1)?
        .squeeze_axes(&[-1])?;
    let lse = logits.logsumexp_axis(-1, false)?;
    let per_token = ops::subtract(&lse, &score)?;
    ops::divide(ops::multiply(&per_token, mask)?.sum(None)?, mask.sum(None)?)
}

/// Batch mean of `alpha * (ln(1 - w + 1e-8) + H)^2`.
fn distrust(w: &Array, h: &Array, alpha: f64) -> std::result::Result<Array, Exception> {
    let one_minus = ops::subtract(Array::from_f32(1.0), w)?;
    let inner = ops::add(
        ops::log(ops::add(&one_minus, Array::from_f32(DISTRUST_EPS as f32))?)?,
        h,
    )?;
    ops::multiply(Array::from_f32(alpha as f32), ops::square(&inner)?)?.mean(None)
}

/// `[total, ce, distrust]` of one batch; `total` first, so value_and_grad differentiates it.
fn loss_arrays(
    model: &LlamaForCausalLM,
    args: &(Array, Array, Array, Array),
    alpha: f64,
    lambda: f64,
    no_shift: bool,
) -> std::result::Result<Vec<Array>, Exception> {
    let logits = model.forward(&args.0)?;
    // Under bfloat16 the logits go to the loss in float32 (`logits.astype(mx.float32)`).
    let logits = if logits.dtype() == Dtype::Float32 {
        logits
    } else {
        logits.as_dtype(Dtype::Float32)?
    };
    loss_of_logits(&logits, args, alpha, lambda, no_shift)
}

/// `[total, ce, distrust]` of given logits: the loss on its own (the isolated loss check).
fn loss_of_logits(
    logits: &Array,
    args: &(Array, Array, Array, Array),
    alpha: f64,
    lambda: f64,
    no_shift: bool,
) -> std::result::Result<Vec<Array>, Exception> {
    let (ids, mask, w, h) = args;
    let (ls, targets, m) = shifted_slices(logits, ids, mask, no_shift)?;
    let ce = cross_entropy(&ls, &targets, &m)?;
    let d = distrust(w, h, alpha)?;
    let total = ops::add(&ce, ops::multiply(Array::from_f32(lambda as f32), &d)?)?;
    Ok(vec![total, ce, d])
}

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

fn scalar(a: &Array) -> Result<f64> {
    let a = a.as_dtype(Dtype::Float32)?;
    a.eval()?;
    Ok(a.item_exact::<f32>() as f64)
}

pub struct Trainer {
    pub cfg: ModelConfig,
    pub settings: TrainSettings,
    pub model: LlamaForCausalLM,
    pub report: LoadReport,
    pub adapter_names: Vec<String>,
    /// Updates already done.
    pub step: u64,
    pub m: HashMap<String, Array>,
    pub v: HashMap<String, Array>,
    /// The learning rate of the last update (MLX keeps it in the optimizer state).
    pub last_lr: Option<Array>,
}

impl Trainer {
    pub fn new(checkpoint_dir: &Path, settings: TrainSettings, lora_init: Option<&Path>, strict: bool) -> Result<Self> {
        let cfg = ModelConfig::from_dir(checkpoint_dir)?;
        let mut model = LlamaForCausalLM::new(&cfg, settings.seed)?;
        let report = if settings.inject == Some(Inject::WeightsNotLoaded) {
            // Injected bug: the checkpoint is never read; the random initialisation stays.
            LoadReport::default()
        } else {
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
        };
        // Loaded into the float32 model (as the reference does), then cast to the training precision.
        Self::cast_model(&mut model, &settings)?;
        let mut t = Trainer {
            cfg,
            settings,
            model,
            report,
            adapter_names: Vec::new(),
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
            last_lr: None,
        };
        t.setup_trainable(lora_init)?;
        t.eval_params()?;
        Ok(t)
    }

    /// A trainer rebuilt from a checkpoint folder alone (`save_checkpoint`'s, or the reference's):
    /// config.json, the settings in trainer.json, then `load_checkpoint`.
    pub fn from_checkpoint(path: &Path) -> Result<Self> {
        let meta_path = path.join("trainer.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|_| {
            Error::Io(format!(
                "{} is not a trainer checkpoint (no trainer.json)",
                path.display()
            ))
        })?;
        let meta: Value =
            serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", meta_path.display())))?;
        let mut settings = meta
            .get("settings")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| Error::Weights(format!("{}: trainer.json has no settings", meta_path.display())))?;
        if let Some(rust) = meta.get("rust").and_then(Value::as_object) {
            for key in ["inject", "seed"] {
                if let Some(v) = rust.get(key).filter(|v| !v.is_null()) {
                    settings.insert(key.into(), v.clone());
                }
            }
        }
        let settings = TrainSettings::from_map(&settings)?;
        let cfg = ModelConfig::from_dir(path)?;
        let mut model = LlamaForCausalLM::new(&cfg, settings.seed)?;
        Self::cast_model(&mut model, &settings)?;
        let mut t = Trainer {
            cfg,
            settings,
            model,
            report: LoadReport::default(),
            adapter_names: Vec::new(),
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
            last_lr: None,
        };
        t.setup_trainable(None)?;
        t.load_checkpoint(path)?;
        Ok(t)
    }

    /// The model in the settings' precision (the reference's `model.set_dtype`): under bfloat16 every
    /// parameter, the checkpoint's tensors as loaded into float32, is cast to bfloat16 (rounded to nearest
    /// even). Called before the LoRA adapters exist, so they stay float32.
    fn cast_model(model: &mut LlamaForCausalLM, settings: &TrainSettings) -> Result<()> {
        let dtype = settings.precision.dtype();
        if dtype != Dtype::Float32 {
            model.cast_parameters(dtype)?;
        }
        Ok(())
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

    fn eval_params(&self) -> Result<()> {
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

    fn no_shift(&self) -> bool {
        self.settings.inject == Some(Inject::NoShift)
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
        let (ids_s, mask_s) = if self.no_shift() {
            (ids.clone(), mask.as_dtype(Dtype::Float32)?)
        } else {
            let t = ids.shape()[1];
            (ids.index((.., 1..t)), mask.index((.., 1..t)).as_dtype(Dtype::Float32)?)
        };
        let ids_s = ids_s.as_dtype(Dtype::Int32)?;
        eval([&ids_s, &mask_s])?;
        Ok((ids_s, mask_s))
    }

    pub fn loss(&self, batch: &Batch) -> Result<LossParts> {
        let l = &self.settings.loss;
        validate_loss_scalars(l.alpha, l.lambda)?;
        let v = loss_arrays(&self.model, &batch.arrays(), l.alpha, l.lambda, self.no_shift())?;
        eval(v.iter())?;
        Ok(LossParts {
            total: scalar(&v[0])?,
            ce: scalar(&v[1])?,
            distrust: scalar(&v[2])?,
        })
    }

    /// The loss parts of given logits `[B, T, V]` (the isolated loss check).
    pub fn loss_from_logits(&self, logits: &Array, batch: &Batch) -> Result<LossParts> {
        let l = &self.settings.loss;
        validate_loss_scalars(l.alpha, l.lambda)?;
        let v = loss_of_logits(logits, &batch.arrays(), l.alpha, l.lambda, self.no_shift())?;
        eval(v.iter())?;
        Ok(LossParts {
            total: scalar(&v[0])?,
            ce: scalar(&v[1])?,
            distrust: scalar(&v[2])?,
        })
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
        self.apply_adamw(&grads)
    }

    /// Loss parts and d(total)/d(trainable) of one (micro-)batch, by name.
    fn value_and_grad(&mut self, batch: &Batch) -> Result<(LossParts, HashMap<String, Array>)> {
        let l = &self.settings.loss;
        let (alpha, lambda, no_shift) = (l.alpha, l.lambda, self.no_shift());
        // The trainable arrays before tracing, restored afterwards (value_and_grad leaves tracer
        // copies of them in the module).
        let before: HashMap<Rc<str>, Array> = self
            .model
            .trainable_parameters()
            .flatten()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let loss_fn = move |model: &mut LlamaForCausalLM,
                            args: (Array, Array, Array, Array)|
              -> std::result::Result<Vec<Array>, Exception> {
            loss_arrays(model, &args, alpha, lambda, no_shift)
        };
        let mut vg = nn::value_and_grad(loss_fn);
        let result = vg(&mut self.model, batch.arrays());
        self.model.update_flattened(before);
        let (vals, grads) = result?;
        let mut out: Vec<&Array> = vals.iter().collect();
        out.extend(grads.values());
        eval(out)?;
        let parts = LossParts {
            total: scalar(&vals[0])?,
            ce: scalar(&vals[1])?,
            distrust: scalar(&vals[2])?,
        };
        Ok((parts, grads.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    pub fn gradients(&mut self, batch: &Batch) -> Result<(LossParts, HashMap<String, Array>)> {
        validate_loss_scalars(self.settings.loss.alpha, self.settings.loss.lambda)?;
        if self.settings.inject == Some(Inject::ForwardOnly) {
            // Injected bug: no gradients are computed; zeros are reported.
            let parts = self.loss(batch)?;
            let params = self.model.trainable_parameters().flatten();
            let mut zeros = HashMap::new();
            for (k, p) in params {
                zeros.insert(k.to_string(), ops::zeros_like(p)?);
            }
            return Ok((parts, zeros));
        }
        self.value_and_grad(batch)
    }

    /// The learning rate of update `s` (updates already done), with MLX's schedulers' float32 ops.
    fn learning_rate(&self, s: u64) -> Result<Array> {
        let o = &self.settings.optimizer;
        let step = Array::from_slice(&[s], &[]);
        let lr = match &self.settings.schedule {
            Schedule::Constant => Array::from_f32(o.lr as f32),
            Schedule::WarmupCosine {
                warmup_steps,
                warmup_init,
                decay_steps,
                end_lr,
            } => {
                let cosine = |x: &Array| -> std::result::Result<Array, Exception> {
                    // optim.cosine_decay(lr, decay_steps, end_lr)
                    let s = ops::minimum(x, Array::from_slice(&[*decay_steps as u64], &[]))?;
                    let ang = ops::multiply(Array::from_f32((std::f64::consts::PI / *decay_steps as f64) as f32), &s)?;
                    let decay = ops::multiply(Array::from_f32(0.5), ops::add(Array::from_f32(1.0), ops::cos(&ang)?)?)?;
                    ops::add(
                        Array::from_f32(*end_lr as f32),
                        ops::multiply(&decay, Array::from_f32((o.lr - end_lr) as f32))?,
                    )
                };
                if *warmup_steps == 0 {
                    cosine(&step)?
                } else {
                    // optim.linear_schedule(warmup_init, lr, warmup_steps), joined at warmup_steps.
                    let w = *warmup_steps as u64;
                    let ws = ops::minimum(&step, Array::from_slice(&[w], &[]))?;
                    let warm = ops::add(
                        ops::multiply(&ws, Array::from_f32(((o.lr - warmup_init) / w as f64) as f32))?,
                        Array::from_f32(*warmup_init as f32),
                    )?;
                    if s < w {
                        warm
                    } else {
                        cosine(&ops::subtract(&step, Array::from_slice(&[w], &[]))?)?
                    }
                }
            }
        };
        Ok(lr.as_dtype(Dtype::Float32)?)
    }

    /// One optimizer update (docs/training-step.md, "One optimizer step").
    pub fn step(&mut self, batch: &Batch) -> Result<LossParts> {
        validate_loss_scalars(self.settings.loss.alpha, self.settings.loss.lambda)?;
        let micro = batch.split(self.settings.accum_steps as usize)?;
        let n = micro.len();
        if self.settings.inject == Some(Inject::ForwardOnly) {
            // Injected bug (the seed's silent fallback): the loss, and no update at all.
            let (mut ce, mut d, mut tot) = (0f64, 0f64, 0f64);
            for mb in &micro {
                let p = self.loss(mb)?;
                ce += p.ce;
                d += p.distrust;
                tot += p.total;
            }
            let k = n as f64;
            return Ok(LossParts {
                ce: ce / k,
                distrust: d / k,
                total: tot / k,
            });
        }
        let mut grads: Option<HashMap<String, Array>> = None;
        let (mut ce, mut d, mut tot) = (0f64, 0f64, 0f64);
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
            ce += p.ce;
            d += p.distrust;
            tot += p.total;
        }
        let mut grads = grads.unwrap_or_default();
        if n > 1 {
            // `g / n`, n a Python int: in the gradient's dtype (bfloat16 gradients stay bfloat16).
            for g in grads.values_mut() {
                let k = scalar_like(n as f32, g)?;
                *g = ops::divide(&*g, &k)?;
            }
        }
        self.clip(&mut grads)?;
        self.apply_adamw(&grads)?;
        let k = n as f64;
        Ok(LossParts {
            ce: ce / k,
            distrust: d / k,
            total: tot / k,
        })
    }

    /// `optim.clip_grad_norm` when `clip_norm` is set: the squared norms summed in module-tree order,
    /// `0.0 + sum(g1^2) + sum(g2^2) + ...` (the Python floats in the dtype of the array they meet: a
    /// bfloat16 norm for bfloat16 gradients), `normalizer = minimum(max_norm / (norm + 1e-6), 1.0)`.
    fn clip(&self, grads: &mut HashMap<String, Array>) -> Result<()> {
        if let Some(max_norm) = self.settings.clip_norm {
            let order = self.model.ordered_names();
            let mut acc: Option<Array> = None;
            for name in order.iter().filter(|n| grads.contains_key(*n)) {
                let sq = ops::square(&grads[name])?.sum(None)?;
                acc = Some(match acc {
                    None => ops::add(scalar_like(0.0, &sq)?, &sq)?,
                    Some(a) => ops::add(&a, &sq)?,
                });
            }
            let acc = match acc {
                Some(a) => a,
                None => return Ok(()),
            };
            let total_norm = ops::sqrt(&acc)?;
            let normalizer = ops::minimum(
                ops::divide(
                    scalar_like(max_norm as f32, &total_norm)?,
                    ops::add(&total_norm, scalar_like(1e-6, &total_norm)?)?,
                )?,
                scalar_like(1.0, &total_norm)?,
            )?;
            for g in grads.values_mut() {
                *g = ops::multiply(&*g, &normalizer)?;
            }
        }
        Ok(())
    }

    /// MLX's `optim.AdamW.apply_single`, both bias-correction conventions, schedule read at the
    /// number of updates already done. Each update runs in its gradient's dtype: `lr.astype(g.dtype)`, the
    /// Python float constants in that dtype, `m` and `v` zeros of the parameter's dtype, and the bias
    /// corrections computed in float32 (`b ** step` with a uint64 step) and then cast to it.
    fn apply_adamw(&mut self, grads: &HashMap<String, Array>) -> Result<()> {
        let o = self.settings.optimizer.clone();
        let lr_f32 = self.learning_rate(self.step)?;
        let t = self.step + 1;
        let (b1, b2) = o.betas;
        let f = |x: f64| Array::from_f32(x as f32);
        let step_arr = Array::from_slice(&[t], &[]);
        let mut new_params: HashMap<Rc<str>, Array> = HashMap::new();
        let params = self.model.parameters().flatten();
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        for name in names {
            let g = &grads[name];
            let dt = g.dtype();
            // A Python float meeting an array of the gradient's dtype (identical to `f` for float32).
            let d = |x: f64| scalar_like(x as f32, g);
            let lr = if dt == lr_f32.dtype() {
                lr_f32.clone()
            } else {
                lr_f32.as_dtype(dt)?
            };
            let p = params
                .get(name.as_str())
                .ok_or_else(|| Error::Mlx(format!("gradient for unknown parameter {name}")))?;
            let m0 = match self.m.get(name) {
                Some(m) => m.clone(),
                None => ops::zeros_like(p)?,
            };
            let v0 = match self.v.get(name) {
                Some(v) => v.clone(),
                None => ops::zeros_like(p)?,
            };
            // parameter * (1 - lr * weight_decay)
            let decayed = ops::multiply(*p, ops::subtract(d(1.0)?, ops::multiply(&lr, d(o.weight_decay)?)?)?)?;
            let m = ops::add(ops::multiply(d(b1)?, &m0)?, ops::multiply(d(1.0 - b1)?, g)?)?;
            let v = ops::add(
                ops::multiply(d(b2)?, &v0)?,
                ops::multiply(d(1.0 - b2)?, ops::square(g)?)?,
            )?;
            let updated = if o.bias_correction {
                // (lr / (1 - b1**step)).astype(g.dtype), rsqrt(1 - b2**step).astype(g.dtype): float32
                // inside (b ** step is float32 against the uint64 step), rounded to the gradient's dtype.
                let mut c1 = ops::divide(&lr, ops::subtract(f(1.0), ops::power(f(b1), &step_arr)?)?)?;
                let mut c2 = ops::rsqrt(ops::subtract(f(1.0), ops::power(f(b2), &step_arr)?)?)?;
                if c1.dtype() != dt {
                    c1 = c1.as_dtype(dt)?;
                }
                if c2.dtype() != dt {
                    c2 = c2.as_dtype(dt)?;
                }
                let num = ops::multiply(&c1, &m)?;
                let den = ops::add(ops::multiply(ops::sqrt(&v)?, &c2)?, d(o.eps)?)?;
                ops::subtract(&decayed, ops::divide(&num, &den)?)?
            } else {
                let num = ops::multiply(&lr, &m)?;
                ops::subtract(&decayed, ops::divide(&num, ops::add(ops::sqrt(&v)?, d(o.eps)?)?)?)?
            };
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
            new_params.insert(Rc::from(name.as_str()), updated);
        }
        let mut all: Vec<&Array> = new_params.values().collect();
        all.extend(self.m.values());
        all.extend(self.v.values());
        eval(all)?;
        self.step = t;
        self.last_lr = Some(lr_f32);
        if self.settings.inject != Some(Inject::OptimizerDisconnected) {
            self.model.update_flattened(new_params);
        }
        // Injected bug optimizer_disconnected: moments and the counter advance, parameters do not.
        Ok(())
    }

    // --- checkpoints --------------------------------------------------------------------------

    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        if path.exists() {
            return Err(Error::Io(format!(
                "{} exists; not overwriting a checkpoint",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::Io(format!("bad checkpoint path {}", path.display())))?;
        let tmp = path.with_file_name(format!("{}.partial", name.to_string_lossy()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let params = self.parameters();
        Array::save_safetensors(
            params.iter().map(|(k, v)| (k.as_str(), v)),
            &meta,
            tmp.join("model.safetensors"),
        )?;
        // Optimizer state flattened like MLX's optimizer.state: step, learning_rate, <name>.m, <name>.v.
        let mut opt: Vec<(String, Array)> = vec![("step".into(), Array::from_slice(&[self.step], &[]))];
        if let Some(lr) = &self.last_lr {
            opt.push(("learning_rate".into(), lr.clone()));
        }
        for (k, m) in &self.m {
            opt.push((format!("{k}.m"), m.clone()));
        }
        for (k, v) in &self.v {
            opt.push((format!("{k}.v"), v.clone()));
        }
        Array::save_safetensors(
            opt.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            tmp.join("optimizer.safetensors"),
        )?;
        std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&self.cfg.to_hf_value()).unwrap(),
        )?;
        // The settings without the Rust-only keys, so the reference can read the checkpoint too.
        let mut settings = self.settings.to_value();
        let obj = settings.as_object_mut().unwrap();
        let inject = obj.remove("inject");
        let seed = obj.remove("seed");
        let meta = json!({
            "format": CHECKPOINT_FORMAT,
            "settings": settings,
            "step": self.step,
            "backend": "mlx-rs",
            "rust": {"inject": inject, "seed": seed, "adapters": self.adapter_names},
        });
        std::fs::write(tmp.join("trainer.json"), serde_json::to_string_pretty(&meta).unwrap())?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Restore parameters, moments and the update counter saved by `save_checkpoint` (or by the
    /// reference trainer) into this trainer, whose config and trainable set must match.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let meta_path = path.join("trainer.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|_| {
            Error::Io(format!(
                "{} is not a trainer checkpoint (no trainer.json)",
                path.display()
            ))
        })?;
        let meta: Value =
            serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", meta_path.display())))?;
        if meta.get("format").and_then(Value::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(Error::Weights(format!(
                "{}: unknown checkpoint format {:?}",
                path.display(),
                meta.get("format")
            )));
        }
        let cfg = ModelConfig::from_dir(path)?;
        if cfg != self.cfg {
            return Err(Error::Weights(format!(
                "{}: config.json differs from this trainer's model",
                path.display()
            )));
        }
        if let Some(tr) = meta.pointer("/settings/trainable").and_then(Value::as_str) {
            if tr != self.settings.trainable.as_str() {
                return Err(Error::Settings(format!(
                    "{}: checkpoint trains '{tr}', this trainer '{}'",
                    path.display(),
                    self.settings.trainable.as_str()
                )));
            }
        }
        let saved = weights::read_safetensors(&path.join("model.safetensors"))?;
        let expected = self.model.parameters().flatten();
        let mut report = LoadReport::default();
        report.missing = expected
            .keys()
            .filter(|k| !saved.contains_key(k.as_ref()))
            .map(|k| k.to_string())
            .collect();
        report.unexpected = saved
            .keys()
            .filter(|k| !expected.contains_key(k.as_str()))
            .cloned()
            .collect();
        report.mismatched = saved
            .iter()
            .filter(|(k, a)| {
                expected
                    .get(k.as_str())
                    .is_some_and(|p| p.shape() != a.shape() || p.dtype() != a.dtype())
            })
            .map(|(k, _)| k.clone())
            .collect();
        report.missing.sort();
        report.unexpected.sort();
        report.mismatched.sort();
        if !report.ok() {
            return Err(Error::Weights(format!(
                "{}: checkpoint does not match the model:\n{}",
                path.display(),
                report.describe()
            )));
        }
        let opt = weights::read_safetensors(&path.join("optimizer.safetensors"))?;
        let step = match opt.get("step") {
            Some(s) => {
                s.eval()?;
                s.as_dtype(Dtype::Uint64)?.item_exact::<u64>()
            }
            None => {
                return Err(Error::Weights(format!(
                    "{}: optimizer.safetensors has no step",
                    path.display()
                )))
            }
        };
        let names = self.trainable_names();
        let (mut m, mut v) = (HashMap::new(), HashMap::new());
        if step > 0 {
            for n in &names {
                match (opt.get(&format!("{n}.m")), opt.get(&format!("{n}.v"))) {
                    (Some(a), Some(b)) => {
                        m.insert(n.clone(), a.clone());
                        v.insert(n.clone(), b.clone());
                    }
                    _ => {
                        return Err(Error::Weights(format!(
                            "{}: optimizer.safetensors lacks the moments of {n}",
                            path.display()
                        )))
                    }
                }
            }
        }
        let update: HashMap<Rc<str>, Array> = saved.into_iter().map(|(k, v)| (Rc::from(k.as_str()), v)).collect();
        self.model.update_flattened(update);
        self.m = m;
        self.v = v;
        self.step = step;
        self.last_lr = opt.get("learning_rate").cloned();
        self.eval_params()?;
        let mut all: Vec<&Array> = self.m.values().collect();
        all.extend(self.v.values());
        eval(all)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::uniform;

    /// A tiny checkpoint written with mlx-rs itself: hidden 16, 2 layers, 4 heads on 2 kv heads.
    fn tiny_checkpoint(dir: &Path, tied: bool) {
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

    fn batch() -> Batch {
        let ids: Vec<i32> = (0..16).map(|i| (i * 7 + 3) % 24).collect();
        let mask: Vec<f64> = vec![1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.];
        Batch::new(ids, &[2, 8], mask, &[2, 8], vec![0.3, 0.9], &[2], vec![0.5, 1.25], &[2]).unwrap()
    }

    /// A fresh directory removed when the returned guard drops.
    fn tmp(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("parity-mlx-rs-test-{name}-"))
            .tempdir()
            .unwrap()
    }

    fn settings(extra: &str) -> TrainSettings {
        TrainSettings::from_json(&format!(
            r#"{{"schedule": {{"kind": "warmup_cosine", "warmup_steps": 2, "warmup_init": 1e-4, "decay_steps": 4, "end_lr": 0.0}},
                "clip_norm": 1.0, "accum_steps": 2, "steps": 4, "checkpoint_at": 2 {extra}}}"#
        ))
        .unwrap()
    }

    fn flat(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        t.parameters()
            .into_iter()
            .map(|(k, v)| (k, host_vec::<f32>(&v).unwrap()))
            .collect()
    }

    #[test]
    fn loads_strictly_and_ignores_rotary_buffers() {
        let d_dir = tmp("load");
        let d = d_dir.path();
        tiny_checkpoint(&d, false);
        let t = Trainer::new(&d, settings(""), None, true).unwrap();
        assert!(t.report.ok());
        assert_eq!(
            t.report.ignored,
            vec!["model.layers.0.self_attn.rotary_emb.inv_freq".to_string()]
        );
        // A tied config does not match an untied checkpoint: lm_head.weight is unexpected.
        let d2_dir = tmp("load-tied");
        let d2 = d2_dir.path();
        tiny_checkpoint(&d2, false);
        let cfg = std::fs::read_to_string(d2.join("config.json"))
            .unwrap()
            .replace("\"tie_word_embeddings\":false", "\"tie_word_embeddings\":true");
        std::fs::write(d2.join("config.json"), cfg).unwrap();
        let err = Trainer::new(&d2, settings(""), None, true).err().unwrap().to_string();
        assert!(err.contains("unexpected (1): lm_head.weight"), "{err}");
    }

    #[test]
    fn schedule_follows_the_contract() {
        let d_dir = tmp("sched");
        let d = d_dir.path();
        tiny_checkpoint(&d, true);
        let t = Trainer::new(&d, settings(""), None, true).unwrap();
        let lr = |s| {
            let a = t.learning_rate(s).unwrap();
            a.eval().unwrap();
            a.item_exact::<f32>() as f64
        };
        let expect = |s: u64| -> f64 {
            if s < 2 {
                1e-4 + s as f64 * (1e-3 - 1e-4) / 2.0
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * ((s - 2).min(4) as f64) / 4.0).cos()) * 1e-3
            }
        };
        for s in 0..8 {
            assert!((lr(s) - expect(s)).abs() < 1e-9, "s={s}: {} vs {}", lr(s), expect(s));
        }
    }

    #[test]
    fn step_updates_and_checkpoint_resumes_bit_exactly() {
        let d_dir = tmp("resume");
        let d = d_dir.path();
        tiny_checkpoint(&d, true);
        let b = batch();
        let mut a = Trainer::new(&d, settings(""), None, true).unwrap();
        let before = flat(&a);
        a.step(&b).unwrap();
        assert_ne!(before, flat(&a));
        a.step(&b).unwrap();
        let ck_dir = tmp("resume-ck");
        let ck = &ck_dir.path().join("checkpoint"); // save_checkpoint refuses an existing path
        a.save_checkpoint(&ck).unwrap();
        let l1 = a.step(&b).unwrap().total;
        let mut c = Trainer::new(&d, settings(""), None, true).unwrap();
        c.load_checkpoint(&ck).unwrap();
        let l2 = c.step(&b).unwrap().total;
        assert_eq!(l1, l2);
        assert_eq!(flat(&a), flat(&c));
        assert_eq!(a.step, 3);
        assert_eq!(c.step, 3);
    }

    /// `settings` under `"precision": "bfloat16"`, plus `extra`.
    fn bf16(extra: &str) -> TrainSettings {
        settings(&format!(r#", "precision": "bfloat16" {extra}"#))
    }

    fn dtypes(t: &Trainer) -> HashMap<String, Dtype> {
        t.parameters().into_iter().map(|(k, v)| (k, v.dtype())).collect()
    }

    /// bfloat16 except the LoRA adapters, which are float32.
    fn expected_dtype(name: &str) -> Dtype {
        if name.ends_with(".lora_a") || name.ends_with(".lora_b") {
            Dtype::Float32
        } else {
            Dtype::Bfloat16
        }
    }

    #[test]
    fn bf16_loads_every_checkpoint_tensor_as_bfloat16_rounded() {
        let d_dir = tmp("bf16-load");
        let d = d_dir.path();
        tiny_checkpoint(&d, false);
        let saved = weights::read_checkpoint(d).unwrap();
        let t = Trainer::new(&d, bf16(""), None, true).unwrap();
        assert!(t.report.ok(), "{}", t.report.describe());
        assert_eq!(t.compute_dtype(), Dtype::Bfloat16);
        let mut rounded = 0;
        for (k, p) in t.parameters() {
            assert_eq!(p.dtype(), Dtype::Bfloat16, "{k}");
            // MLX's astype of the float32 tensor: round to nearest even.
            let want = saved[&k].as_dtype(Dtype::Bfloat16).unwrap();
            assert_eq!(host_vec::<f32>(&p).unwrap(), host_vec::<f32>(&want).unwrap(), "{k}");
            rounded += (host_vec::<f32>(&p).unwrap() != host_vec::<f32>(&saved[&k]).unwrap()) as usize;
        }
        assert!(rounded > 10, "{rounded} tensors changed by rounding");
        // A float16 checkpoint, too; and float32 stays float32 under the default precision.
        let h_dir = tmp("bf16-load-f16");
        let h = h_dir.path();
        std::fs::copy(d.join("config.json"), h.join("config.json")).unwrap();
        let half: Vec<(String, Array)> = saved
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float16).unwrap()))
            .collect();
        Array::save_safetensors(
            half.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            h.join("model.safetensors"),
        )
        .unwrap();
        let th = Trainer::new(&h, bf16(""), None, true).unwrap();
        for (k, p) in th.parameters() {
            assert_eq!(p.dtype(), Dtype::Bfloat16, "{k}");
            let want = saved[&k]
                .as_dtype(Dtype::Float16)
                .unwrap()
                .as_dtype(Dtype::Bfloat16)
                .unwrap();
            assert_eq!(host_vec::<f32>(&p).unwrap(), host_vec::<f32>(&want).unwrap(), "{k}");
        }
        let f = Trainer::new(&d, settings(""), None, true).unwrap();
        assert!(dtypes(&f).values().all(|&dt| dt == Dtype::Float32));
        // The forward pass runs in bfloat16: logits and hidden states are bfloat16.
        let (logits, hidden) = t.forward(&batch().arrays().0).unwrap();
        assert_eq!(logits.dtype(), Dtype::Bfloat16);
        assert!(hidden.iter().all(|h| h.dtype() == Dtype::Bfloat16));
    }

    #[test]
    fn bf16_lora_adapters_stay_float32() {
        let d_dir = tmp("bf16-lora");
        let d = d_dir.path();
        tiny_checkpoint(&d, true);
        let lora = r#", "trainable": "lora", "lora": {"rank": 2, "layers": 1, "scale": 2.0}"#;
        let mut t = Trainer::new(&d, bf16(lora), None, true).unwrap();
        let names = t.trainable_names();
        assert_eq!(names.len(), 8);
        for (k, dt) in dtypes(&t) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        // lora_init is loaded as float32 (and must be float32).
        let init: Vec<(String, Array)> = t
            .parameters()
            .into_iter()
            .filter(|(k, _)| names.contains(k))
            .map(|(k, v)| (k.clone(), ops::add(&v, Array::from_f32(0.125)).unwrap()))
            .collect();
        let init_path = d.join("adapters.safetensors");
        Array::save_safetensors(init.iter().map(|(k, v)| (k.as_str(), v)), None, &init_path).unwrap();
        let t2 = Trainer::new(&d, bf16(lora), Some(&init_path), true).unwrap();
        for (k, dt) in dtypes(&t2) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        // A step: adapter gradients and moments float32, the frozen bfloat16 weights unchanged.
        let before = flat(&t);
        let (_, g) = t.gradients(&batch()).unwrap();
        assert!(g.values().all(|g| g.dtype() == Dtype::Float32));
        t.step(&batch()).unwrap();
        let after = flat(&t);
        for ((k, a), (_, b)) in before.iter().zip(&after) {
            if !names.contains(k) {
                assert_eq!(a, b, "{k} is frozen");
            }
        }
        assert!(before
            .iter()
            .zip(&after)
            .any(|((k, a), (_, b))| k.ends_with(".lora_b") && a != b));
        for (k, dt) in dtypes(&t) {
            assert_eq!(dt, expected_dtype(&k), "{k}");
        }
        assert!(t.m.values().chain(t.v.values()).all(|a| a.dtype() == Dtype::Float32));
    }

    #[test]
    fn bf16_step_keeps_dtypes_and_checkpoint_resumes_bit_exactly() {
        let d_dir = tmp("bf16-resume");
        let d = d_dir.path();
        tiny_checkpoint(&d, true);
        let b = batch();
        // A large learning rate, so that bfloat16 parameters visibly move (an update below half an ulp
        // is lost in bfloat16, as in mlx-lm).
        let big = r#", "optimizer": {"lr": 0.05, "weight_decay": 0.01}"#;
        let mut a = Trainer::new(&d, bf16(big), None, true).unwrap();
        let before = flat(&a);
        let (parts, g) = a.gradients(&b).unwrap();
        assert!(parts.total.is_finite());
        assert!(g.values().all(|g| g.dtype() == Dtype::Bfloat16));
        a.step(&b).unwrap();
        assert_ne!(before, flat(&a));
        a.step(&b).unwrap();
        assert!(dtypes(&a).values().all(|&dt| dt == Dtype::Bfloat16));
        assert_eq!(a.m.len(), a.trainable_names().len());
        assert!(a.m.values().chain(a.v.values()).all(|x| x.dtype() == Dtype::Bfloat16));
        // Every reported value is a bfloat16 value: float32 from it and back is exact.
        for (k, v) in flat(&a) {
            let again = host_vec::<f32>(
                &Array::from_slice(&v, &[v.len() as i32])
                    .as_dtype(Dtype::Bfloat16)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(v, again, "{k}");
        }
        let ck_dir = tmp("bf16-resume-ck");
        let ck = &ck_dir.path().join("checkpoint");
        a.save_checkpoint(&ck).unwrap();
        // Saved as bfloat16: parameters and moments.
        let saved = weights::read_safetensors(&ck.join("model.safetensors")).unwrap();
        assert!(saved.values().all(|x| x.dtype() == Dtype::Bfloat16));
        let opt = weights::read_safetensors(&ck.join("optimizer.safetensors")).unwrap();
        assert!(opt
            .iter()
            .filter(|(k, _)| k.ends_with(".m") || k.ends_with(".v"))
            .all(|(_, x)| x.dtype() == Dtype::Bfloat16));
        let l1 = a.step(&b).unwrap().total;
        // Into a fresh trainer of the same settings, and rebuilt from the folder alone.
        let mut c = Trainer::new(&d, bf16(big), None, true).unwrap();
        c.load_checkpoint(&ck).unwrap();
        let mut r = Trainer::from_checkpoint(&ck).unwrap();
        assert_eq!(r.settings.precision, crate::settings::Precision::Bfloat16);
        for t in [&mut c, &mut r] {
            assert!(dtypes(t).values().all(|&dt| dt == Dtype::Bfloat16));
            assert!(t.m.values().chain(t.v.values()).all(|x| x.dtype() == Dtype::Bfloat16));
            let l2 = t.step(&b).unwrap().total;
            assert_eq!(l1, l2);
            assert_eq!(flat(&a), flat(t));
            assert_eq!(t.step, 3);
            for (k, m) in &a.m {
                assert_eq!(host_vec::<f32>(m).unwrap(), host_vec::<f32>(&t.m[k]).unwrap(), "{k}.m");
                assert_eq!(
                    host_vec::<f32>(&a.v[k]).unwrap(),
                    host_vec::<f32>(&t.v[k]).unwrap(),
                    "{k}.v"
                );
            }
        }
    }

    #[test]
    fn bf16_given_gradients_are_cast_to_their_parameters_dtype() {
        let d_dir = tmp("bf16-given");
        let d = d_dir.path();
        tiny_checkpoint(&d, false);
        let b = batch();
        let mut a = Trainer::new(&d, bf16(""), None, true).unwrap();
        let mut c = Trainer::new(&d, bf16(""), None, true).unwrap();
        let (_, g) = a.gradients(&b).unwrap();
        // Given as float32 (the bfloat16 values exactly): the same update as from the own gradients.
        let given: HashMap<String, Array> = g
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float32).unwrap()))
            .collect();
        a.update_from_gradients(g).unwrap();
        c.update_from_gradients(given).unwrap();
        assert_eq!(flat(&a), flat(&c));
        assert!(dtypes(&c).values().all(|&dt| dt == Dtype::Bfloat16));
        assert!(c.m.values().chain(c.v.values()).all(|x| x.dtype() == Dtype::Bfloat16));
        // Given pieces arrive as float32 and are computed from in bfloat16: the own chain, reproduced.
        let ids = b.arrays().0;
        let own = a.pieces(&ids, None).unwrap();
        let given: Pieces = own
            .iter()
            .map(|(k, v)| (k.clone(), v.as_dtype(Dtype::Float32).unwrap()))
            .collect();
        let again = a.pieces(&ids, Some(&given)).unwrap();
        for (k, v) in &own {
            assert_eq!(v.dtype(), Dtype::Bfloat16, "{k}");
            assert_eq!(again[k].dtype(), Dtype::Bfloat16, "{k}");
            assert_eq!(host_vec::<f32>(v).unwrap(), host_vec::<f32>(&again[k]).unwrap(), "{k}");
        }
    }

    #[test]
    fn distrust_has_no_gradient_and_injections_behave() {
        let d_dir = tmp("inject");
        let d = d_dir.path();
        tiny_checkpoint(&d, false);
        let b = batch();
        let mut t = Trainer::new(&d, settings(""), None, true).unwrap();
        let (p1, g1) = t.gradients(&b).unwrap();
        let mut t2 = Trainer::new(&d, settings(r#", "loss": {"alpha": 2.7, "lambda": 0.0}"#), None, true).unwrap();
        let (p2, g2) = t2.gradients(&b).unwrap();
        assert!(p1.distrust > 0.0 && p1.total != p2.total);
        for (k, g) in &g1 {
            assert_eq!(host_vec::<f32>(g).unwrap(), host_vec::<f32>(&g2[k]).unwrap(), "{k}");
        }
        let mut f = Trainer::new(&d, settings(r#", "inject": "optimizer_disconnected""#), None, true).unwrap();
        let before = flat(&f);
        f.step(&b).unwrap();
        assert_eq!(before, flat(&f));
        assert_eq!(f.step, 1);
    }
}
