//! The candle trainer behind the adapter kit: conversions between the kit's tensors and candle's, the
//! trainable set, accumulation, and the checkpoint folder.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor as Candle, Var};
use parity_adapter::{
    read_tensors, write_tensors, Batch, Error, LoadReport, Loss, OptimizerState, Port, RequestFolder, Result, Tensor,
    Tensors,
};

use crate::config::ModelConfig;
use crate::inject::{self, Bug};
use crate::loss::{self, Rows};
use crate::model::{self, Model};
use crate::optimizer::{clip, Adam};
use crate::settings::{Settings, Trainable};
use crate::weights;

fn failed(e: impl std::fmt::Display) -> Error {
    Error::failed(e)
}

fn candle(t: &Tensor) -> Result<Candle> {
    Candle::from_vec(t.to_f32(), t.shape.clone(), &Device::Cpu).map_err(failed)
}

fn kit(x: &Candle) -> Result<Tensor> {
    Tensor::f32(x.dims().to_vec(), model::values(x).map_err(failed)?)
}

fn rows(batch: &Batch) -> Result<Rows> {
    let shape = (batch.input_ids.shape[0], batch.input_ids.shape[1]);
    Ok(Rows {
        ids: model::ids(&batch.input_ids.to_i32()?, shape).map_err(failed)?,
        mask: loss::mask(&batch.attention_mask.to_i32()?, shape).map_err(failed)?,
        auth_weight: batch.auth_weight.to_f32(),
        prov_entropy: batch.prov_entropy.to_f32(),
    })
}

pub struct CandlePort {
    cfg: ModelConfig,
    settings: Settings,
    params: BTreeMap<String, Var>,
    trainable: Vec<String>,
    adam: Adam,
    report: LoadReport,
    bug: Option<Bug>,
}

impl CandlePort {
    /// The model at the current parameters, autograd tracking the trained ones only.
    fn model(&self) -> Model<'_> {
        let params = self
            .params
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if self.trainable.contains(k) {
                        v.as_tensor().clone()
                    } else {
                        v.as_tensor().detach()
                    },
                )
            })
            .collect();
        let lora_scale = self.settings.lora.as_ref().map_or(0.0, |l| l.scale as f64);
        Model {
            cfg: &self.cfg,
            params,
            lora_scale,
            bug: self.bug,
        }
    }

    fn loss_parts(&self, batch: &Batch) -> Result<loss::Parts> {
        let m = self.model();
        let rows = rows(batch)?;
        let (logits, _) = m.forward(&rows.ids).map_err(failed)?;
        loss::loss(&logits, &rows, &self.settings.loss, self.bug).map_err(failed)
    }

    /// The loss and d(total)/dθ of the trained parameters on `batch`, as candle tensors.
    fn backward(&self, batch: &Batch) -> Result<(Loss, BTreeMap<String, Candle>)> {
        let parts = self.loss_parts(batch)?;
        let grads = parts.total.backward().map_err(failed)?;
        let mut out = BTreeMap::new();
        for name in &self.trainable {
            let p = self.params[name].as_tensor();
            let g = match grads.get(p) {
                Some(g) => g.clone(),
                None => p.zeros_like().map_err(failed)?,
            };
            out.insert(name.clone(), g);
        }
        Ok((summary(&parts)?, out))
    }

    fn apply(&mut self, grads: BTreeMap<String, Candle>) -> Result<()> {
        let grads = clip(grads, self.settings.clip_norm, self.bug).map_err(failed)?;
        self.adam
            .update(&self.params, &grads, &self.settings, self.bug)
            .map_err(failed)
    }
}

fn summary(parts: &loss::Parts) -> Result<Loss> {
    let scalar = |x: &Candle| x.to_scalar::<f32>().map_err(failed);
    Ok(Loss {
        ce: scalar(&parts.ce)?,
        distrust: parts.distrust,
        total: scalar(&parts.total)?,
    })
}

impl Port for CandlePort {
    fn load(req: &RequestFolder) -> Result<Self> {
        let settings = Settings::from_json(&req.settings_json())?;
        let bug = inject::parse(req.option("inject"))?;
        let dir = req.checkpoint_dir();
        let config =
            std::fs::read_to_string(dir.join("config.json")).map_err(|e| failed(format!("config.json: {e}")))?;
        let cfg =
            ModelConfig::from_json(&serde_json::from_str(&config).map_err(|e| failed(format!("config.json: {e}")))?)?;
        let mut report = LoadReport::default();
        let mut values = weights::fill(&weights::expected(&cfg), weights::read_checkpoint(&dir)?, &mut report)?;
        let adapters = weights::adapters(&cfg, &settings);
        if !adapters.is_empty() {
            values.extend(match req.lora_init() {
                Some(path) => weights::fill(&adapters, read_tensors(&path)?, &mut report)?,
                None => weights::fresh_adapters(&adapters)?,
            });
        }
        let trainable = match settings.trainable {
            Trainable::Full => weights::expected(&cfg).into_keys().collect(),
            Trainable::Lora => adapters.into_keys().collect(),
            Trainable::Head => {
                let head = if cfg.tied {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                };
                vec![head.to_string(), "model.norm.weight".to_string()]
            }
        };
        let params = values
            .iter()
            .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&candle(t)?).map_err(failed)?)))
            .collect::<Result<_>>()?;
        Ok(CandlePort {
            cfg,
            settings,
            params,
            trainable,
            adam: Adam::default(),
            report,
            bug,
        })
    }

    fn resume(req: &RequestFolder, dir: &Path) -> Result<Self> {
        let mut p = Self::load(req)?;
        for (name, t) in read_tensors(&dir.join("parameters.safetensors"))? {
            let var = p
                .params
                .get(&name)
                .ok_or_else(|| failed(format!("the checkpoint has {name}, the model does not")))?;
            var.set(&candle(&t)?).map_err(failed)?;
        }
        for (name, t) in read_tensors(&dir.join("optimizer.safetensors"))? {
            if name == "step" {
                p.adam.step = match t.data {
                    parity_adapter::Data::I64(v) => v[0],
                    _ => return Err(failed("optimizer.safetensors: step is not int64")),
                };
            } else if let Some(n) = name.strip_prefix("m.") {
                p.adam.m.insert(n.to_string(), candle(&t)?);
            } else if let Some(n) = name.strip_prefix("v.") {
                p.adam.v.insert(n.to_string(), candle(&t)?);
            }
        }
        Ok(p)
    }

    fn load_report(&self) -> LoadReport {
        self.report.clone()
    }

    fn parameters(&self) -> Result<Tensors> {
        self.params
            .iter()
            .map(|(k, v)| Ok((k.clone(), kit(v.as_tensor())?)))
            .collect()
    }

    fn parameters_named(&self, names: &[String]) -> Result<Tensors> {
        names
            .iter()
            .filter_map(|n| self.params.get(n).map(|v| Ok((n.clone(), kit(v.as_tensor())?))))
            .collect()
    }

    fn trainable_names(&self) -> Vec<String> {
        self.trainable.clone()
    }

    fn forward(&mut self, input_ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let ids = model::ids(&input_ids.to_i32()?, (input_ids.shape[0], input_ids.shape[1])).map_err(failed)?;
        let (logits, hidden) = self.model().forward(&ids).map_err(failed)?;
        Ok((kit(&logits)?, hidden.iter().map(kit).collect::<Result<_>>()?))
    }

    fn shifted(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape = (input_ids.shape[0], input_ids.shape[1]);
        let ids = model::ids(&input_ids.to_i32()?, shape).map_err(failed)?;
        let mask = loss::mask(&attention_mask.to_i32()?, shape).map_err(failed)?;
        let (targets, mask) = loss::shifted(&ids, &mask, self.bug).map_err(failed)?;
        let t: Vec<i32> = targets
            .flatten_all()
            .and_then(|x| x.to_vec1::<u32>())
            .map_err(failed)?
            .iter()
            .map(|&x| x as i32)
            .collect();
        Ok((Tensor::i32(targets.dims().to_vec(), t)?, kit(&mask)?))
    }

    fn loss(&mut self, batch: &Batch) -> Result<Loss> {
        summary(&self.loss_parts(batch)?)
    }

    fn gradients(&mut self, batch: &Batch) -> Result<(Loss, Tensors)> {
        let (loss, grads) = self.backward(batch)?;
        Ok((
            loss,
            grads
                .iter()
                .map(|(k, g)| Ok((k.clone(), kit(g)?)))
                .collect::<Result<_>>()?,
        ))
    }

    fn step(&mut self, batch: &Batch) -> Result<Loss> {
        let parts = batch.split(self.settings.accum_steps)?;
        let n = parts.len() as f32;
        let (mut sum, mut losses) = (BTreeMap::<String, Candle>::new(), Vec::new());
        for part in &parts {
            let (loss, grads) = self.backward(part)?;
            losses.push(loss);
            for (k, g) in grads {
                let total = match sum.remove(&k) {
                    Some(s) => (s + g).map_err(failed)?,
                    None => g,
                };
                sum.insert(k, total);
            }
        }
        let mean = sum
            .into_iter()
            .map(|(k, g)| Ok((k, (g / n as f64).map_err(failed)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.apply(mean)?;
        let avg = |f: fn(&Loss) -> f32| losses.iter().map(f).sum::<f32>() / n;
        Ok(Loss {
            ce: avg(|l| l.ce),
            distrust: avg(|l| l.distrust),
            total: avg(|l| l.total),
        })
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        let named = |m: &BTreeMap<String, Candle>| -> Result<Tensors> {
            m.iter().map(|(k, x)| Ok((k.clone(), kit(x)?))).collect()
        };
        Ok(OptimizerState {
            step: self.adam.step,
            m: named(&self.adam.m)?,
            v: named(&self.adam.v)?,
        })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        write_tensors(&dir.join("parameters.safetensors"), &self.parameters()?)?;
        let mut state = Tensors::new();
        for (prefix, moments) in [("m", &self.adam.m), ("v", &self.adam.v)] {
            for (k, x) in moments {
                state.insert(format!("{prefix}.{k}"), kit(x)?);
            }
        }
        state.insert("step".into(), Tensor::i64(vec![], vec![self.adam.step])?);
        write_tensors(&dir.join("optimizer.safetensors"), &state)
    }

    fn pieces(&mut self, input_ids: &Tensor, given: &Tensors) -> Result<Tensors> {
        let ids = model::ids(&input_ids.to_i32()?, (input_ids.shape[0], input_ids.shape[1])).map_err(failed)?;
        let given = given
            .iter()
            .map(|(k, t)| Ok((k.clone(), candle(t)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let pieces = self.model().pieces(&ids, &given).map_err(failed)?;
        pieces.iter().map(|(k, x)| Ok((k.clone(), kit(x)?))).collect()
    }

    fn loss_from_logits(&mut self, logits: &Tensor, batch: &Batch) -> Result<Loss> {
        let parts = loss::loss(&candle(logits)?, &rows(batch)?, &self.settings.loss, self.bug).map_err(failed)?;
        summary(&parts)
    }

    fn update_from_gradients(&mut self, grads: &Tensors) -> Result<()> {
        let grads = grads
            .iter()
            .map(|(k, t)| Ok((k.clone(), candle(t)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.apply(grads)
    }
}
