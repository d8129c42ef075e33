//! The `mifo` command: runs `mifo::cli::main` and turns its `anyhow` error into one line on
//! stderr (`mifo: error: …`, the whole cause chain) and a non-zero exit; a closed output pipe
//! (`mifo runs ls | head`) counts as success.

use std::process::ExitCode;

fn main() -> ExitCode {
    match mifo::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        // `mifo runs ls | head`: a closed pipe is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line: the whole cause chain, joined by ": ".
            eprintln!("mifo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
