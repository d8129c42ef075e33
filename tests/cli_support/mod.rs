//! Running the `mifo` binary in tests: a store of its own, the checkout as working directory,
//! and the two ways a command ends (a JSON document, or one error line).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The checkout.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A fresh, empty folder under the temp dir, named after the test and the process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mifo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `mifo --store STORE ARGS…` from the checkout (engine idle exit after 3 s, no
/// `MIFO_MODEL` from the caller's environment).
pub fn mifo(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mifo"))
        .current_dir(root())
        .env("MIFO_ENGINE_IDLE", "3")
        .env_remove("MIFO_MODEL")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

/// The JSON document a successful command printed.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Stdout of a successful command.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The error of a refused command: it failed, did not panic, and said why in its first line
/// (mifo's own errors are one line; clap adds a usage hint below its own).
pub fn err_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err.trim().lines().next().unwrap_or("").to_string()
}

/// Copies a folder tree (files and subfolders), e.g. a fixture model to break or edit.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
