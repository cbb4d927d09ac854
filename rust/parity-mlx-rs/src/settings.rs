//! Trainer settings: the JSON every backend receives (docs/training-step.md, "Trainer settings"),
//! read with serde and checked once, as the reference's settings.py does (its `__post_init__`s are
//! `validate` here). Every key is optional and an unknown key is an error. Each field reads its value
//! through a helper of `keys`, which names the key in its message (serde does not pass the key to a
//! field's deserializer) and reads an integer also from a float without fraction (`2.0`), like Python.
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    inject::Inject,
    loss::validate_loss_scalars,
    precision::Precision,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    #[default]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(deserialize_with = "keys::lora_rank")]
    pub rank: i32,
    #[serde(deserialize_with = "keys::lora_layers")]
    pub layers: i32,
    #[serde(deserialize_with = "keys::lora_scale")]
    pub scale: f64,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            rank: 4,
            layers: 1,
            scale: 2.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSettings {
    #[serde(deserialize_with = "keys::optimizer_lr")]
    pub lr: f64,
    #[serde(deserialize_with = "keys::optimizer_betas")]
    pub betas: (f64, f64),
    #[serde(deserialize_with = "keys::optimizer_eps")]
    pub eps: f64,
    #[serde(deserialize_with = "keys::optimizer_weight_decay")]
    pub weight_decay: f64,
    /// The PyTorch convention; MLX's own AdamW defaults to false.
    #[serde(deserialize_with = "keys::optimizer_bias_correction")]
    pub bias_correction: bool,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            bias_correction: true,
        }
    }
}

/// The learning-rate schedule; written as `{"kind": "constant"}` or `{"kind": "warmup_cosine", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    WarmupCosine {
        warmup_steps: i64,
        warmup_init: f64,
        decay_steps: i64,
        end_lr: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ScheduleKind {
    #[default]
    Constant,
    WarmupCosine,
}

/// The "schedule" object as written. `warmup_init` and `end_lr` are read as numbers only by
/// warmup_cosine, which is the one schedule that uses them.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ScheduleKeys {
    #[serde(deserialize_with = "keys::schedule_kind")]
    kind: ScheduleKind,
    #[serde(deserialize_with = "keys::schedule_warmup_steps")]
    warmup_steps: i64,
    #[serde(deserialize_with = "keys::present")]
    warmup_init: Option<Value>,
    #[serde(deserialize_with = "keys::schedule_decay_steps")]
    decay_steps: i64,
    #[serde(deserialize_with = "keys::present")]
    end_lr: Option<Value>,
}

impl Default for ScheduleKeys {
    fn default() -> Self {
        ScheduleKeys {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            warmup_init: None,
            decay_steps: 1,
            end_lr: None,
        }
    }
}

impl ScheduleKeys {
    fn schedule(self) -> std::result::Result<Schedule, String> {
        if self.warmup_steps < 0 || self.decay_steps < 1 {
            return Err("schedule needs warmup_steps >= 0 and decay_steps >= 1".into());
        }
        let number_or_zero = |v: Option<Value>, key| v.map_or(Ok(0.0), |v| keys::number(&v, key));
        Ok(match self.kind {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::WarmupCosine => Schedule::WarmupCosine {
                warmup_steps: self.warmup_steps,
                warmup_init: number_or_zero(self.warmup_init, "schedule.warmup_init")?,
                decay_steps: self.decay_steps,
                end_lr: number_or_zero(self.end_lr, "schedule.end_lr")?,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSettings {
    #[serde(deserialize_with = "keys::loss_alpha")]
    pub alpha: f64,
    #[serde(deserialize_with = "keys::loss_lambda")]
    pub lambda: f64,
}

impl Default for LossSettings {
    fn default() -> Self {
        LossSettings {
            alpha: 2.7,
            lambda: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    #[serde(deserialize_with = "keys::trainable")]
    pub trainable: Trainable,
    #[serde(deserialize_with = "keys::lora")]
    pub lora: LoraSettings,
    #[serde(deserialize_with = "keys::optimizer")]
    pub optimizer: OptimizerSettings,
    #[serde(deserialize_with = "keys::schedule")]
    pub schedule: Schedule,
    #[serde(deserialize_with = "keys::clip_norm")]
    pub clip_norm: Option<f64>,
    #[serde(deserialize_with = "keys::accum_steps")]
    pub accum_steps: i64,
    #[serde(deserialize_with = "keys::loss")]
    pub loss: LossSettings,
    #[serde(deserialize_with = "keys::steps")]
    pub steps: i64,
    #[serde(deserialize_with = "keys::checkpoint_at")]
    pub checkpoint_at: i64,
    /// A deliberate porting bug for the harness's self-test (inject.rs); null: none.
    #[serde(deserialize_with = "keys::inject")]
    pub inject: Option<Inject>,
    /// Seed of the random initialisation (parameters no checkpoint fills, fresh LoRA adapters).
    #[serde(deserialize_with = "keys::seed")]
    pub seed: u64,
    #[serde(deserialize_with = "keys::precision")]
    pub precision: Precision,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            trainable: Trainable::Full,
            lora: LoraSettings::default(),
            optimizer: OptimizerSettings::default(),
            schedule: Schedule::Constant,
            clip_norm: None,
            accum_steps: 1,
            loss: LossSettings::default(),
            steps: 4,
            checkpoint_at: 2,
            inject: None,
            seed: 0,
            precision: Precision::Float32,
        }
    }
}

impl TrainSettings {
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::Settings(format!("settings are not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::Settings("settings must be a JSON object".into()));
        }
        let s = Self::deserialize(v).map_err(|e| Error::Settings(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// The checks between values (the reference's `__post_init__`s); a value's own type and range are
    /// checked as it is read.
    fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Settings(m));
        if self.lora.rank < 1 {
            return err(format!("lora.rank must be >= 1, got {}", self.lora.rank));
        }
        let o = &self.optimizer;
        let (b1, b2) = o.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return err(format!("betas must be in [0, 1), got ({b1}, {b2})"));
        }
        if o.lr < 0.0 || o.eps < 0.0 || o.weight_decay < 0.0 {
            return err("lr, eps and weight_decay must be >= 0".into());
        }
        if self.accum_steps < 1 {
            return err(format!("accum_steps must be >= 1, got {}", self.accum_steps));
        }
        validate_loss_scalars(self.loss.alpha, self.loss.lambda)?;
        let (steps, checkpoint_at) = (self.steps, self.checkpoint_at);
        if !(0 < checkpoint_at && checkpoint_at < steps) {
            return err(format!(
                "checkpoint_at must be in 1..steps-1, got {checkpoint_at} with steps={steps}"
            ));
        }
        Ok(())
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("settings are plain JSON")
    }
}

/// One `deserialize_with` helper per key (generated by `keyed!`), each reading its key's JSON value
/// with one of the readers below, which name the key in their messages.
mod keys {
    use serde::{de::Error as _, Deserializer};

    use super::*;

    macro_rules! keyed {
        ($($name:ident: $key:literal $read:ident -> $t:ty;)*) => {$(
            pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                $read(&Value::deserialize(d)?, $key).map_err(D::Error::custom)
            }
        )*};
    }

    keyed! {
        trainable: "trainable" trainable_set -> Trainable;
        lora: "lora" section -> LoraSettings;
        lora_rank: "lora.rank" int32 -> i32;
        lora_layers: "lora.layers" int32 -> i32;
        lora_scale: "lora.scale" number -> f64;
        optimizer: "optimizer" section -> OptimizerSettings;
        optimizer_lr: "optimizer.lr" number -> f64;
        optimizer_betas: "optimizer.betas" pair -> (f64, f64);
        optimizer_eps: "optimizer.eps" number -> f64;
        optimizer_weight_decay: "optimizer.weight_decay" number -> f64;
        optimizer_bias_correction: "optimizer.bias_correction" boolean -> bool;
        schedule: "schedule" schedule_keys -> Schedule;
        schedule_kind: "schedule.kind" kind -> ScheduleKind;
        schedule_warmup_steps: "schedule.warmup_steps" integer -> i64;
        schedule_decay_steps: "schedule.decay_steps" integer -> i64;
        clip_norm: "clip_norm" positive_or_null -> Option<f64>;
        accum_steps: "accum_steps" integer -> i64;
        loss: "loss" section -> LossSettings;
        loss_alpha: "loss.alpha" number -> f64;
        loss_lambda: "loss.lambda" number -> f64;
        steps: "steps" integer -> i64;
        checkpoint_at: "checkpoint_at" integer -> i64;
        inject: "inject" bug -> Option<Inject>;
        seed: "seed" non_negative -> u64;
        precision: "precision" precision_name -> Precision;
    }

    /// A key that may hold any JSON, null included (`Some(Value::Null)`, unlike `Option<Value>`).
    pub(super) fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
        Value::deserialize(d).map(Some)
    }

    type Read<T> = std::result::Result<T, String>;

    /// An object of settings (null: all defaults).
    fn section<T: DeserializeOwned + Default>(v: &Value, key: &str) -> Read<T> {
        match v {
            Value::Null => Ok(T::default()),
            Value::Object(_) => T::deserialize(v).map_err(|e| e.to_string()),
            _ => Err(format!("settings.{key} must be an object, got {v}")),
        }
    }

    fn schedule_keys(v: &Value, key: &str) -> Read<Schedule> {
        section::<ScheduleKeys>(v, key)?.schedule()
    }

    pub(super) fn number(v: &Value, key: &str) -> Read<f64> {
        v.as_f64().ok_or_else(|| format!("{key} must be a number, got {v}"))
    }

    fn integer(v: &Value, key: &str) -> Read<i64> {
        match (v.as_i64(), v.as_f64()) {
            (Some(i), _) => Ok(i),
            (None, Some(f)) if f.fract() == 0.0 => Ok(f as i64),
            _ => Err(format!("{key} must be an integer, got {v}")),
        }
    }

    fn int32(v: &Value, key: &str) -> Read<i32> {
        integer(v, key).map(|i| i as i32)
    }

    fn non_negative(v: &Value, key: &str) -> Read<u64> {
        match integer(v, key)? {
            i if i < 0 => Err(format!("{key} must be >= 0, got {i}")),
            i => Ok(i as u64),
        }
    }

    fn boolean(v: &Value, key: &str) -> Read<bool> {
        v.as_bool().ok_or_else(|| format!("{key} must be a boolean, got {v}"))
    }

    fn pair(v: &Value, key: &str) -> Read<(f64, f64)> {
        match v {
            Value::Array(b) if b.len() == 2 && b.iter().all(Value::is_number) => {
                Ok((b[0].as_f64().unwrap_or_default(), b[1].as_f64().unwrap_or_default()))
            }
            _ => Err(format!("{key} must be [b1, b2], got {v}")),
        }
    }

    fn positive_or_null(v: &Value, key: &str) -> Read<Option<f64>> {
        match v {
            Value::Null => Ok(None),
            _ => match v.as_f64() {
                Some(c) if c > 0.0 => Ok(Some(c)),
                _ => Err(format!("{key} must be > 0 or null, got {v}")),
            },
        }
    }

    fn trainable_set(v: &Value, key: &str) -> Read<Trainable> {
        match v.as_str() {
            Some("full") => Ok(Trainable::Full),
            Some("lora") => Ok(Trainable::Lora),
            Some("head") => Ok(Trainable::Head),
            _ => Err(format!("{key} must be one of ('full', 'lora', 'head'), got {v}")),
        }
    }

    fn kind(v: &Value, key: &str) -> Read<ScheduleKind> {
        match v.as_str() {
            Some("constant") => Ok(ScheduleKind::Constant),
            Some("warmup_cosine") => Ok(ScheduleKind::WarmupCosine),
            _ => Err(format!("{key} must be 'constant' or 'warmup_cosine', got {v}")),
        }
    }

    fn precision_name(v: &Value, key: &str) -> Read<Precision> {
        v.as_str()
            .and_then(Precision::parse)
            .ok_or_else(|| format!("{key} must be one of ('float32', 'bfloat16'), got {v}"))
    }

    fn bug(v: &Value, key: &str) -> Read<Option<Inject>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Inject::parse(s)
                .map(Some)
                .ok_or_else(|| format!("{key} must be one of {} or null, got '{s}'", Inject::NAMES.join(", "))),
            _ => Err(format!("{key} must be a string or null, got {v}")),
        }
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
        assert_eq!(TrainSettings::from_value(&s.to_value()).unwrap(), s);
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
        let again = TrainSettings::from_value(&s.to_value()).unwrap();
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

    #[test]
    fn reads_whole_floats_as_integers_and_names_the_key_of_a_bad_value() {
        let s = TrainSettings::from_json(r#"{"accum_steps": 2.0, "lora": {"rank": 8.0}, "seed": 3.0}"#).unwrap();
        assert_eq!((s.accum_steps, s.lora.rank, s.seed), (2, 8, 3));
        for (bad, message) in [
            (r#"{"lora": {"rank": 2.5}}"#, "lora.rank must be an integer, got 2.5"),
            (
                r#"{"optimizer": {"lr": "x"}}"#,
                r#"optimizer.lr must be a number, got "x""#,
            ),
            (
                r#"{"optimizer": {"bias_correction": 1}}"#,
                "optimizer.bias_correction must be a boolean, got 1",
            ),
            (
                r#"{"optimizer": {"betas": [0.9]}}"#,
                "optimizer.betas must be [b1, b2], got [0.9]",
            ),
            (r#"{"lora": 5}"#, "settings.lora must be an object, got 5"),
            (
                r#"{"schedule": {"kind": "linear"}}"#,
                r#"schedule.kind must be 'constant' or 'warmup_cosine', got "linear""#,
            ),
            (r#"{"clip_norm": 0}"#, "clip_norm must be > 0 or null, got 0"),
            (r#"{"seed": -1}"#, "seed must be >= 0, got -1"),
            (
                r#"{"trainable": "all"}"#,
                r#"trainable must be one of ('full', 'lora', 'head'), got "all""#,
            ),
            (r#"{"inject": 3}"#, "inject must be a string or null, got 3"),
            (
                r#"{"steps": 2, "checkpoint_at": 2}"#,
                "checkpoint_at must be in 1..steps-1, got 2 with steps=2",
            ),
            (r#"{"learning_rate": 1e-3}"#, "unknown field `learning_rate`"),
            ("[]", "settings must be a JSON object"),
        ] {
            let e = TrainSettings::from_json(bad).err().unwrap();
            assert!(matches!(e, Error::Settings(_)), "{bad}: {e:?}");
            assert!(e.to_string().starts_with(message), "{bad}: {e}");
        }
    }

    #[test]
    fn a_constant_schedule_does_not_read_the_warmup_cosine_numbers() {
        let s = TrainSettings::from_json(r#"{"schedule": {"kind": "constant", "warmup_init": "x", "end_lr": null}}"#);
        assert_eq!(s.unwrap().schedule, Schedule::Constant);
        let e = TrainSettings::from_json(r#"{"schedule": {"kind": "warmup_cosine", "end_lr": null}}"#);
        assert_eq!(
            e.err().unwrap().to_string(),
            "schedule.end_lr must be a number, got null"
        );
    }
}
