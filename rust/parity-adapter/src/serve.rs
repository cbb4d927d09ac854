//! The program the harness runs: `ADAPTER REQUEST_DIR RESPONSE_DIR`.

use std::path::Path;
use std::process::ExitCode;

use crate::{run_stage, write_tensors, Error, Port, RequestFolder, Result};

/// Answer every requested stage into `response`: `<stage>.safetensors` (+ `<stage>.json`),
/// `<stage>.unsupported` or `<stage>.error`. A stage's failure is its answer, never the program's.
pub fn answer<P: Port>(request: &Path, response: &Path) -> Result<()> {
    let req = RequestFolder::open(request)?;
    std::fs::create_dir_all(response)?;
    let mut shared: Option<P> = None;
    for stage in &req.request.stages {
        match run_stage::<P>(&req, stage, &mut shared) {
            Ok(out) => {
                if let Some(meta) = out.meta {
                    std::fs::write(response.join(format!("{stage}.json")), serde_json::to_string(&meta)?)?;
                }
                write_tensors(&response.join(format!("{stage}.safetensors")), &out.tensors)?;
            }
            Err(Error::Unsupported(why)) => std::fs::write(response.join(format!("{stage}.unsupported")), why)?,
            Err(Error::Failed(why)) => std::fs::write(response.join(format!("{stage}.error")), why)?,
        }
    }
    Ok(())
}

/// `main` of an adapter: two arguments, REQUEST_DIR and RESPONSE_DIR. Exit 0 when every stage was
/// answered (its answer may be an error), 2 on a usage or request problem.
pub fn serve<P: Port>(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.into_iter().collect();
    if args.len() != 2 {
        eprintln!("usage: ADAPTER REQUEST_DIR RESPONSE_DIR (the mlx-parity protocol, docs/protocol.md)");
        return ExitCode::from(2);
    }
    match answer::<P>(Path::new(&args[0]), Path::new(&args[1])) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parity adapter: {e}");
            ExitCode::from(2)
        }
    }
}
