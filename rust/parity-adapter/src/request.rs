//! `REQUEST_DIR`: request.json, the checkpoint, the batch, the adapters, the reference's inputs for
//! the isolated requests.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{read_tensors, Error, Result, Tensor, Tensors};

/// The protocol version this kit speaks; a request naming another is refused.
pub const PROTOCOL: &str = "mlx-parity/1";

/// request.json, as the harness writes it (docs/protocol.schema/request.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub protocol: String,
    pub fixture: String,
    pub stages: Vec<String>,
    /// A Hugging Face-style folder: config.json and one or more *.safetensors.
    pub checkpoint: String,
    pub batch: String,
    pub lora_init: Option<String>,
    /// The training settings (settings.json of the fixture): the port reads what it needs.
    pub settings: serde_json::Value,
    pub isolated_inputs: Option<String>,
}

/// The batch every stage uses: `input_ids` int32 [B, T], `attention_mask` int32 [B, T] (1 real, 0 padding,
/// padding on the right), `auth_weight` and `prov_entropy` float32 [B].
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub auth_weight: Tensor,
    pub prov_entropy: Tensor,
}

/// A request folder, read.
#[derive(Clone, Debug)]
pub struct RequestFolder {
    pub dir: PathBuf,
    pub request: Request,
}

impl RequestFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("request.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
        let request: Request =
            serde_json::from_str(&text).map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
        if request.protocol != PROTOCOL {
            return Err(Error::failed(format!(
                "request protocol {:?}, this adapter speaks {PROTOCOL:?}",
                request.protocol
            )));
        }
        Ok(RequestFolder {
            dir: dir.to_path_buf(),
            request,
        })
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join(&self.request.checkpoint)
    }

    pub fn lora_init(&self) -> Option<PathBuf> {
        self.request.lora_init.as_ref().map(|f| self.dir.join(f))
    }

    /// The settings as JSON text, for a port whose settings parser takes a string.
    pub fn settings_json(&self) -> String {
        self.request.settings.to_string()
    }

    pub fn batch(&self) -> Result<Batch> {
        let mut t = read_tensors(&self.dir.join(&self.request.batch))?;
        let mut take = |k: &str| {
            t.remove(k)
                .ok_or_else(|| Error::failed(format!("the batch has no {k}")))
        };
        Ok(Batch {
            input_ids: take("input_ids")?,
            attention_mask: take("attention_mask")?,
            auth_weight: take("auth_weight")?,
            prov_entropy: take("prov_entropy")?,
        })
    }

    /// The reference's own values the isolated requests start from (forward pieces, logits, gradients).
    pub fn isolated_inputs(&self) -> Result<Tensors> {
        match &self.request.isolated_inputs {
            Some(f) => read_tensors(&self.dir.join(f)),
            None => Err(Error::failed("the request has no isolated_inputs")),
        }
    }

    fn setting_usize(&self, key: &str) -> Result<usize> {
        self.request
            .settings
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::failed(format!("settings.{key} is missing or not a count")))
    }

    /// Updates in the trajectory and checkpoint stages.
    pub fn steps(&self) -> Result<usize> {
        self.setting_usize("steps")
    }

    /// After how many updates the checkpoint stage saves and resumes.
    pub fn checkpoint_at(&self) -> Result<usize> {
        self.setting_usize("checkpoint_at")
    }
}
