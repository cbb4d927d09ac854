//! The program the harness runs: `ADAPTER REQUEST_DIR RESPONSE_DIR`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use crate::{run_stage, write_tensors, Error, Port, RequestFolder, Result};

/// Answer every requested stage into `response`: `<stage>.safetensors` (+ `<stage>.json`),
/// `<stage>.unsupported` or `<stage>.error`. A stage's failure is its answer, never the program's.
pub fn answer<P: Port>(request: &Path, response: &Path) -> Result<()> {
    answer_with::<P>(request, response, BTreeMap::new())
}

/// `answer`, with the adapter's options (`RequestFolder::option`).
pub fn answer_with<P: Port>(request: &Path, response: &Path, options: BTreeMap<String, String>) -> Result<()> {
    let mut req = RequestFolder::open(request)?;
    req.options = options;
    std::fs::create_dir_all(response)?;
    let mut shared: Option<P> = None;
    for stage in &req.request.stages {
        match run_stage::<P>(&req, stage, &mut shared) {
            Ok(out) => {
                if let Some(meta) = out.meta {
                    std::fs::write(response.join(format!("{stage}.json")), serde_json::to_string(&meta)?)?;
                }
                let file = out.file.as_deref().unwrap_or(stage);
                write_tensors(&response.join(format!("{file}.safetensors")), &out.tensors)?;
            }
            Err(Error::Unsupported(why)) => std::fs::write(response.join(format!("{stage}.unsupported")), why)?,
            Err(Error::Failed(why)) => std::fs::write(response.join(format!("{stage}.error")), why)?,
        }
    }
    Ok(())
}

/// The adapter's command line: `--name value` options, then REQUEST_DIR and RESPONSE_DIR.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<(BTreeMap<String, String>, [String; 2])> {
    let mut options = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.strip_prefix("--") {
            Some(name) if !name.is_empty() => {
                let value = args
                    .next()
                    .ok_or_else(|| Error::failed(format!("--{name} needs a value")))?;
                options.insert(name.to_string(), value);
            }
            _ => dirs.push(a),
        }
    }
    let dirs: [String; 2] = dirs.try_into().map_err(|d: Vec<String>| {
        Error::failed(format!(
            "expected REQUEST_DIR and RESPONSE_DIR, got {} folders",
            d.len()
        ))
    })?;
    Ok((options, dirs))
}

/// `main` of an adapter: `[--name value ...] REQUEST_DIR RESPONSE_DIR`; the options reach `Port::load` as
/// `RequestFolder::option`. Exit 0 when every stage was answered (its answer may be an error), 2 on a usage
/// or request problem.
pub fn serve<P: Port>(args: impl IntoIterator<Item = String>) -> ExitCode {
    let (options, [request, response]) = match parse_args(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}\nusage: ADAPTER [--name value ...] REQUEST_DIR RESPONSE_DIR (the mlx-parity protocol, docs/protocol.md)");
            return ExitCode::from(2);
        }
    };
    match answer_with::<P>(Path::new(&request), Path::new(&response), options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parity adapter: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_come_before_the_two_folders() {
        let (options, dirs) = parse_args(args(&["--inject", "no_shift", "req", "resp"])).unwrap();
        assert_eq!(options.get("inject").map(String::as_str), Some("no_shift"));
        assert_eq!(dirs, ["req".to_string(), "resp".to_string()]);
        assert!(parse_args(args(&["req", "resp"])).unwrap().0.is_empty());
        let err = parse_args(args(&["req", "resp", "--inject"])).unwrap_err().to_string();
        assert!(err.contains("--inject needs a value"), "{err}");
        let err = parse_args(args(&["req"])).unwrap_err().to_string();
        assert!(err.contains("got 1 folders"), "{err}");
    }
}
