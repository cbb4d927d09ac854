//! Every stage's outputs from a `Port`, named as the harness compares them (harness/stages.py is the
//! same orchestration in Python; docs/protocol.md lists every name and shape).

use std::path::PathBuf;

use crate::{Batch, Error, Loss, Port, RequestFolder, Result, Tensor, Tensors};

pub const STAGES: [&str; 8] = [
    "weight_mapping",
    "forward",
    "shifted_slices",
    "loss",
    "gradients",
    "optimizer",
    "trajectory",
    "checkpoint",
];
pub const ISOLATED_STAGES: [&str; 4] = [
    "isolated_forward",
    "isolated_loss",
    "isolated_optimizer",
    "isolated_schedule",
];
/// Stages that leave the port unchanged share one load; the others each start from a fresh one.
const READ_ONLY: [&str; 7] = [
    "weight_mapping",
    "forward",
    "shifted_slices",
    "loss",
    "gradients",
    "isolated_forward",
    "isolated_loss",
];

/// One stage's answer: its tensors, and metadata (the load report) where the stage has any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    pub tensors: Tensors,
    pub meta: Option<serde_json::Value>,
    /// The response file's name without `.safetensors` when it is not the stage's (a rank's).
    pub file: Option<String>,
}

fn loss_tensors(prefix: &str, l: Loss) -> Tensors {
    [("ce", l.ce), ("distrust", l.distrust), ("total", l.total)]
        .into_iter()
        .map(|(k, x)| (format!("{prefix}.{k}"), Tensor::scalar(x)))
        .collect()
}

fn trainable<P: Port>(p: &P) -> Result<Tensors> {
    let names = p.trainable_names();
    let mut all = p.parameters_named(&names)?;
    names
        .iter()
        .map(|n| {
            all.remove(n)
                .map(|t| (n.clone(), t))
                .ok_or_else(|| Error::failed(format!("trainable {n} is not a parameter")))
        })
        .collect()
}

fn deltas<P: Port>(p: &P, before: &Tensors, prefix: &str) -> Result<Tensors> {
    let after = p.parameters_named(&before.keys().cloned().collect::<Vec<_>>())?;
    before
        .iter()
        .map(|(k, b)| {
            let a = after
                .get(k)
                .ok_or_else(|| Error::failed(format!("{k} is gone after the update")))?;
            Ok((format!("{prefix}.delta.{}", p.checkpoint_name(k)), a.minus(b)?))
        })
        .collect()
}

fn state<P: Port>(p: &P, prefix: &str, out: &mut Tensors) -> Result<()> {
    let s = p.optimizer_state()?;
    let name = |k: &str| p.checkpoint_name(k);
    out.extend(s.m.into_iter().map(|(k, t)| (format!("{prefix}.m.{}", name(&k)), t)));
    out.extend(s.v.into_iter().map(|(k, t)| (format!("{prefix}.v.{}", name(&k)), t)));
    out.insert(format!("{prefix}.step"), Tensor::i64(vec![], vec![s.step])?);
    Ok(())
}

/// `steps` updates: the change of every trainable parameter since `initial`, and the losses.
fn run<P: Port>(
    p: &mut P,
    batch: &Batch,
    steps: usize,
    initial: &Tensors,
    prefix: &str,
) -> Result<(Tensors, Vec<f32>)> {
    let losses = (0..steps)
        .map(|_| p.step(batch).map(|l| l.total))
        .collect::<Result<Vec<_>>>()?;
    Ok((deltas(p, initial, prefix)?, losses))
}

fn losses(name: &str, values: Vec<f32>) -> Result<(String, Tensor)> {
    Ok((name.to_string(), Tensor::f32(vec![values.len()], values)?))
}

/// The reference's gradients of the port's trainable set, under the port's own names.
fn given_gradients<P: Port>(p: &P, inputs: &Tensors) -> Tensors {
    p.trainable_names()
        .into_iter()
        .filter_map(|own| {
            let given = inputs.get(&format!("grad.{}", p.checkpoint_name(&own)))?;
            Some((own, given.clone()))
        })
        .collect()
}

/// A scratch folder for the checkpoint stage, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("parity-adapter-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0); // best effort: a temp folder left behind is harmless
    }
}

/// Run one stage. `shared` holds the load the read-only stages share (opened on first use); every
/// other stage starts from a fresh load.
pub fn run_stage<P: Port>(req: &RequestFolder, stage: &str, shared: &mut Option<P>) -> Result<Output> {
    let batch = req.batch()?;
    if READ_ONLY.contains(&stage) && shared.is_none() {
        *shared = Some(P::load(req)?);
    }
    let tensors = match stage {
        "weight_mapping" => return weight_mapping(opened(shared)),
        "forward" => forward(opened(shared), &batch)?,
        "shifted_slices" => shifted_slices(opened(shared), &batch)?,
        "loss" => loss(opened(shared), &batch)?,
        "gradients" => gradients(opened(shared), &batch)?,
        "optimizer" => optimizer::<P>(req, &batch)?,
        "trajectory" => trajectory::<P>(req, &batch)?,
        "checkpoint" => checkpoint::<P>(req, &batch)?,
        "isolated_forward" => {
            let p = opened(shared);
            let pieces = isolated_forward(p, req, &batch)?;
            let left = p.pieces_not_computed();
            let meta = (!left.is_empty()).then(|| serde_json::json!({ "not_computed": left }));
            return Ok(Output {
                tensors: pieces,
                meta,
                file: None,
            });
        }
        "isolated_loss" => isolated_loss(opened(shared), req, &batch)?,
        "isolated_optimizer" => isolated_optimizer::<P>(req)?,
        "isolated_schedule" => isolated_schedule::<P>(req)?,
        "data_parallel" => return data_parallel::<P>(req, &batch),
        other => return Err(Error::Unsupported(format!("unknown stage {other:?}"))),
    };
    Ok(Output {
        tensors,
        meta: None,
        file: None,
    })
}

/// The shared load, opened by `run_stage` before any read-only stage.
fn opened<P>(shared: &mut Option<P>) -> &mut P {
    shared.as_mut().expect("opened above")
}

/// Every parameter as loaded, and the load report.
fn weight_mapping<P: Port>(p: &P) -> Result<Output> {
    Ok(Output {
        tensors: p
            .parameters()?
            .into_iter()
            .map(|(k, t)| (format!("weights.{}", p.checkpoint_name(&k)), t))
            .collect(),
        meta: Some(serde_json::json!({ "load_report": p.load_report() })),
        file: None,
    })
}

/// The logits and the residual stream after each decoder layer.
fn forward<P: Port>(p: &mut P, batch: &Batch) -> Result<Tensors> {
    let (logits, hidden) = p.forward(&batch.input_ids)?;
    let mut out = Tensors::new();
    out.insert("forward.logits".into(), logits);
    out.extend(
        hidden
            .into_iter()
            .enumerate()
            .map(|(i, h)| (format!("forward.hidden.{i}"), h)),
    );
    Ok(out)
}

/// The next-token targets and their mask.
fn shifted_slices<P: Port>(p: &mut P, batch: &Batch) -> Result<Tensors> {
    let (targets, mask) = p.shifted(&batch.input_ids, &batch.attention_mask)?;
    Ok(Tensors::from([
        ("shifted.targets".into(), targets),
        ("shifted.mask".into(), mask),
    ]))
}

fn loss<P: Port>(p: &mut P, batch: &Batch) -> Result<Tensors> {
    Ok(loss_tensors("loss", p.loss(batch)?))
}

/// The gradient of every trainable parameter, the whole batch in one pass.
fn gradients<P: Port>(p: &mut P, batch: &Batch) -> Result<Tensors> {
    let (_, grads) = p.gradients(batch)?;
    Ok(grads
        .into_iter()
        .map(|(k, t)| (format!("grad.{}", p.checkpoint_name(&k)), t))
        .collect())
}

/// One update from a fresh load: the parameters' change, the optimizer state, the loss.
fn optimizer<P: Port>(req: &RequestFolder, batch: &Batch) -> Result<Tensors> {
    let mut p = P::load(req)?;
    let before = trainable(&p)?;
    let l = p.step(batch)?;
    let mut out = deltas(&p, &before, "optimizer")?;
    state(&p, "optimizer", &mut out)?;
    out.insert("optimizer.loss".into(), Tensor::scalar(l.total));
    Ok(out)
}

/// One rank of a data-parallel run: what it holds after the first update (`optimizer.*`) and after the last
/// (`trajectory.*`, with the moments and step), written as `data_parallel.rank<r>.safetensors`.
fn data_parallel<P: Port>(req: &RequestFolder, batch: &Batch) -> Result<Output> {
    let mut p = P::load(req)?;
    let rank = p
        .rank()
        .ok_or_else(|| Error::Unsupported("this port trains on one process (Port::rank is None)".into()))?;
    let initial = trainable(&p)?;
    let first = p.step(batch)?;
    let mut out = deltas(&p, &initial, "optimizer")?;
    state(&p, "optimizer", &mut out)?;
    out.insert("optimizer.loss".into(), Tensor::scalar(first.total));
    let (rest, mut l) = run(&mut p, batch, req.steps()? - 1, &initial, "trajectory")?;
    l.insert(0, first.total);
    out.extend(rest);
    state(&p, "trajectory", &mut out)?;
    out.extend([losses("trajectory.loss", l)?]);
    Ok(Output {
        tensors: out,
        meta: None,
        file: Some(format!("data_parallel.rank{rank}")),
    })
}

/// `steps` updates from a fresh load: the parameters' change and every loss.
fn trajectory<P: Port>(req: &RequestFolder, batch: &Batch) -> Result<Tensors> {
    let mut p = P::load(req)?;
    let initial = trainable(&p)?;
    let (mut out, l) = run(&mut p, batch, req.steps()?, &initial, "trajectory")?;
    out.extend([losses("trajectory.loss", l)?]);
    Ok(out)
}

/// `checkpoint_at` updates, save, resume in a fresh port, the remaining updates; and the same run
/// uninterrupted, to compare with.
fn checkpoint<P: Port>(req: &RequestFolder, batch: &Batch) -> Result<Tensors> {
    let (n, k) = (req.steps()?, req.checkpoint_at()?);
    if k > n {
        return Err(Error::failed(format!("checkpoint_at {k} is after the last update {n}")));
    }
    let mut p = P::load(req)?;
    let initial = trainable(&p)?;
    let mut all = (0..k)
        .map(|_| p.step(batch).map(|l| l.total))
        .collect::<Result<Vec<_>>>()?;
    let scratch = Scratch::new()?;
    let saved = scratch.0.join("checkpoint");
    p.save(&saved)?;
    drop(p);
    let mut resumed = P::resume(req, &saved)?;
    let (mut out, rest) = run(&mut resumed, batch, n - k, &initial, "checkpoint")?;
    all.extend(rest);
    out.extend([losses("checkpoint.loss", all)?]);
    let mut fresh = P::load(req)?;
    let initial = trainable(&fresh)?;
    let (d, l) = run(&mut fresh, batch, n, &initial, "checkpoint.uninterrupted")?;
    out.extend(d);
    out.extend([losses("checkpoint.uninterrupted.loss", l)?]);
    Ok(out)
}

/// Every piece of the forward from the reference's values of its inputs.
fn isolated_forward<P: Port>(p: &mut P, req: &RequestFolder, batch: &Batch) -> Result<Tensors> {
    let given: Tensors = req
        .isolated_inputs()?
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("isolated.forward.").map(|n| (n.to_string(), t)))
        .collect();
    let pieces = p.pieces(&batch.input_ids, &given)?;
    Ok(pieces
        .into_iter()
        .map(|(k, t)| (format!("isolated.forward.{k}"), t))
        .collect())
}

/// The loss of the reference's logits.
fn isolated_loss<P: Port>(p: &mut P, req: &RequestFolder, batch: &Batch) -> Result<Tensors> {
    let inputs = req.isolated_inputs()?;
    let logits = inputs
        .get("forward.logits")
        .ok_or_else(|| Error::failed("isolated_inputs has no forward.logits"))?;
    Ok(loss_tensors("isolated.loss", p.loss_from_logits(logits, batch)?))
}

/// One update from the reference's gradients, from a fresh load.
fn isolated_optimizer<P: Port>(req: &RequestFolder) -> Result<Tensors> {
    let mut p = P::load(req)?;
    let before = trainable(&p)?;
    let grads = given_gradients(&p, &req.isolated_inputs()?);
    p.update_from_gradients(&grads)?;
    let mut out = deltas(&p, &before, "isolated.optimizer")?;
    state(&p, "isolated.optimizer", &mut out)?;
    Ok(out)
}

/// `steps` updates from the same given gradients: the schedule on its own.
fn isolated_schedule<P: Port>(req: &RequestFolder) -> Result<Tensors> {
    let mut p = P::load(req)?;
    let before = trainable(&p)?;
    let grads = given_gradients(&p, &req.isolated_inputs()?);
    for _ in 0..req.steps()? {
        p.update_from_gradients(&grads)?;
    }
    let mut out = deltas(&p, &before, "isolated.schedule")?;
    out.insert(
        "isolated.schedule.step".into(),
        Tensor::i64(vec![], vec![p.optimizer_state()?.step])?,
    );
    Ok(out)
}
