//! Trainer settings: the JSON every backend receives (docs/training-step.md, "Trainer settings").
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    inject::Inject,
    loss::{validate_loss_scalars, LossSettings},
    precision::Precision,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    Full,
    Lora,
    Head,
}

impl Trainable {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trainable::Full => "full",
            Trainable::Lora => "lora",
            Trainable::Head => "head",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: i32,
    pub layers: i32,
    pub scale: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerSettings {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant,
    WarmupCosine {
        warmup_steps: i64,
        warmup_init: f64,
        decay_steps: i64,
        end_lr: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub trainable: Trainable,
    pub lora: LoraSettings,
    pub optimizer: OptimizerSettings,
    pub schedule: Schedule,
    pub clip_norm: Option<f64>,
    pub accum_steps: i64,
    pub loss: LossSettings,
    pub steps: i64,
    pub checkpoint_at: i64,
    pub inject: Option<Inject>,
    /// Seed of the random initialisation (parameters no checkpoint fills, fresh LoRA adapters).
    pub seed: u64,
    pub precision: Precision,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Settings(msg.into())
}

fn obj<'a>(d: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Map<String, Value>>> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(v) => Err(err(format!("settings.{key} must be an object, got {v}"))),
    }
}

fn num(d: &Map<String, Value>, key: &str, default: f64, ctx: &str) -> Result<f64> {
    match d.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| err(format!("{ctx}{key} must be a number, got {v}"))),
    }
}

fn integer(d: &Map<String, Value>, key: &str, default: i64, ctx: &str) -> Result<i64> {
    match d.get(key) {
        None => Ok(default),
        Some(v) => match (v.as_i64(), v.as_f64()) {
            (Some(i), _) => Ok(i),
            (None, Some(f)) if f.fract() == 0.0 => Ok(f as i64),
            _ => Err(err(format!("{ctx}{key} must be an integer, got {v}"))),
        },
    }
}

fn check_keys(d: &Map<String, Value>, known: &[&str], ctx: &str) -> Result<()> {
    let mut unknown: Vec<&String> = d.keys().filter(|k| !known.contains(&k.as_str())).collect();
    unknown.sort();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(err(format!("unknown {ctx}keys: {unknown:?}")))
    }
}

impl TrainSettings {
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| err(format!("settings are not valid JSON: {e}")))?;
        let d = v.as_object().ok_or_else(|| err("settings must be a JSON object"))?;
        Self::from_map(d)
    }

    pub fn from_map(d: &Map<String, Value>) -> Result<Self> {
        check_keys(
            d,
            &[
                "trainable",
                "lora",
                "optimizer",
                "schedule",
                "clip_norm",
                "accum_steps",
                "loss",
                "steps",
                "checkpoint_at",
                "inject",
                "seed",
                "precision",
            ],
            "settings ",
        )?;
        let trainable = match d.get("trainable").map(|v| v.as_str()) {
            None | Some(Some("full")) => Trainable::Full,
            Some(Some("lora")) => Trainable::Lora,
            Some(Some("head")) => Trainable::Head,
            _ => {
                return Err(err(format!(
                    "trainable must be one of ('full', 'lora', 'head'), got {}",
                    d["trainable"]
                )))
            }
        };

        let empty = Map::new();
        let l = obj(d, "lora")?.unwrap_or(&empty);
        check_keys(l, &["rank", "layers", "scale"], "lora ")?;
        let lora = LoraSettings {
            rank: integer(l, "rank", 4, "lora.")? as i32,
            layers: integer(l, "layers", 1, "lora.")? as i32,
            scale: num(l, "scale", 2.0, "lora.")?,
        };
        if lora.rank < 1 {
            return Err(err(format!("lora.rank must be >= 1, got {}", lora.rank)));
        }

        let o = obj(d, "optimizer")?.unwrap_or(&empty);
        check_keys(
            o,
            &["lr", "betas", "eps", "weight_decay", "bias_correction"],
            "optimizer ",
        )?;
        let betas = match o.get("betas") {
            None => (0.9, 0.999),
            Some(Value::Array(b)) if b.len() == 2 && b.iter().all(Value::is_number) => {
                (b[0].as_f64().unwrap(), b[1].as_f64().unwrap())
            }
            Some(v) => return Err(err(format!("optimizer.betas must be [b1, b2], got {v}"))),
        };
        let optimizer = OptimizerSettings {
            lr: num(o, "lr", 1e-3, "optimizer.")?,
            betas,
            eps: num(o, "eps", 1e-8, "optimizer.")?,
            weight_decay: num(o, "weight_decay", 0.01, "optimizer.")?,
            bias_correction: match o.get("bias_correction") {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(err(format!("optimizer.bias_correction must be a boolean, got {v}"))),
            },
        };
        let (b1, b2) = optimizer.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(err(format!("betas must be in [0, 1), got ({b1}, {b2})")));
        }
        if optimizer.lr < 0.0 || optimizer.eps < 0.0 || optimizer.weight_decay < 0.0 {
            return Err(err("lr, eps and weight_decay must be >= 0"));
        }

        let s = obj(d, "schedule")?.unwrap_or(&empty);
        check_keys(
            s,
            &["kind", "warmup_steps", "warmup_init", "decay_steps", "end_lr"],
            "schedule ",
        )?;
        let warmup_steps = integer(s, "warmup_steps", 0, "schedule.")?;
        let decay_steps = integer(s, "decay_steps", 1, "schedule.")?;
        if warmup_steps < 0 || decay_steps < 1 {
            return Err(err("schedule needs warmup_steps >= 0 and decay_steps >= 1"));
        }
        let schedule = match s.get("kind").map(|v| v.as_str()) {
            None | Some(Some("constant")) => Schedule::Constant,
            Some(Some("warmup_cosine")) => Schedule::WarmupCosine {
                warmup_steps,
                warmup_init: num(s, "warmup_init", 0.0, "schedule.")?,
                decay_steps,
                end_lr: num(s, "end_lr", 0.0, "schedule.")?,
            },
            _ => {
                return Err(err(format!(
                    "schedule.kind must be 'constant' or 'warmup_cosine', got {}",
                    s["kind"]
                )))
            }
        };

        let clip_norm = match d.get("clip_norm") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(c) if c > 0.0 => Some(c),
                _ => return Err(err(format!("clip_norm must be > 0 or null, got {v}"))),
            },
        };
        let accum_steps = integer(d, "accum_steps", 1, "")?;
        if accum_steps < 1 {
            return Err(err(format!("accum_steps must be >= 1, got {accum_steps}")));
        }

        let ls = obj(d, "loss")?.unwrap_or(&empty);
        check_keys(ls, &["alpha", "lambda"], "loss ")?;
        let loss = LossSettings {
            alpha: num(ls, "alpha", 2.7, "loss.")?,
            lambda: num(ls, "lambda", 1.0, "loss.")?,
        };
        validate_loss_scalars(loss.alpha, loss.lambda)?;

        let steps = integer(d, "steps", 4, "")?;
        let checkpoint_at = integer(d, "checkpoint_at", 2, "")?;
        if !(0 < checkpoint_at && checkpoint_at < steps) {
            return Err(err(format!(
                "checkpoint_at must be in 1..steps-1, got {checkpoint_at} with steps={steps}"
            )));
        }
        let inject = match d.get("inject") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Inject::parse(s).ok_or_else(|| {
                err(format!(
                    "inject must be one of weights_not_loaded, no_shift, forward_only, \
                     optimizer_disconnected or null, got '{s}'"
                ))
            })?),
            Some(v) => return Err(err(format!("inject must be a string or null, got {v}"))),
        };
        let seed = integer(d, "seed", 0, "")?;
        if seed < 0 {
            return Err(err(format!("seed must be >= 0, got {seed}")));
        }
        let precision = match d.get("precision") {
            None => Precision::Float32,
            Some(Value::String(p)) if p == "float32" => Precision::Float32,
            Some(Value::String(p)) if p == "bfloat16" => Precision::Bfloat16,
            Some(v) => {
                return Err(err(format!(
                    "precision must be one of ('float32', 'bfloat16'), got {v}"
                )))
            }
        };
        Ok(TrainSettings {
            trainable,
            lora,
            optimizer,
            schedule,
            clip_norm,
            accum_steps,
            loss,
            steps,
            checkpoint_at,
            inject,
            seed: seed as u64,
            precision,
        })
    }

    pub fn to_value(&self) -> Value {
        let schedule = match &self.schedule {
            Schedule::Constant => json!({"kind": "constant"}),
            Schedule::WarmupCosine {
                warmup_steps,
                warmup_init,
                decay_steps,
                end_lr,
            } => json!({
                "kind": "warmup_cosine", "warmup_steps": warmup_steps, "warmup_init": warmup_init,
                "decay_steps": decay_steps, "end_lr": end_lr}),
        };
        let o = &self.optimizer;
        json!({
            "trainable": self.trainable.as_str(),
            "lora": {"rank": self.lora.rank, "layers": self.lora.layers, "scale": self.lora.scale},
            "optimizer": {"lr": o.lr, "betas": [o.betas.0, o.betas.1], "eps": o.eps,
                          "weight_decay": o.weight_decay, "bias_correction": o.bias_correction},
            "schedule": schedule,
            "clip_norm": self.clip_norm,
            "accum_steps": self.accum_steps,
            "loss": {"alpha": self.loss.alpha, "lambda": self.loss.lambda},
            "steps": self.steps,
            "checkpoint_at": self.checkpoint_at,
            "inject": self.inject,
            "seed": self.seed,
            "precision": self.precision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = TrainSettings::from_json("{}").unwrap();
        assert_eq!(s.trainable, Trainable::Full);
        assert_eq!(s.optimizer.betas, (0.9, 0.999));
        assert!(s.optimizer.bias_correction);
        assert_eq!(s.schedule, Schedule::Constant);
        assert_eq!(s.inject, None);
        assert_eq!(s.precision, Precision::Float32);
    }

    #[test]
    fn precision_parses_round_trips_and_rejects_others() {
        let s = TrainSettings::from_json(r#"{"precision": "bfloat16"}"#).unwrap();
        assert_eq!(s.precision, Precision::Bfloat16);
        assert_eq!(s.precision.dtype(), mlx_rs::Dtype::Bfloat16);
        assert_eq!(s.to_value()["precision"], "bfloat16");
        assert_eq!(TrainSettings::from_map(s.to_value().as_object().unwrap()).unwrap(), s);
        assert_eq!(
            TrainSettings::from_json(r#"{"precision": "float32"}"#)
                .unwrap()
                .precision,
            Precision::Float32
        );
        for bad in [r#""float16""#, r#""bf16""#, "null", "32"] {
            let e = TrainSettings::from_json(&format!(r#"{{"precision": {bad}}}"#))
                .err()
                .unwrap();
            assert!(matches!(e, Error::Settings(_)), "{bad}");
            assert!(e.to_string().starts_with("precision must be one of"), "{e}");
        }
    }

    #[test]
    fn round_trip() {
        let text = r#"{"trainable": "lora", "lora": {"rank": 2, "layers": 1, "scale": 2.0},
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 2, "warmup_init": 1e-4,
            "decay_steps": 8, "end_lr": 0.0}, "clip_norm": 1.0, "accum_steps": 2, "inject": "no_shift"}"#;
        let s = TrainSettings::from_json(text).unwrap();
        let again = TrainSettings::from_map(s.to_value().as_object().unwrap()).unwrap();
        assert_eq!(s, again);
    }

    #[test]
    fn rejects_alpha_and_unknown_keys() {
        assert!(matches!(
            TrainSettings::from_json(r#"{"loss": {"alpha": 3.5}}"#),
            Err(Error::Batch(_))
        ));
        assert!(TrainSettings::from_json(r#"{"bogus": 1}"#).is_err());
        assert!(TrainSettings::from_json(r#"{"inject": "nonsense"}"#).is_err());
    }
}
