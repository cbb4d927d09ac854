//! The kit against the Python harness itself: a request the harness writes is read here, and the
//! answer written here is read back by the harness's own client, as in an audit.

use std::path::Path;
use std::process::Command;

use parity_adapter::*;

mod common;
use common::Toy;

fn python(code: &str, args: &[&Path]) -> String {
    let exe = std::env::var("PARITY_PYTHON").expect("PARITY_PYTHON: the project's .venv python (rust/test.sh sets it)");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(exe)
        .arg("-c")
        .arg(code)
        .args(args)
        .current_dir(&repo)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs the harness: PARITY_PYTHON=<the project's venv python>; rust/test.sh runs it"]
fn a_harness_request_is_read_and_the_answer_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (req, resp) = (dir.path().join("request"), dir.path().join("response"));
    python(
        "import sys; from pathlib import Path; from mlx_parity.harness.case import find_case; from mlx_parity.harness.protocol.client import write_request, set_stages\n\
         case = find_case('gqa_padded'); write_request(case, Path(sys.argv[1]), isolated=True); set_stages(Path(sys.argv[1]), case, ['loss', 'weight_mapping', 'isolated_loss'])",
        &[&req],
    );
    let folder = RequestFolder::open(&req).unwrap();
    let batch = folder.batch().unwrap();
    assert_eq!(batch.input_ids.shape.len(), 2);
    assert!(matches!(batch.input_ids.data, Data::I32(_)));
    assert_eq!(batch.auth_weight.shape, vec![batch.input_ids.shape[0]]);
    assert!(folder.checkpoint_dir().join("config.json").exists());
    assert_eq!(folder.steps().unwrap(), 4);
    let inputs = folder.isolated_inputs().unwrap();
    assert!(inputs.contains_key("forward.logits") && inputs.contains_key("isolated.forward.embed"));
    assert!(inputs.keys().any(|k| k.starts_with("grad.")));

    answer::<Toy>(&req, &resp).unwrap();
    let read = python(
        "import sys; from pathlib import Path; from mlx_parity.harness.protocol.client import read_response\n\
         for s in ('loss', 'weight_mapping', 'isolated_loss'):\n\
         \x20   o = read_response(Path(sys.argv[1]), s)\n\
         \x20   print(s, o.error, o.unsupported, sorted(o.tensors), o.meta.get('load_report'))",
        &[&resp],
    );
    let lines: Vec<&str> = read.lines().collect();
    assert_eq!(
        lines[0], "loss None None ['loss.ce', 'loss.distrust', 'loss.total'] None",
        "{read}"
    );
    assert!(
        lines[1].starts_with("weight_mapping None None ['weights.theta']")
            && lines[1].contains("'missing': ['model.extra.bias']"),
        "{read}"
    );
    assert!(
        lines[2].starts_with("isolated_loss None this port does not implement"),
        "{read}"
    );
}

#[test]
#[ignore = "needs the harness: PARITY_PYTHON=<the project's venv python>; rust/test.sh runs it"]
fn tensors_round_trip_between_numpy_and_the_kit() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    python(
        "import sys, numpy as np; from mlx_parity.harness.protocol.tensors import save_tensors\n\
         save_tensors({'f': np.array([[1.5, -0.0], [3e-39, 7.0]], np.float32), 'i': np.array([-1, 2**31 - 1], np.int32),\n\
         \x20             'l': np.array(2**40, np.int64), 'd': np.array([1e-300]), 't': np.arange(6, dtype=np.float32).reshape(2, 3).T}, sys.argv[1])",
        &[&a],
    );
    let t = read_tensors(&a).unwrap();
    assert_eq!(t["t"].shape, vec![3, 2]);
    assert_eq!(
        t["t"].to_f32(),
        vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0],
        "C order, whatever numpy's layout"
    );
    assert_eq!(t["i"], Tensor::i32(vec![2], vec![-1, i32::MAX]).unwrap());
    write_tensors(&b, &t).unwrap();
    let same = python(
        "import sys, numpy as np; from safetensors.numpy import load_file\n\
         a, b = load_file(sys.argv[1]), load_file(sys.argv[2])\n\
         print(all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b))",
        &[&a, &b],
    );
    assert_eq!(same.trim(), "True");
}
