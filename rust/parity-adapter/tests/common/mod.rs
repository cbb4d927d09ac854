//! A toy port for the kit's tests: one parameter vector, a fixed update, nothing of a real model.

use std::path::Path;

use parity_adapter::*;

/// θ ← θ − lr·(step + 1); the loss is the sum of θ. Deterministic, so resume must equal the uninterrupted run.
/// Asked for several ranks, it says it is the last one (it has no collectives: every rank computes alone).
pub struct Toy {
    pub theta: Vec<f32>,
    pub step: i64,
    pub rank: Option<usize>,
    /// `--prefix P`: its parameter is `theta` to itself and `P` + `theta` in the checkpoint.
    pub prefix: Option<String>,
}

impl Port for Toy {
    fn load(req: &RequestFolder) -> Result<Self> {
        let world = req.world_size();
        Ok(Toy {
            theta: vec![1.0, 2.0, 3.0],
            step: 0,
            rank: (world > 1).then_some(world - 1),
            prefix: req.option("prefix").map(str::to_string),
        })
    }
    fn rank(&self) -> Option<usize> {
        self.rank
    }
    /// θ ← θ − 0.1·g with the given gradient of `theta` (its own name).
    fn update_from_gradients(&mut self, grads: &Tensors) -> Result<()> {
        let g = grads
            .get("theta")
            .ok_or_else(|| Error::failed("no gradient for theta"))?
            .to_f32();
        self.theta.iter_mut().zip(g).for_each(|(t, g)| *t -= 0.1 * g);
        self.step += 1;
        Ok(())
    }
    fn checkpoint_name(&self, own: &str) -> String {
        format!("{}{own}", self.prefix.as_deref().unwrap_or(""))
    }
    /// The embedding only: its attention is "fused", so it says it cannot give the scores.
    fn pieces(&mut self, ids: &Tensor, _given: &Tensors) -> Result<Tensors> {
        Ok([(
            "embed".to_string(),
            Tensor::f32(ids.shape.clone(), vec![0.5; ids.len()])?,
        )]
        .into())
    }
    fn pieces_not_computed(&self) -> std::collections::BTreeMap<String, String> {
        [("scores".to_string(), "fused attention".to_string())].into()
    }
    fn resume(_: &RequestFolder, dir: &Path) -> Result<Self> {
        let t = read_tensors(&dir.join("state.safetensors"))?;
        Ok(Toy {
            theta: t["theta"].to_f32(),
            step: t["step"].to_f32()[0] as i64,
            rank: None,
            prefix: None,
        })
    }
    fn load_report(&self) -> LoadReport {
        LoadReport {
            missing: vec!["model.extra.bias".into()],
            ..Default::default()
        }
    }
    fn parameters(&self) -> Result<Tensors> {
        Ok([("theta".to_string(), Tensor::f32(vec![3], self.theta.clone())?)].into())
    }
    fn trainable_names(&self) -> Vec<String> {
        vec!["theta".into()]
    }
    fn forward(&mut self, ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        Ok((Tensor::f32(ids.shape.clone(), vec![0.5; ids.len()])?, vec![]))
    }
    fn shifted(&mut self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((ids.clone(), Tensor::f32(mask.shape.clone(), mask.to_f32())?))
    }
    fn loss(&mut self, _: &Batch) -> Result<Loss> {
        let s = self.theta.iter().sum();
        Ok(Loss {
            ce: s,
            distrust: 0.0,
            total: s,
        })
    }
    fn gradients(&mut self, b: &Batch) -> Result<(Loss, Tensors)> {
        Ok((
            self.loss(b)?,
            [("theta".to_string(), Tensor::f32(vec![3], vec![1.0; 3])?)].into(),
        ))
    }
    fn step(&mut self, b: &Batch) -> Result<Loss> {
        let l = self.loss(b)?;
        self.step += 1;
        let lr = 0.1 * self.step as f32;
        self.theta.iter_mut().for_each(|x| *x -= lr);
        Ok(l)
    }
    fn optimizer_state(&self) -> Result<OptimizerState> {
        Ok(OptimizerState {
            step: self.step,
            ..Default::default()
        })
    }
    fn save(&self, dir: &Path) -> Result<()> {
        assert!(!dir.exists(), "the kit hands save a fresh path");
        std::fs::create_dir_all(dir)?;
        let t: Tensors = [
            ("theta".to_string(), Tensor::f32(vec![3], self.theta.clone())?),
            ("step".to_string(), Tensor::i64(vec![], vec![self.step])?),
        ]
        .into();
        write_tensors(&dir.join("state.safetensors"), &t)
    }
}
