//! `REQUEST_DIR`: request.json, the checkpoint, the batch, the adapters, the reference's inputs for
//! the isolated requests.

use std::collections::BTreeMap;
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
    /// Only with `stages: ["data_parallel"]`: the ranks the launcher started, each with this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    /// With `world_size`: `mlx` (mlx.launch: MLX_RANK, MLX_HOSTFILE) or `torch` (torchrun: RANK, WORLD_SIZE,
    /// MASTER_ADDR, MASTER_PORT), whose environment names this rank and the rendezvous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<String>,
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

impl Batch {
    /// Rows `lo..hi` of every tensor.
    pub fn rows(&self, lo: usize, hi: usize) -> Result<Batch> {
        Ok(Batch {
            input_ids: self.input_ids.rows(lo, hi)?,
            attention_mask: self.attention_mask.rows(lo, hi)?,
            auth_weight: self.auth_weight.rows(lo, hi)?,
            prov_entropy: self.prov_entropy.rows(lo, hi)?,
        })
    }

    /// The batch cut in order into `parts` equal micro-batches, as an update with `accum_steps = parts` cuts
    /// it (docs/training-step.md); a batch size `parts` does not divide is an error that says so.
    pub fn split(&self, parts: usize) -> Result<Vec<Batch>> {
        let b = self.input_ids.shape.first().copied().unwrap_or(0);
        if parts == 0 || b % parts != 0 {
            return Err(Error::failed(format!(
                "batch size {b} is not divisible by accum_steps={parts}"
            )));
        }
        let n = b / parts;
        (0..parts).map(|i| self.rows(i * n, (i + 1) * n)).collect()
    }
}

/// A request folder, read, with the options the adapter was started with (`--name value` before the two
/// folders: `my-adapter --inject no_shift REQUEST_DIR RESPONSE_DIR`), for `Port::load` to read.
#[derive(Clone, Debug)]
pub struct RequestFolder {
    pub dir: PathBuf,
    pub request: Request,
    pub options: BTreeMap<String, String>,
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
            options: BTreeMap::new(),
        })
    }

    /// The value of the adapter's option `--name`, when it was started with one.
    /// The ranks of a data_parallel request (1: one process).
    pub fn world_size(&self) -> usize {
        self.request.world_size.unwrap_or(1)
    }

    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_in_order_into_equal_micro_batches() {
        let batch = Batch {
            input_ids: Tensor::i32(vec![4, 2], vec![0, 1, 2, 3, 4, 5, 6, 7]).unwrap(),
            attention_mask: Tensor::i32(vec![4, 2], vec![1, 1, 1, 1, 1, 0, 1, 0]).unwrap(),
            auth_weight: Tensor::f32(vec![4], vec![0.1, 0.2, 0.3, 0.4]).unwrap(),
            prov_entropy: Tensor::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        };
        let parts = batch.split(2).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].input_ids, Tensor::i32(vec![2, 2], vec![4, 5, 6, 7]).unwrap());
        assert_eq!(
            parts[1].attention_mask,
            Tensor::i32(vec![2, 2], vec![1, 0, 1, 0]).unwrap()
        );
        assert_eq!(parts[0].auth_weight, Tensor::f32(vec![2], vec![0.1, 0.2]).unwrap());
        assert_eq!(batch.split(1).unwrap(), vec![batch.clone()]);
        let err = batch.split(3).unwrap_err().to_string();
        assert!(err.contains("not divisible by accum_steps=3"), "{err}");
    }
}
