//! Checkpoints in the reference's layout (its `save_checkpoint` / `load_checkpoint`):
//! `model.safetensors`, `optimizer.safetensors` (MLX's flattened optimizer state: `step`,
//! `learning_rate`, `<name>.m`, `<name>.v`), `config.json`, and `trainer.json` with format
//! `mlx-parity-checkpoint/1`; Rust-only settings go under `trainer.json["rust"]`, so the reference can
//! read a checkpoint of the port and the port one of the reference.
use std::{collections::HashMap, path::Path, rc::Rc};

use mlx_rs::{module::ModuleParameters, transforms::eval, Array, Dtype};
use serde_json::{json, Value};

use crate::{
    config::ModelConfig,
    error::{Error, Result},
    model::LlamaForCausalLM,
    settings::TrainSettings,
    trainer::Trainer,
    weights::{self, LoadReport},
};

pub const CHECKPOINT_FORMAT: &str = "mlx-parity-checkpoint/1";

/// `trainer.json` of a checkpoint folder: its path and its JSON.
fn read_meta(path: &Path) -> Result<(std::path::PathBuf, Value)> {
    let meta_path = path.join("trainer.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|_| {
        Error::Io(format!(
            "{} is not a trainer checkpoint (no trainer.json)",
            path.display()
        ))
    })?;
    let meta: Value = serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", meta_path.display())))?;
    Ok((meta_path, meta))
}

impl Trainer {
    /// A trainer rebuilt from a checkpoint folder alone (`save_checkpoint`'s, or the reference's):
    /// config.json, the settings in trainer.json, then `load_checkpoint`.
    pub fn from_checkpoint(path: &Path) -> Result<Self> {
        let (meta_path, meta) = read_meta(path)?;
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
        let settings = TrainSettings::from_value(&Value::Object(settings))?;
        let cfg = ModelConfig::from_dir(path)?;
        let model = LlamaForCausalLM::new(&cfg, settings.seed)?;
        let mut t = Trainer::assemble(cfg, settings, model, LoadReport::default(), None)?;
        t.load_checkpoint(path)?;
        Ok(t)
    }

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
        let mut opt: Vec<(String, Array)> = vec![("step".into(), Array::from_slice(&[self.optimizer.step], &[]))];
        if let Some(lr) = &self.optimizer.last_lr {
            opt.push(("learning_rate".into(), lr.clone()));
        }
        for (k, m) in &self.optimizer.m {
            opt.push((format!("{k}.m"), m.clone()));
        }
        for (k, v) in &self.optimizer.v {
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
            "step": self.optimizer.step,
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
        let (_, meta) = read_meta(path)?;
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
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let report = LoadReport {
            missing: sorted(
                expected
                    .keys()
                    .filter(|k| !saved.contains_key(k.as_ref()))
                    .map(|k| k.to_string())
                    .collect(),
            ),
            unexpected: sorted(
                saved
                    .keys()
                    .filter(|k| !expected.contains_key(k.as_str()))
                    .cloned()
                    .collect(),
            ),
            mismatched: sorted(
                saved
                    .iter()
                    .filter(|(k, a)| {
                        expected
                            .get(k.as_str())
                            .is_some_and(|p| p.shape() != a.shape() || p.dtype() != a.dtype())
                    })
                    .map(|(k, _)| k.clone())
                    .collect(),
            ),
            ignored: vec![],
        };
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
        self.optimizer.m = m;
        self.optimizer.v = v;
        self.optimizer.step = step;
        self.optimizer.last_lr = opt.get("learning_rate").cloned();
        self.eval_params()?;
        let mut all: Vec<&Array> = self.optimizer.m.values().collect();
        all.extend(self.optimizer.v.values());
        eval(all)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testing::{batch, bf16, dtypes, flat, settings, tiny_checkpoint, tmp},
        trainer::host_vec,
    };

    #[test]
    fn step_updates_and_checkpoint_resumes_bit_exactly() {
        let d_dir = tmp("resume");
        let d = d_dir.path();
        tiny_checkpoint(d, true);
        let b = batch();
        let mut a = Trainer::new(d, settings(""), None, true).unwrap();
        let before = flat(&a);
        a.step(&b).unwrap();
        assert_ne!(before, flat(&a));
        a.step(&b).unwrap();
        let ck_dir = tmp("resume-ck");
        let ck = &ck_dir.path().join("checkpoint"); // save_checkpoint refuses an existing path
        a.save_checkpoint(ck).unwrap();
        let l1 = a.step(&b).unwrap().total;
        let mut c = Trainer::new(d, settings(""), None, true).unwrap();
        c.load_checkpoint(ck).unwrap();
        let l2 = c.step(&b).unwrap().total;
        assert_eq!(l1, l2);
        assert_eq!(flat(&a), flat(&c));
        assert_eq!(a.optimizer.step, 3);
        assert_eq!(c.optimizer.step, 3);
    }

    #[test]
    fn bf16_step_keeps_dtypes_and_checkpoint_resumes_bit_exactly() {
        let d_dir = tmp("bf16-resume");
        let d = d_dir.path();
        tiny_checkpoint(d, true);
        let b = batch();
        // A large learning rate, so that bfloat16 parameters visibly move (an update below half an ulp
        // is lost in bfloat16, as in mlx-lm).
        let big = r#", "optimizer": {"lr": 0.05, "weight_decay": 0.01}"#;
        let mut a = Trainer::new(d, bf16(big), None, true).unwrap();
        let before = flat(&a);
        let (parts, g) = a.gradients(&b).unwrap();
        assert!(parts.total.is_finite());
        assert!(g.values().all(|g| g.dtype() == Dtype::Bfloat16));
        a.step(&b).unwrap();
        assert_ne!(before, flat(&a));
        a.step(&b).unwrap();
        assert!(dtypes(&a).values().all(|&dt| dt == Dtype::Bfloat16));
        assert_eq!(a.optimizer.m.len(), a.trainable_names().len());
        assert!(a
            .optimizer
            .m
            .values()
            .chain(a.optimizer.v.values())
            .all(|x| x.dtype() == Dtype::Bfloat16));
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
        a.save_checkpoint(ck).unwrap();
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
        let mut c = Trainer::new(d, bf16(big), None, true).unwrap();
        c.load_checkpoint(ck).unwrap();
        let mut r = Trainer::from_checkpoint(ck).unwrap();
        assert_eq!(r.settings.precision, crate::precision::Precision::Bfloat16);
        for t in [&mut c, &mut r] {
            assert!(dtypes(t).values().all(|&dt| dt == Dtype::Bfloat16));
            assert!(t
                .optimizer
                .m
                .values()
                .chain(t.optimizer.v.values())
                .all(|x| x.dtype() == Dtype::Bfloat16));
            let l2 = t.step(&b).unwrap().total;
            assert_eq!(l1, l2);
            assert_eq!(flat(&a), flat(t));
            assert_eq!(t.optimizer.step, 3);
            for (k, m) in &a.optimizer.m {
                assert_eq!(
                    host_vec::<f32>(m).unwrap(),
                    host_vec::<f32>(&t.optimizer.m[k]).unwrap(),
                    "{k}.m"
                );
                assert_eq!(
                    host_vec::<f32>(&a.optimizer.v[k]).unwrap(),
                    host_vec::<f32>(&t.optimizer.v[k]).unwrap(),
                    "{k}.v"
                );
            }
        }
    }
}
