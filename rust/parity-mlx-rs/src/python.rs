//! The Python surface (PyO3): `parity_mlx_rs.Trainer`.
use std::path::PathBuf;

use mlx_rs::{Array, Dtype};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::{
    exceptions::{PyOSError, PyRuntimeError, PyValueError},
    prelude::*,
    types::{PyDict, PyList, PyTuple},
};

use crate::{
    data::Batch,
    error::Error,
    loss::LossParts,
    model::Pieces,
    settings::TrainSettings,
    trainer::{host_vec, Trainer},
};

fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::Config(_) | Error::Settings(_) | Error::Batch(_) | Error::Weights(_) => {
            PyValueError::new_err(e.to_string())
        }
        Error::Io(_) => PyOSError::new_err(e.to_string()),
        Error::Mlx(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// An MLX array as a new numpy array (float32, or int32 for integer arrays).
fn to_numpy<'py>(py: Python<'py>, a: &Array) -> PyResult<Bound<'py, PyAny>> {
    let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
    let integer = matches!(
        a.dtype(),
        Dtype::Int8
            | Dtype::Int16
            | Dtype::Int32
            | Dtype::Int64
            | Dtype::Uint8
            | Dtype::Uint16
            | Dtype::Uint32
            | Dtype::Uint64
            | Dtype::Bool
    );
    if integer {
        let v = host_vec::<i32>(a).map_err(to_py_err)?;
        Ok(PyArray1::from_vec(py, v).reshape(shape)?.into_any())
    } else {
        let v = host_vec::<f32>(a).map_err(to_py_err)?;
        Ok(PyArray1::from_vec(py, v).reshape(shape)?.into_any())
    }
}

fn dict_of_arrays<'py>(
    py: Python<'py>,
    items: impl IntoIterator<Item = (String, Array)>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let mut items: Vec<(String, Array)> = items.into_iter().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in items {
        d.set_item(k, to_numpy(py, &v)?)?;
    }
    Ok(d)
}

fn loss_dict<'py>(py: Python<'py>, p: LossParts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ce", p.ce)?;
    d.set_item("distrust", p.distrust)?;
    d.set_item("total", p.total)?;
    Ok(d)
}

/// `np.ascontiguousarray(obj, dtype)` of a numeric object, and its original dtype kind ('i', 'u', 'f', 'b').
fn numeric<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
) -> PyResult<(char, Bound<'py, PyAny>)> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    let kind = kind.chars().next().unwrap_or('?');
    if !matches!(kind, 'i' | 'u' | 'f' | 'b') {
        return Err(PyValueError::new_err(format!(
            "{name} must be a numeric array, got dtype kind '{kind}'"
        )));
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", dtype)?;
    Ok((kind, np.call_method("ascontiguousarray", (arr,), Some(&kwargs))?))
}

/// `np.asarray(obj)`: its dtype kind ('i', 'u', 'f', 'b', ...), values as float64, shape.
fn host_f64(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<(char, Vec<f64>, Vec<usize>)> {
    let (kind, arr) = numeric(py, obj, name, "float64")?;
    let ro: PyReadonlyArrayDyn<f64> = arr.extract()?;
    Ok((kind, ro.as_slice()?.to_vec(), ro.shape().to_vec()))
}

fn host_ids(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<i32>, Vec<usize>)> {
    let (kind, vals, shape) = host_f64(py, obj, name)?;
    if !matches!(kind, 'i' | 'u') {
        return Err(PyValueError::new_err(format!(
            "{name} must be integers, got dtype kind '{kind}'"
        )));
    }
    if vals.iter().any(|&v| v < i32::MIN as f64 || v > i32::MAX as f64) {
        return Err(PyValueError::new_err(format!("{name} holds values outside int32")));
    }
    Ok((vals.iter().map(|&v| v as i32).collect(), shape))
}

fn batch_from(py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<Batch> {
    let need = ["input_ids", "attention_mask", "auth_weight", "prov_entropy"];
    let mut absent = Vec::new();
    for k in need {
        if !batch.contains(k)? {
            absent.push(k);
        }
    }
    if !absent.is_empty() {
        return Err(PyValueError::new_err(format!("batch lacks {}", absent.join(", "))));
    }
    let (ids, ids_shape) = host_ids(py, &batch.get_item("input_ids")?, "input_ids")?;
    let (_, mask, mask_shape) = host_f64(py, &batch.get_item("attention_mask")?, "attention_mask")?;
    let (_, w, w_shape) = host_f64(py, &batch.get_item("auth_weight")?, "auth_weight")?;
    let (_, h, h_shape) = host_f64(py, &batch.get_item("prov_entropy")?, "prov_entropy")?;
    Batch::new(ids, &ids_shape, mask, &mask_shape, w, &w_shape, h, &h_shape).map_err(to_py_err)
}

/// A float32 MLX array from any numeric numpy-like object.
fn float_array(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Array> {
    let (_, vals, shape) = host_f64(py, obj, name)?;
    let data: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    let dims: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    Ok(Array::from_slice(&data, &dims))
}

/// A float32 MLX array straight from a float32 copy of the object (no detour through float64).
fn f32_array(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Array> {
    let (_, arr) = numeric(py, obj, name, "float32")?;
    let ro: PyReadonlyArrayDyn<f32> = arr.extract()?;
    let dims: Vec<i32> = ro.shape().iter().map(|&d| d as i32).collect();
    Ok(Array::from_slice(ro.as_slice()?, &dims))
}

fn ids_array(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Array> {
    let (ids, shape) = host_ids(py, obj, name)?;
    if shape.len() != 2 {
        return Err(PyValueError::new_err(format!(
            "{name} must be [B, T], got shape {shape:?}"
        )));
    }
    Ok(Array::from_slice(&ids, &[shape[0] as i32, shape[1] as i32]))
}

/// The mlx-rs trainer: a Llama model from a Hugging Face checkpoint, its trainable set and AdamW.
#[pyclass(name = "Trainer", module = "parity_mlx_rs", unsendable)]
pub struct PyTrainer {
    inner: Trainer,
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (checkpoint_dir, settings_json, lora_init=None, strict=true))]
    fn new(checkpoint_dir: PathBuf, settings_json: &str, lora_init: Option<PathBuf>, strict: bool) -> PyResult<Self> {
        let settings = TrainSettings::from_json(settings_json).map_err(to_py_err)?;
        let inner = Trainer::new(&checkpoint_dir, settings, lora_init.as_deref(), strict).map_err(to_py_err)?;
        Ok(PyTrainer { inner })
    }

    /// `{"missing": [...], "unexpected": [...], "mismatched": [...], "ignored": [...]}`.
    fn load_report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.inner.report;
        let d = PyDict::new(py);
        d.set_item("missing", PyList::new(py, &r.missing)?)?;
        d.set_item("unexpected", PyList::new(py, &r.unexpected)?)?;
        d.set_item("mismatched", PyList::new(py, &r.mismatched)?)?;
        d.set_item("ignored", PyList::new(py, &r.ignored)?)?;
        Ok(d)
    }

    /// Every parameter by Hugging Face name (and adapter names with LoRA), float32 numpy arrays.
    fn parameters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        dict_of_arrays(py, self.inner.parameters())
    }

    fn trainable_names(&self) -> Vec<String> {
        self.inner.trainable_names()
    }

    /// `(logits [B,T,V], [hidden after layer i, [B,T,D]])`.
    fn forward<'py>(&self, py: Python<'py>, input_ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let ids = ids_array(py, input_ids, "input_ids")?;
        let (logits, hidden) = self.inner.forward(&ids).map_err(to_py_err)?;
        let hs = PyList::empty(py);
        for h in &hidden {
            hs.append(to_numpy(py, h)?)?;
        }
        PyTuple::new(py, [to_numpy(py, &logits)?, hs.into_any()])
    }

    /// Every piece of the forward pass, `{name: float32 array}`: `embed`, `layer.{i}.<piece>` (input_norm,
    /// q, k, v, q_rope, k_rope, scores, probs, attn, o_proj, post_norm, gate, up, act, down, output),
    /// `head.norm`, `head.logits`. Without `given`: the port's own chain. With `given` (`{name: array}`,
    /// the reference's pieces): each piece from the given values of its inputs, `layer.{i}.output` the
    /// whole layer from its given input (the isolated forward check). Keys not read are ignored; a
    /// missing one is a ValueError naming it.
    #[pyo3(signature = (input_ids, given=None))]
    fn pieces<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        given: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ids = ids_array(py, input_ids, "input_ids")?;
        let given = match given {
            None => None,
            Some(d) => {
                let mut g = Pieces::new();
                for name in self.inner.model.given_names() {
                    if let Some(v) = d.get_item(&name)? {
                        let a = f32_array(py, &v, &name)?;
                        g.insert(name, a);
                    }
                }
                Some(g)
            }
        };
        dict_of_arrays(py, self.inner.pieces(&ids, given.as_ref()).map_err(to_py_err)?)
    }

    /// `(targets int32 [B,T-1], target_mask float32 [B,T-1])`.
    fn shifted<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let ids = ids_array(py, input_ids, "input_ids")?;
        let mask = ids_array(py, attention_mask, "attention_mask")?;
        if ids.shape() != mask.shape() {
            return Err(PyValueError::new_err(
                "attention_mask shape differs from input_ids shape",
            ));
        }
        let (t, m) = self.inner.shifted(&ids, &mask).map_err(to_py_err)?;
        PyTuple::new(py, [to_numpy(py, &t)?, to_numpy(py, &m)?])
    }

    /// `{"ce", "distrust", "total"}` of a batch dict.
    fn loss<'py>(&self, py: Python<'py>, batch: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let b = batch_from(py, batch)?;
        loss_dict(py, self.inner.loss(&b).map_err(to_py_err)?)
    }

    /// `{"ce", "distrust", "total"}` of given logits `[B, T, V]` and a batch dict (the isolated loss check).
    fn loss_from_logits<'py>(
        &self,
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let b = batch_from(py, batch)?;
        let l = float_array(py, logits, "logits")?;
        loss_dict(py, self.inner.loss_from_logits(&l, &b).map_err(to_py_err)?)
    }

    /// One update (clip, AdamW) with given gradients `{name: array}` (the isolated optimizer check).
    fn update_from_gradients<'py>(&mut self, py: Python<'py>, grads: &Bound<'py, PyDict>) -> PyResult<()> {
        let mut g = std::collections::HashMap::new();
        for (k, v) in grads.iter() {
            let name: String = k.extract()?;
            let a = float_array(py, &v, &name)?;
            g.insert(name, a);
        }
        self.inner.update_from_gradients(g).map_err(to_py_err)
    }

    /// `(loss dict, {name: d total / d param})` over the trainable set; no update.
    fn gradients<'py>(&mut self, py: Python<'py>, batch: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let b = batch_from(py, batch)?;
        let (parts, grads) = self.inner.gradients(&b).map_err(to_py_err)?;
        PyTuple::new(
            py,
            [loss_dict(py, parts)?.into_any(), dict_of_arrays(py, grads)?.into_any()],
        )
    }

    /// One optimizer update on the batch (accumulated over accum_steps micro-batches).
    fn step<'py>(&mut self, py: Python<'py>, batch: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let b = batch_from(py, batch)?;
        loss_dict(py, self.inner.step(&b).map_err(to_py_err)?)
    }

    /// `{"step": int, "m": {name: array}, "v": {name: array}}`.
    fn optimizer_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("step", self.inner.optimizer.step)?;
        d.set_item(
            "m",
            dict_of_arrays(py, self.inner.optimizer.m.iter().map(|(k, v)| (k.clone(), v.clone())))?,
        )?;
        d.set_item(
            "v",
            dict_of_arrays(py, self.inner.optimizer.v.iter().map(|(k, v)| (k.clone(), v.clone())))?,
        )?;
        Ok(d)
    }

    fn save_checkpoint(&self, dir: PathBuf) -> PyResult<()> {
        self.inner.save_checkpoint(&dir).map_err(to_py_err)
    }

    /// A trainer rebuilt from a checkpoint folder alone (config.json + trainer.json settings + state).
    #[staticmethod]
    fn from_checkpoint(dir: PathBuf) -> PyResult<Self> {
        Ok(PyTrainer {
            inner: Trainer::from_checkpoint(&dir).map_err(to_py_err)?,
        })
    }

    fn load_checkpoint(&mut self, dir: PathBuf) -> PyResult<()> {
        self.inner.load_checkpoint(&dir).map_err(to_py_err)
    }

    /// The settings this trainer runs with, as JSON.
    fn settings_json(&self) -> String {
        self.inner.settings.to_value().to_string()
    }
}

#[pymodule]
fn parity_mlx_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTrainer>()?;
    m.add("MLX_VERSION", env!("PARITY_MLX_VERSION"))?;
    m.add("MLX_RS_VERSION", "0.33.0")?;
    Ok(())
}
