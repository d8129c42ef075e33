use std::process::ExitCode;

fn main() -> ExitCode {
    match mifo::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, joined by ": ".
            eprintln!("mifo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
