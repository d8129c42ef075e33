//! Snapshot tests of every workbench view, driven by synthetic key presses over a fake backend
//! (ids and times are synthetic and fixed, so nothing needs scrubbing).

mod tui_support;

use mifo::tui::app::View;
use mifo::tui::driver::SyncDriver;
use tui_support::{FakeBackend, NOW};

fn driver(w: u16, h: u16, images: bool) -> SyncDriver<FakeBackend> {
    SyncDriver::new(FakeBackend::new(), w, h, NOW, images)
}

#[test]
fn runs_view() {
    let mut d = driver(110, 16, false);
    insta::assert_snapshot!("runs", d.draw());
}

#[test]
fn runs_view_filtered_sorted_and_marked() {
    let mut d = driver(110, 14, false);
    d.press("/status:done !kind:synth<Enter>");
    d.press("o"); // sort by status
    d.press("<Space><Space>");
    insta::assert_snapshot!("runs_filtered_marked", d.draw());
}

#[test]
fn runs_view_bad_filter_term_is_reported_and_ignored() {
    let mut d = driver(110, 14, false);
    d.press("/status:zzz");
    insta::assert_snapshot!("runs_bad_filter", d.draw());
}

#[test]
fn detail_view_with_chart_and_halfblocks_images() {
    let mut d = driver(120, 40, true);
    d.press("jjjj<Enter>"); // the run with lr 0.001 (changed from the preset)
    assert_eq!(d.app.view, View::Detail);
    insta::assert_snapshot!("detail", d.draw());
}

#[test]
fn detail_view_log_y_smoothing_and_outputs() {
    let mut d = driver(120, 40, true);
    d.press("jjjj<Enter>ls<Right><Right>");
    let screen = d.draw();
    assert!(screen.contains("loss · log-y · EMA"), "{screen}");
    assert!(screen.contains("Output 3/3 · attn/<v1>.png"), "{screen}");
    insta::assert_snapshot!("detail_log_ema_output3", screen);
    d.press("c"); // next chart group
    assert!(d.draw().contains("leak · log-y · EMA (2/3)"));
}

#[test]
fn detail_view_of_a_running_run_shows_progress() {
    let mut d = driver(120, 30, false);
    d.press("j<Enter>");
    let screen = d.draw();
    assert!(
        screen.contains("running 3% step 40/1200 reward"),
        "{screen}"
    );
    insta::assert_snapshot!("detail_running_images_off", screen);
}

#[test]
fn compare_view_of_marked_runs() {
    let mut d = driver(120, 40, true);
    // Mark the two coffee baselines (a run and its re-run) and the lr=0.001 run.
    d.press("jjjj<Space><Space><Space>d");
    assert_eq!(d.app.view, View::Compare);
    insta::assert_snapshot!("compare", d.draw());
    d.press("a");
    let all = d.draw();
    assert!(all.contains("Config · all"), "{all}");
}

#[test]
fn launch_form_new_run() {
    let mut d = driver(110, 24, false);
    d.press("L");
    assert_eq!(d.app.view, View::Launch);
    // Fixed seed so the snapshot is stable.
    d.app.launch.as_mut().unwrap().seed.set("42");
    d.press("<Down>fixtures/scenes/cof<Tab>");
    d.press("<Down>fixtures/tiny-sd21");
    d.press("<Down><Right>"); // preset official
    d.press("<Down><Down><Down><Down>learn.lr=0.001 learn.penalty_steps=300");
    insta::assert_snapshot!("launch_new", d.draw());
}

#[test]
fn launch_form_edit_and_rerun() {
    let mut d = driver(110, 20, false);
    d.press("jjjje"); // the lr=0.001, penalty 300 run
    assert_eq!(d.app.view, View::Launch);
    d.press("<Down><End> learn.reward_steps=100");
    insta::assert_snapshot!("launch_rerun", d.draw());
}

#[test]
fn jobs_view() {
    let mut d = driver(110, 12, false);
    d.press("2");
    insta::assert_snapshot!("jobs", d.draw());
}

#[test]
fn help_popup() {
    let mut d = driver(100, 40, false);
    d.press("?");
    insta::assert_snapshot!("help", d.draw());
}

#[test]
fn confirm_and_tag_popups() {
    let mut d = driver(100, 14, false);
    d.press("jjjD");
    insta::assert_snapshot!("confirm_delete", d.draw());
    d.press("n");
    d.press("t");
    d.press("best-cup");
    insta::assert_snapshot!("tag_prompt", d.draw());
}

#[test]
fn too_small_terminal_shows_a_message() {
    let mut d = driver(39, 11, false);
    insta::assert_snapshot!("too_small", d.draw());
}

#[test]
fn every_view_draws_at_every_size_without_panicking() {
    let mut d = driver(120, 40, true);
    let scripts: [&str; 6] = [
        "",
        "jjj<Enter>",
        "<Esc>jjj<Space><Space>d",
        "<Esc>L",
        "<Esc>2",
        "?",
    ];
    for script in scripts {
        d.press(script);
        for (w, h) in [
            (40, 12),
            (41, 13),
            (50, 15),
            (60, 20),
            (80, 24),
            (120, 40),
            (200, 60),
            (30, 8),
            (1, 1),
        ] {
            d.resize(w, h);
            let screen = d.draw();
            assert_eq!(screen.lines().count(), h as usize);
        }
        d.resize(120, 40);
    }
}

#[test]
fn synth_form_with_box_editor_over_the_preview() {
    let mut d = driver(120, 30, true);
    d.press("jjjjS"); // the lr=0.001 run: done, with a preview
    assert_eq!(d.app.view, View::Synth);
    d.app.synth.as_mut().unwrap().seed.set("5");
    d.press("<Tab><Tab><Tab><Tab><Tab><Tab>"); // to the box editor
    d.press("llJ"); // move <v0> right twice, make it taller
    insta::assert_snapshot!("synth", d.draw());
}

#[test]
fn compare_view_heads_its_table_with_evaluation_scores() {
    let backend = FakeBackend::new();
    {
        let mut runs = backend.runs.lock().unwrap();
        for (i, (c, d, n)) in [(4usize, (0.6, 0.8, 0.7)), (5, (0.5, 0.75, 0.72))] {
            let m = &mut runs[i].metrics;
            for (name, v) in [
                ("eval/sim_c", c),
                ("eval/sim_d", d),
                ("eval/nsim_d", n),
                ("eval/cs", c * d * (1.0 - n)),
                ("eval/sim_d/<v0>", d),
                ("eval/setup", 12345.0),
            ] {
                m.insert(name.to_string(), vec![(0, v)]);
            }
        }
    }
    let mut d = SyncDriver::new(backend, 120, 40, NOW, false);
    d.press("jjjj<Space><Space>d");
    assert_eq!(d.app.view, View::Compare);
    let screen = d.draw();
    let line = |key: &str| {
        screen
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no {key} row:\n{screen}"))
            .to_string()
    };
    // Scores of A and B side by side, the paper's four first (SIM-C row above the SIM-D row).
    assert!(line("eval/sim_c").contains("0.6000") && line("eval/sim_c").contains("0.5000"));
    assert!(line("eval/cs ").contains("0.1440") && line("eval/cs ").contains("0.1050"));
    assert!(screen.find("eval/sim_c").unwrap() < screen.find("eval/nsim_d ").unwrap());
    assert!(screen.find("eval/cs").unwrap() < screen.find("eval/sim_d/<v0>").unwrap());
    // The setup id is not a score, and scores are not charted.
    assert!(!screen.contains("eval/setup"), "{screen}");
    assert!(d
        .app
        .compare
        .as_ref()
        .unwrap()
        .metric_names
        .iter()
        .all(|n| !n.starts_with("eval/")));
}

#[test]
fn detail_view_prints_evaluation_scores_instead_of_charting_them() {
    let backend = FakeBackend::new();
    {
        let mut runs = backend.runs.lock().unwrap();
        let m = &mut runs[4].metrics;
        for (name, v) in [
            ("eval/sim_c", 0.25),
            ("eval/sim_d", 0.75),
            ("eval/nsim_d", 0.5),
            ("eval/cs", 0.09375),
        ] {
            m.insert(name.to_string(), vec![(0, v)]);
        }
    }
    let mut d = SyncDriver::new(backend, 120, 40, NOW, false);
    d.press("jjjj<Enter>");
    let screen = d.draw();
    assert!(
        screen.contains("eval     SIM-C 0.250  SIM-D 0.750"),
        "{screen}"
    );
    assert!(screen.contains("NSIM-D 0.500  CS 0.094"), "{screen}");
    let groups = &d.app.detail.as_ref().unwrap().groups;
    assert!(groups.iter().all(|g| g != "eval"), "{groups:?}");
}

#[test]
fn sweep_table_best_first_and_reordered_by_a_score() {
    let mut d = SyncDriver::new(FakeBackend::with_sweep(), 110, 12, NOW, false);
    d.press("w"); // the newest run is in the sweep `lr-sweep`
    assert_eq!(d.app.view, View::Sweep);
    insta::assert_snapshot!("sweep", d.draw());
    d.press("m<Space>"); // the selection follows run b, now last; Space marks it
    let screen = d.draw();
    assert!(
        screen.contains("best first by eval/sim_d (higher is better)"),
        "{screen}"
    );
    insta::assert_snapshot!("sweep_by_sim_d", screen);
}
