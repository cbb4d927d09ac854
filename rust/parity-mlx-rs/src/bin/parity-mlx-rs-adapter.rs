//! The mlx-rs port behind the mlx-parity protocol, on the parity-adapter kit:
//!
//!     parity-mlx-rs-adapter [--inject BUG] REQUEST_DIR RESPONSE_DIR
//!
//! Everything here converts between the kit's tensors and MLX arrays; the stages are the kit's.
//! `--inject` switches on one of the port's built-in bugs (settings "inject"), for the self-test.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use mlx_rs::{Array, Dtype};
use parity_adapter::{
    serve, Batch, Error, LoadReport, Loss, OptimizerState, Port, RequestFolder, Result, Tensor, Tensors,
};
use parity_mlx_rs::data;
use parity_mlx_rs::distributed::Group;
use parity_mlx_rs::loss::LossParts;
use parity_mlx_rs::model::Pieces;
use parity_mlx_rs::settings::TrainSettings;
use parity_mlx_rs::trainer::{host_vec, Trainer};

struct MlxRs(Trainer);

fn failed(e: impl std::fmt::Display) -> Error {
    Error::failed(e)
}

fn tensor(a: &Array) -> Result<Tensor> {
    let shape = a.shape().iter().map(|&d| d as usize).collect();
    match a.dtype() {
        Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float64 => {
            Tensor::f32(shape, host_vec::<f32>(a).map_err(failed)?)
        }
        _ => Tensor::i32(shape, host_vec::<i32>(a).map_err(failed)?),
    }
}

fn tensors(items: impl IntoIterator<Item = (String, Array)>) -> Result<Tensors> {
    items.into_iter().map(|(k, a)| Ok((k, tensor(&a)?))).collect()
}

fn dims(t: &Tensor) -> Vec<i32> {
    t.shape.iter().map(|&d| d as i32).collect()
}

fn floats(t: &Tensor) -> Array {
    Array::from_slice(&t.to_f32(), &dims(t))
}

fn ints(t: &Tensor) -> Result<Array> {
    Ok(Array::from_slice(&t.to_i32()?, &dims(t)))
}

fn batch(b: &Batch) -> Result<data::Batch> {
    let wide = |t: &Tensor| t.to_f32().into_iter().map(f64::from).collect::<Vec<f64>>();
    data::Batch::new(
        b.input_ids.to_i32()?,
        &b.input_ids.shape,
        wide(&b.attention_mask),
        &b.attention_mask.shape,
        wide(&b.auth_weight),
        &b.auth_weight.shape,
        wide(&b.prov_entropy),
        &b.prov_entropy.shape,
    )
    .map_err(failed)
}

fn loss(p: LossParts) -> Loss {
    Loss {
        ce: p.ce as f32,
        distrust: p.distrust as f32,
        total: p.total as f32,
    }
}

impl Port for MlxRs {
    fn load(req: &RequestFolder) -> Result<Self> {
        let mut settings = req.request.settings.clone();
        if let (Some(bug), Some(map)) = (req.option("inject"), settings.as_object_mut()) {
            map.insert("inject".into(), bug.into());
        }
        let settings = TrainSettings::from_json(&settings.to_string()).map_err(failed)?;
        let mut t = Trainer::new(&req.checkpoint_dir(), settings, req.lora_init().as_deref(), false).map_err(failed)?;
        if req.world_size() > 1 {
            // MLX's ring, as mlx.launch describes it (MLX_RANK, MLX_HOSTFILE); torchrun's variables mean nothing to it
            if req.request.launcher.as_deref() != Some("mlx") {
                return Err(failed(
                    "this port joins MLX's own group: start its ranks with mlx.launch (--launcher mlx)",
                ));
            }
            t.group = Some(Group::init().map_err(failed)?);
        }
        Ok(MlxRs(t))
    }

    fn rank(&self) -> Option<usize> {
        self.0.group.as_ref().map(|g| g.rank())
    }

    fn resume(_: &RequestFolder, dir: &Path) -> Result<Self> {
        Trainer::from_checkpoint(dir).map(MlxRs).map_err(failed) // the injected bug travels in trainer.json
    }

    fn load_report(&self) -> LoadReport {
        let r = &self.0.report;
        LoadReport {
            missing: r.missing.clone(),
            unexpected: r.unexpected.clone(),
            mismatched: r.mismatched.clone(),
            ignored: r.ignored.clone(),
        }
    }

    fn parameters(&self) -> Result<Tensors> {
        tensors(self.0.parameters())
    }

    fn trainable_names(&self) -> Vec<String> {
        self.0.trainable_names()
    }

    fn forward(&mut self, input_ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (logits, hidden) = self.0.forward(&ints(input_ids)?).map_err(failed)?;
        Ok((tensor(&logits)?, hidden.iter().map(tensor).collect::<Result<_>>()?))
    }

    fn shifted(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let (targets, mask) = self
            .0
            .shifted(&ints(input_ids)?, &ints(attention_mask)?)
            .map_err(failed)?;
        Ok((tensor(&targets)?, tensor(&mask)?))
    }

    fn loss(&mut self, b: &Batch) -> Result<Loss> {
        self.0.loss(&batch(b)?).map(loss).map_err(failed)
    }

    fn gradients(&mut self, b: &Batch) -> Result<(Loss, Tensors)> {
        let (parts, grads) = self.0.gradients(&batch(b)?).map_err(failed)?;
        Ok((loss(parts), tensors(grads)?))
    }

    fn step(&mut self, b: &Batch) -> Result<Loss> {
        self.0.step(&batch(b)?).map(loss).map_err(failed)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        let t = &self.0;
        Ok(OptimizerState {
            step: t.optimizer.step as i64,
            m: tensors(t.optimizer.m.iter().map(|(k, v)| (k.clone(), v.clone())))?,
            v: tensors(t.optimizer.v.iter().map(|(k, v)| (k.clone(), v.clone())))?,
        })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.0.save_checkpoint(dir).map_err(failed)
    }

    fn pieces(&mut self, input_ids: &Tensor, given: &Tensors) -> Result<Tensors> {
        let g: Pieces = self
            .0
            .model
            .given_names()
            .into_iter()
            .filter_map(|n| given.get(&n).map(|t| (n, floats(t))))
            .collect();
        tensors(self.0.pieces(&ints(input_ids)?, Some(&g)).map_err(failed)?)
    }

    fn loss_from_logits(&mut self, logits: &Tensor, b: &Batch) -> Result<Loss> {
        self.0
            .loss_from_logits(&floats(logits), &batch(b)?)
            .map(loss)
            .map_err(failed)
    }

    fn update_from_gradients(&mut self, grads: &Tensors) -> Result<()> {
        let g: HashMap<String, Array> = grads.iter().map(|(k, t)| (k.clone(), floats(t))).collect();
        self.0.update_from_gradients(g).map_err(failed)
    }
}

fn main() -> ExitCode {
    serve::<MlxRs>(std::env::args().skip(1)) // `--inject BUG` arrives as req.option("inject")
}
