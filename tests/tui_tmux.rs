//! The real `mifo` binary in tmux: open the workbench, launch a
//! learning run on the tiny model from the form, watch it finish, open it and see the chart,
//! re-run it, mark both runs and compare them. The runs go through the engine.
//!
//! tmux is required (`.ci/run` installs it): without it the test fails, unless
//! `MIFO_SKIP_TMUX=1` is set, and then it says on stdout that it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "w", k]);
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    fn text(&self, text: &str) {
        self.run(&["send-keys", "-t", "w", "-l", text]);
        std::thread::sleep(Duration::from_millis(150));
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "w"])
    }
    fn wait_for(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn workbench_end_to_end_in_tmux() {
    let tmux_present = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tmux_present {
        if std::env::var("MIFO_SKIP_TMUX").is_ok_and(|v| v == "1") {
            println!(
                "SKIPPED workbench_end_to_end_in_tmux: tmux is not installed and MIFO_SKIP_TMUX=1"
            );
            return;
        }
        panic!(
            "tmux is not installed: install it (Debian: apt-get install -y tmux), or set MIFO_SKIP_TMUX=1 to skip this test"
        );
    }
    let store = std::env::temp_dir().join(format!("mifo-tmux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let t = Tmux {
        socket: format!("mifo-test-{}", std::process::id()),
    };
    let cmd = format!(
        "MIFO_ENGINE_IDLE=5 {} --store {} --model {} --image-protocol halfblocks",
        env!("CARGO_BIN_EXE_mifo"),
        store.display(),
        root().join("fixtures/tiny-sd21").display()
    );
    t.run(&[
        "new-session",
        "-d",
        "-s",
        "w",
        "-x",
        "140",
        "-y",
        "44",
        &cmd,
    ]);
    t.wait_for("the runs view", 30, |s| {
        s.contains("Runs") && s.contains("engine")
    });

    // Launch from the form.
    t.keys(&["L", "Down"]);
    t.text(&root().join("fixtures/scenes/coffee").display().to_string());
    t.keys(&["Down", "Down", "Down", "C-u"]);
    t.text("7");
    t.keys(&["Down", "Down", "Down"]);
    t.text("learn.reward_steps=3 learn.penalty_steps=4 learn.dreambooth_steps=2 learn.preview_steps=3 learn.checkpoint_every=2");
    t.keys(&["Enter"]);
    t.wait_for("the job to be queued", 20, |s| s.contains("Jobs"));
    // Watch it finish, then open it from the runs view.
    t.keys(&["1"]);
    t.wait_for("the run to finish", 120, |s| s.contains(" learn done"));
    t.keys(&["g", "Enter"]);
    let s = t.wait_for("the detail view with the chart", 20, |s| {
        s.contains("phases reward 0–2")
    });
    assert!(s.contains("loss (1/"), "{s}");
    assert!(s.contains("<v0>"), "{s}");

    // Re-run it (confirm), wait for two finished runs, mark both and compare.
    t.keys(&["r", "y"]);
    t.keys(&["1"]);
    t.wait_for("the re-run to finish", 120, |s| {
        s.matches(" learn done").count() == 2
    });
    t.keys(&["g", "Space", "Space", "d"]);
    let s = t.wait_for("the compare view", 20, |s| s.contains("Compare 2 runs"));
    assert!(s.contains("bit-identical ✓"), "{s}");
    t.keys(&["q"]);
    let _ = std::fs::remove_dir_all(&store);
}
