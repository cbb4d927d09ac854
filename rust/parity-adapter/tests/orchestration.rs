//! The kit's orchestration with a toy port (one parameter vector, a fixed step): the names and values
//! of every stage, the checkpoint sequence, and the answers for what a port does not implement.

use std::path::Path;

use parity_adapter::*;

mod common;
use common::Toy;

fn request(dir: &Path, stages: &[&str]) -> RequestFolder {
    let batch: Tensors = [
        ("input_ids".to_string(), Tensor::i32(vec![1, 3], vec![4, 5, 6]).unwrap()),
        (
            "attention_mask".to_string(),
            Tensor::i32(vec![1, 3], vec![1, 1, 0]).unwrap(),
        ),
        ("auth_weight".to_string(), Tensor::f32(vec![1], vec![0.5]).unwrap()),
        ("prov_entropy".to_string(), Tensor::f32(vec![1], vec![1.0]).unwrap()),
    ]
    .into();
    write_tensors(&dir.join("batch.safetensors"), &batch).unwrap();
    let req = serde_json::json!({"protocol": PROTOCOL, "fixture": "toy", "stages": stages, "checkpoint": "checkpoint",
        "batch": "batch.safetensors", "lora_init": null, "settings": {"steps": 3, "checkpoint_at": 1}, "isolated_inputs": null});
    std::fs::write(dir.join("request.json"), req.to_string()).unwrap();
    RequestFolder::open(dir).unwrap()
}

fn f32s(t: &Tensors, k: &str) -> Vec<f32> {
    t.get(k)
        .unwrap_or_else(|| panic!("no {k} in {:?}", t.keys().collect::<Vec<_>>()))
        .to_f32()
}

#[test]
fn an_update_is_reported_as_the_parameters_change_and_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_stage::<Toy>(&request(dir.path(), &[]), "optimizer", &mut None)
        .unwrap()
        .tensors;
    assert!(f32s(&out, "optimizer.delta.theta")
        .iter()
        .all(|d| (d + 0.1).abs() < 1e-6));
    assert_eq!(out["optimizer.step"], Tensor::i64(vec![], vec![1]).unwrap());
    assert_eq!(f32s(&out, "optimizer.loss"), vec![6.0]);
}

#[test]
fn the_trajectory_is_the_change_over_all_updates_and_every_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_stage::<Toy>(&request(dir.path(), &[]), "trajectory", &mut None)
        .unwrap()
        .tensors;
    let d = f32s(&out, "trajectory.delta.theta");
    assert!((d[0] + 0.6).abs() < 1e-6, "{d:?}"); // 0.1 + 0.2 + 0.3
    assert_eq!(out["trajectory.loss"].shape, vec![3]);
}

#[test]
fn the_checkpoint_stage_resumes_and_reruns_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_stage::<Toy>(&request(dir.path(), &[]), "checkpoint", &mut None)
        .unwrap()
        .tensors;
    assert_eq!(
        f32s(&out, "checkpoint.delta.theta"),
        f32s(&out, "checkpoint.uninterrupted.delta.theta")
    );
    assert_eq!(
        f32s(&out, "checkpoint.loss"),
        f32s(&out, "checkpoint.uninterrupted.loss")
    );
    assert_eq!(out["checkpoint.loss"].shape, vec![3]);
}

#[test]
fn weight_mapping_carries_the_load_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_stage::<Toy>(&request(dir.path(), &[]), "weight_mapping", &mut None).unwrap();
    assert!(out.tensors.contains_key("weights.theta"));
    assert_eq!(out.meta.unwrap()["load_report"]["missing"][0], "model.extra.bias");
}

#[test]
fn answer_writes_each_stage_and_says_what_is_not_implemented() {
    let dir = tempfile::tempdir().unwrap();
    let (req, resp) = (dir.path().join("req"), dir.path().join("resp"));
    std::fs::create_dir_all(&req).unwrap();
    request(&req, &["loss", "isolated_optimizer", "no_such_stage"]);
    answer::<Toy>(&req, &resp).unwrap();
    assert_eq!(
        f32s(&read_tensors(&resp.join("loss.safetensors")).unwrap(), "loss.total"),
        vec![6.0]
    );
    assert!(
        resp.join("isolated_optimizer.error").exists(),
        "no isolated_inputs: an error, not a pass"
    );
    assert!(resp.join("no_such_stage.unsupported").exists());
}

#[test]
fn an_optional_request_the_port_lacks_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path(), &[]);
    let logits: Tensors = [(
        "forward.logits".to_string(),
        Tensor::f32(vec![1, 3, 2], vec![0.0; 6]).unwrap(),
    )]
    .into();
    write_tensors(&dir.path().join("iso.safetensors"), &logits).unwrap();
    let mut r = req.clone();
    r.request.isolated_inputs = Some("iso.safetensors".into());
    match run_stage::<Toy>(&r, "isolated_loss", &mut None) {
        Err(Error::Unsupported(why)) => assert!(why.contains("loss of given logits")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rank_writes_its_first_and_last_update_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let (req, resp) = (dir.path().join("req"), dir.path().join("resp"));
    std::fs::create_dir_all(&req).unwrap();
    request(&req, &["data_parallel"]);
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(req.join("request.json")).unwrap()).unwrap();
    spec["world_size"] = 2.into();
    spec["launcher"] = "mlx".into();
    std::fs::write(req.join("request.json"), spec.to_string()).unwrap();
    answer::<Toy>(&req, &resp).unwrap();
    let out = read_tensors(&resp.join("data_parallel.rank1.safetensors")).unwrap();
    assert!(f32s(&out, "optimizer.delta.theta")
        .iter()
        .all(|d| (d + 0.1).abs() < 1e-6));
    assert!((f32s(&out, "trajectory.delta.theta")[0] + 0.6).abs() < 1e-6); // 0.1 + 0.2 + 0.3
    assert_eq!(f32s(&out, "trajectory.loss").len(), 3);
    assert_eq!(out["optimizer.step"], Tensor::i64(vec![], vec![1]).unwrap());
    assert_eq!(out["trajectory.step"], Tensor::i64(vec![], vec![3]).unwrap());
}

#[test]
fn the_pieces_a_port_cannot_compute_are_named_beside_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (req, resp) = (dir.path().join("req"), dir.path().join("resp"));
    std::fs::create_dir_all(&req).unwrap();
    request(&req, &["isolated_forward"]);
    let given: Tensors = [(
        "isolated.forward.embed".to_string(),
        Tensor::f32(vec![1], vec![0.0]).unwrap(),
    )]
    .into();
    write_tensors(&req.join("iso.safetensors"), &given).unwrap();
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(req.join("request.json")).unwrap()).unwrap();
    spec["isolated_inputs"] = "iso.safetensors".into();
    std::fs::write(req.join("request.json"), spec.to_string()).unwrap();
    answer::<Toy>(&req, &resp).unwrap();
    let out = read_tensors(&resp.join("isolated_forward.safetensors")).unwrap();
    assert!(out.contains_key("isolated.forward.embed"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resp.join("isolated_forward.json")).unwrap()).unwrap();
    assert_eq!(meta["not_computed"]["scores"], "fused attention");
}

#[test]
fn a_port_s_own_names_are_written_as_the_checkpoint_s_and_given_gradients_reach_it_under_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(dir.path(), &[]);
    req.options.insert("prefix".into(), "model.".into());
    let given: Tensors = [(
        "grad.model.theta".to_string(),
        Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]).unwrap(),
    )]
    .into();
    write_tensors(&dir.path().join("iso.safetensors"), &given).unwrap();
    req.request.isolated_inputs = Some("iso.safetensors".into());
    let weights = run_stage::<Toy>(&req, "weight_mapping", &mut None).unwrap().tensors;
    assert_eq!(weights.keys().collect::<Vec<_>>(), ["weights.model.theta"]);
    let grads = run_stage::<Toy>(&req, "gradients", &mut None).unwrap().tensors;
    assert!(grads.contains_key("grad.model.theta"));
    let update = run_stage::<Toy>(&req, "isolated_optimizer", &mut None).unwrap().tensors;
    let d = f32s(&update, "isolated.optimizer.delta.model.theta");
    assert!(
        d.iter().zip([0.1, 0.2, 0.3]).all(|(d, e)| (d + e).abs() < 1e-6),
        "{d:?}"
    );
}

#[test]
fn a_port_on_one_process_answers_data_parallel_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    match run_stage::<Toy>(&request(dir.path(), &[]), "data_parallel", &mut None) {
        Err(Error::Unsupported(why)) => assert!(why.contains("one process"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    request(dir.path(), &[]);
    let text = std::fs::read_to_string(dir.path().join("request.json"))
        .unwrap()
        .replace(PROTOCOL, "mlx-parity/0");
    std::fs::write(dir.path().join("request.json"), text).unwrap();
    assert!(RequestFolder::open(dir.path()).is_err());
}
