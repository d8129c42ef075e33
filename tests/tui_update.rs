//! Update logic of the workbench: filter parsing, sorting, marking, compare selection, confirm
//! flows, tagging, launching and polling, driven by keys over a fake backend.

mod tui_support;

use mifo::store::{RunKind, RunStatus};
use mifo::tui::action::{Action, Effect, Request};
use mifo::tui::app::{update, Popup, View};
use mifo::tui::backend::LearnSource;
use mifo::tui::driver::{parse_keys, SyncDriver};
use mifo::tui::filter::{Filter, SortKey, Term};
use tui_support::{FakeBackend, NOW};

fn driver() -> SyncDriver<FakeBackend> {
    SyncDriver::new(FakeBackend::new(), 100, 30, NOW, false)
}

fn shown_ids(d: &SyncDriver<FakeBackend>) -> Vec<String> {
    d.app
        .runs
        .shown
        .iter()
        .map(|&i| d.app.runs.rows[i].id.to_string())
        .collect()
}

#[test]
fn filter_terms_parse() {
    let f = Filter::parse("status:run,done kind:learn tag:best !coins Coffee").unwrap();
    assert_eq!(
        f.terms,
        vec![
            Term::Status(vec![RunStatus::Running, RunStatus::Done]),
            Term::Kind(vec![RunKind::Learn]),
            Term::Tag(vec!["best".into()]),
            Term::Not(Box::new(Term::Text("coins".into()))),
            Term::Text("coffee".into()),
        ]
    );
    assert_eq!(
        Filter::parse("status:c").unwrap().terms,
        vec![Term::Status(vec![RunStatus::Cancelled])]
    );
    assert!(Filter::parse("status:zz").is_err());
    assert!(Filter::parse("status:").is_err());
    assert!(Filter::parse("kind:paint").is_err());
    let (f, e) = Filter::parse_lenient("coffee status:zzz");
    assert_eq!(f.terms.len(), 1);
    assert!(e.unwrap().contains("zzz"));
}

#[test]
fn filtering_sorting_and_marking() {
    let mut d = driver();
    assert_eq!(d.app.runs.shown.len(), 7);
    d.press("/status:done<Enter>");
    assert!(!d.app.runs.filter_editing);
    assert_eq!(d.app.runs.shown.len(), 4);
    d.press("<Esc>"); // clears the filter in the runs view
    assert_eq!(d.app.runs.shown.len(), 7);
    d.press("/tag:best<Enter>");
    assert_eq!(d.app.runs.shown.len(), 1);
    d.press("/<C-u>lr=0.00<Enter>"); // text matches config deltas
    assert_eq!(d.app.runs.shown.len(), 2);
    d.press("<Esc>");

    // Sort by loss: lowest first, runs without a loss last.
    while d.app.runs.sort != SortKey::Loss {
        d.press("o");
    }
    let losses: Vec<Option<f64>> = d
        .app
        .runs
        .shown
        .iter()
        .map(|&i| d.app.runs.rows[i].final_loss)
        .collect();
    let known: Vec<f64> = losses.iter().flatten().copied().collect();
    assert!(known.windows(2).all(|w| w[0] <= w[1]), "{losses:?}");
    assert!(losses.last().unwrap().is_none());
    d.press("O");
    assert!(d.app.runs.reverse);
    d.press("o"); // back to created, newest first
    d.press("O");
    assert_eq!(d.app.runs.sort, SortKey::Created);

    // Marking keeps order and moves down; Space again unmarks; u clears.
    let ids = shown_ids(&d);
    d.press("g<Space><Space>");
    assert_eq!(
        d.app
            .runs
            .marked
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>(),
        ids[..2]
    );
    d.press("k<Space>");
    assert_eq!(d.app.runs.marked.len(), 1);
    d.press("u");
    assert!(d.app.runs.marked.is_empty());
}

#[test]
fn selection_survives_reloads_and_filters() {
    let mut d = driver();
    d.press("jjj");
    let id = d.app.runs.selected_row().unwrap().id.clone();
    d.tick(NOW + 10_000); // polls the runs list
    assert_eq!(d.app.runs.selected_row().unwrap().id, id);
    d.press("/learn<Enter>");
    assert_eq!(d.app.runs.selected_row().unwrap().id, id);
}

#[test]
fn compare_needs_two_to_eight_marked_runs() {
    let mut d = driver();
    d.press("d");
    assert_eq!(d.app.view, View::Runs);
    assert!(d.app.status.as_ref().unwrap().error);
    d.press("<Space>d");
    assert_eq!(d.app.view, View::Runs);
    d.press("<Space>d");
    assert_eq!(d.app.view, View::Compare);
    let c = d.app.compare.as_ref().unwrap();
    assert_eq!(c.ids.len(), 2);
    assert!(c.details.iter().all(Option::is_some));
    d.press("<Esc>");
    assert_eq!(d.app.view, View::Runs);
}

#[test]
fn delete_asks_first_and_refuses_live_runs() {
    let mut d = driver();
    // The newest run is queued: refused.
    d.press("D");
    assert!(d.app.popup.is_none());
    assert!(d
        .app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("cancel it first"));
    // A finished run: asks, `n` keeps it, `y` deletes it.
    d.press("jjjD");
    assert!(matches!(d.app.popup, Some(Popup::Confirm { .. })));
    d.press("n");
    assert!(d.backend.calls().is_empty());
    let id = d.app.runs.selected_row().unwrap().id.clone();
    d.press("Dy");
    assert_eq!(d.backend.calls(), vec![format!("delete {id}")]);
    assert_eq!(d.app.runs.rows.len(), 6);
    assert!(d.app.runs.row(&id).is_none());
}

#[test]
fn delete_marked_runs_together() {
    let mut d = driver();
    d.press("jjjj<Space><Space>Dy");
    assert_eq!(d.backend.calls().len(), 2);
    assert!(d.app.runs.marked.is_empty());
}

#[test]
fn cancel_only_live_runs_with_confirmation() {
    let mut d = driver();
    d.press("jjjx"); // failed run
    assert!(d.app.popup.is_none());
    d.press("ggjx"); // running run
    assert!(matches!(d.app.popup, Some(Popup::Confirm { .. })));
    d.press("y");
    let id = d.app.runs.selected_row().unwrap().id.clone();
    assert_eq!(d.backend.calls(), vec![format!("cancel {id}")]);
}

#[test]
fn rerun_confirms_and_queues_the_same_spec() {
    let mut d = driver();
    d.press("jjjjr");
    assert!(matches!(d.app.popup, Some(Popup::Confirm { .. })));
    d.press("y");
    let reruns = d.backend.reruns.lock().unwrap().clone();
    assert_eq!(reruns.len(), 1);
    assert!(reruns[0].1.sets.is_empty() && reruns[0].1.seed.is_none());
    assert!(d
        .app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("queued as job 4"));
    // Synthesis runs cannot be re-run from here yet.
    d.press("ggjjr");
    assert!(d.app.popup.is_none());
}

#[test]
fn edit_and_rerun_sends_the_changes() {
    let mut d = driver();
    d.press("jjjje");
    let form = d.app.launch.as_ref().unwrap();
    assert_eq!(form.sets.text(), "learn.lr=0.001 learn.penalty_steps=300");
    assert_eq!(form.seed.text(), "11");
    assert!(form.check.diff.is_empty());
    d.press("<Down><End> learn.reward_steps=100<Up><C-u>12<Enter>");
    assert_eq!(d.app.view, View::Jobs);
    let reruns = d.backend.reruns.lock().unwrap().clone();
    assert_eq!(reruns[0].1.seed, Some(12));
    assert_eq!(
        reruns[0].1.sets,
        vec![
            "learn.lr=0.001",
            "learn.penalty_steps=300",
            "learn.reward_steps=100"
        ]
    );
}

#[test]
fn launch_form_validates_like_the_cli() {
    let mut d = driver();
    d.press("L");
    // Nothing filled in: scene and model missing.
    d.press("<Enter>");
    assert_eq!(d.app.view, View::Launch);
    assert!(d.app.status.as_ref().unwrap().error);
    let root = env!("CARGO_MANIFEST_DIR");
    d.press(&format!(
        "<Down>{root}/fixtures/scenes/coffee<Down>{root}/fixtures/tiny-sd21"
    ));
    d.press("<Down><Down><C-u>7<Down><Down><Down>learn.nope=1");
    let form = d.app.launch.as_ref().unwrap();
    let errors: Vec<String> = form.check.errors.iter().map(|e| e.1.clone()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("unknown key `learn.nope`"), "{errors:?}");
    d.press("<C-u>learn.lr=fast");
    let e = &d.app.launch.as_ref().unwrap().check.errors[0].1;
    assert!(e.contains("expected a number"), "{e}");
    d.press("<C-u>lr=1");
    let e = &d.app.launch.as_ref().unwrap().check.errors[0].1;
    assert!(e.contains("must be qualified"), "{e}");
    d.press("<C-u>learn.flip_p=2");
    let e = &d.app.launch.as_ref().unwrap().check.errors[0].1;
    assert!(e.contains("learn.flip_p"), "{e}");
    d.press("<C-u>learn.reward_steps=2 learn.penalty_steps=3<Enter>");
    assert_eq!(d.app.view, View::Jobs);
    let launches = d.backend.launches.lock().unwrap().clone();
    assert_eq!(launches.len(), 1);
    let l = &launches[0];
    assert_eq!(l.seed, 7);
    assert_eq!(l.preset, "paper");
    assert_eq!(
        l.sets,
        vec!["learn.reward_steps=2", "learn.penalty_steps=3"]
    );
    assert_eq!(
        l.source,
        LearnSource::Scene(format!("{root}/fixtures/scenes/coffee").into())
    );
}

#[test]
fn launch_form_switches_to_image_and_masks() {
    let mut d = driver();
    d.press("L<Right>");
    let form = d.app.launch.as_ref().unwrap();
    assert!(!form.use_scene);
    assert_eq!(form.fields().len(), 10);
    let root = env!("CARGO_MANIFEST_DIR");
    d.press(&format!(
        "<Down>{root}/fixtures/scenes/coffee_128.png<Down>{root}/fixtures/scenes/coffee_128_mask0<Tab> {root}/fixtures/scenes/coffee_128_mask1<Tab>"
    ));
    let form = d.app.launch.as_ref().unwrap();
    assert!(
        form.masks.text().ends_with("coffee_128_mask1_spoon.png"),
        "{}",
        form.masks.text()
    );
    assert_eq!(form.check.inputs.as_deref(), Some("image + 2 masks"));
}

#[test]
fn tag_and_untag() {
    let mut d = driver();
    d.press("jjjjt");
    d.press("cup<Enter>");
    let id = d.app.runs.selected_row().unwrap().id.clone();
    assert_eq!(d.backend.calls(), vec![format!("tag {id} cup")]);
    assert!(d
        .app
        .runs
        .row(&id)
        .unwrap()
        .tags
        .contains(&"cup".to_string()));
    d.press("t-cup<Enter>");
    assert_eq!(d.backend.calls()[1], format!("untag {id} cup"));
    d.press("t<Esc>");
    assert_eq!(d.backend.calls().len(), 2);
}

#[test]
fn quit_asks_only_when_jobs_would_stop() {
    let mut d = driver();
    d.press("q");
    assert!(d.quit);
    let mut backend = FakeBackend::new();
    backend.survive_quit = false;
    let mut d = SyncDriver::new(backend, 100, 30, NOW, false);
    d.press("q");
    assert!(!d.quit);
    assert!(matches!(d.app.popup, Some(Popup::Confirm { .. })));
    d.press("n");
    assert!(!d.quit);
    d.press("qy");
    assert!(d.quit);
}

#[test]
fn polling_is_driven_by_ticks_and_deduplicated() {
    let mut d = driver();
    let app = &mut d.app;
    // A list is not requested again while one is in flight.
    app.polls.runs_in_flight = true;
    let fx = update(
        app,
        Action::Tick {
            now_ms: NOW + 60_000,
        },
    );
    assert!(!fx.contains(&Effect::Backend(Request::ListRuns)));
    app.polls.runs_in_flight = false;
    let fx = update(
        app,
        Action::Tick {
            now_ms: NOW + 120_000,
        },
    );
    assert!(fx.contains(&Effect::Backend(Request::ListRuns)));
    // The open run is polled every 500 ms while it is live.
    d.press("j<Enter>");
    let id = d.app.detail.as_ref().unwrap().id.clone();
    let fx = update(
        &mut d.app,
        Action::Tick {
            now_ms: NOW + 120_600,
        },
    );
    assert!(
        fx.contains(&Effect::Backend(Request::Metrics { id: id.clone() })),
        "{fx:?}"
    );
    // A finished run is not.
    d.press("<Esc>jjj<Enter>");
    let fx = update(
        &mut d.app,
        Action::Tick {
            now_ms: NOW + 121_200,
        },
    );
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Backend(Request::Metrics { .. }))),
        "{fx:?}"
    );
}

#[test]
fn key_notation_parses() {
    use ratatui::crossterm::event::{KeyCode, KeyModifiers};
    // Code and modifiers compared as they are: crossterm's `KeyEvent ==` treats an upper-case
    // character without SHIFT as equal to one with it.
    let parsed = |keys: &str| -> Vec<(KeyCode, KeyModifiers)> {
        parse_keys(keys)
            .into_iter()
            .map(|k| (k.code, k.modifiers))
            .collect()
    };
    assert_eq!(
        parsed("a<Enter><C-r>D<Space><PgDn><Esc>"),
        vec![
            (KeyCode::Char('a'), KeyModifiers::NONE),
            (KeyCode::Enter, KeyModifiers::NONE),
            (KeyCode::Char('r'), KeyModifiers::CONTROL),
            (KeyCode::Char('D'), KeyModifiers::SHIFT),
            (KeyCode::Char(' '), KeyModifiers::NONE),
            (KeyCode::PageDown, KeyModifiers::NONE),
            (KeyCode::Esc, KeyModifiers::NONE),
        ]
    );
    // A `<` that opens no known name is the character itself.
    assert_eq!(
        parsed("<x"),
        vec![
            (KeyCode::Char('<'), KeyModifiers::NONE),
            (KeyCode::Char('x'), KeyModifiers::NONE),
        ]
    );
}

#[test]
fn synth_form_edits_boxes_and_launches() {
    let mut d = driver();
    d.press("S"); // the newest run is queued: refused
    assert_eq!(d.app.view, View::Runs);
    d.press("jjjjS");
    assert_eq!(d.app.view, View::Synth);
    let form = d.app.synth.as_ref().unwrap();
    assert_eq!(form.tokens, Some(2));
    assert_eq!(form.prompt.text(), "a photo of <v0> and <v1> on a table");
    assert_eq!(form.boxes.len(), 2);
    assert!(form.errors.is_empty(), "{:?}", form.errors);
    // Into the box editor: Tab cycles boxes, moves stay inside the image.
    d.press("<Tab><Tab><Tab><Tab><Tab><Tab>");
    d.press("<Tab>"); // current: <v1>
    d.press("llllllllll"); // far right: clamped
    let f = d.app.synth.as_ref().unwrap();
    assert_eq!(f.current, 1);
    assert_eq!(f.boxes[1].1[2], 1.0);
    // Remove <v1>'s box: the prompt still names it, so launching is refused.
    d.press("<Del>");
    assert_eq!(d.app.synth.as_ref().unwrap().boxes.len(), 1);
    d.press("<Enter>");
    assert_eq!(d.app.view, View::Synth);
    assert!(d
        .app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("<v1> is in the prompt"));
    // `n` brings it back; a third is refused (two placeholders).
    d.press("n");
    assert_eq!(d.app.synth.as_ref().unwrap().boxes.len(), 2);
    d.press("n");
    assert!(d
        .app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("every placeholder"));
    // Bad overrides are caught as the CLI catches them.
    d.press("<BackTab><C-u>synth.nope=1");
    assert!(d.app.synth.as_ref().unwrap().errors[0].contains("unknown key `synth.nope`"));
    // The method and preset: ← → cycle them; an override the chosen preset refuses is caught.
    d.press("<C-u><BackTab><Right>"); // method bounded-attention
    d.press("<BackTab><Right>"); // preset official
    let f = d.app.synth.as_ref().unwrap();
    assert_eq!(
        (f.preset_name(), f.method_name()),
        ("official", "bounded-attention")
    );
    d.press("<Tab><Tab>synth.backtrack=true"); // the official preset's joint stop refuses it
    assert!(
        d.app.synth.as_ref().unwrap().errors[0].contains("synth.joint_stop"),
        "{:?}",
        d.app.synth.as_ref().unwrap().errors
    );
    d.press("<C-u><Enter>");
    assert_eq!(d.app.view, View::Jobs);
    let calls = d.backend.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("synth "), "{calls:?}");
    assert!(
        calls[0].ends_with("preset official method bounded-attention"),
        "{calls:?}"
    );
    assert!(
        calls[0].contains("\"<v0>\"") && calls[0].contains("\"<v1>\""),
        "{calls:?}"
    );
}

/// The launch form offers each learning method's preset, and `learn.method` in its `--set`
/// field changes the method on top of the chosen preset (the diff and step count say so).
#[test]
fn launch_form_offers_the_learning_methods() {
    let mut d = driver();
    d.press("L");
    let root = env!("CARGO_MANIFEST_DIR");
    d.press(&format!(
        "<Down>{root}/fixtures/scenes/coffee<Down>{root}/fixtures/tiny-sd21"
    ));
    d.press("<Down><Right><Right>"); // preset break-a-scene
    let form = d.app.launch.as_ref().unwrap();
    assert!(form.check.errors.is_empty(), "{:?}", form.check.errors);
    assert!(form.check.diff.is_empty());
    assert_eq!(form.check.steps, Some(800), "400 token + 400 weight steps");
    d.press("<Left><Left>"); // back to paper
    d.press("<Down><C-u>7<Down><Down><Down>learn.method=db-m");
    let form = d.app.launch.as_ref().unwrap();
    assert!(form.check.errors.is_empty(), "{:?}", form.check.errors);
    assert_eq!(
        form.check.steps,
        Some(400),
        "db-m runs only the paper's phase B"
    );
    assert!(
        form.check
            .diff
            .iter()
            .any(|(k, a, b)| k == "learn.method" && a.contains("mifo") && b.contains("db-m")),
        "{:?}",
        form.check.diff
    );
    d.press("<C-u>learn.method=nope");
    let e = &d.app.launch.as_ref().unwrap().check.errors[0].1;
    assert!(
        e.contains("learn.method: expected mifo, break-a-scene, ti-m or db-m"),
        "{e}"
    );
    d.press("<Up><Up><Up><Up><Right><Right><Right><Down><Down><Down><Down><C-u>learn.reward_steps=2<Enter>");
    assert_eq!(d.app.view, View::Jobs);
    let launches = d.backend.launches.lock().unwrap().clone();
    assert_eq!(launches[0].preset, "ti-m");
}

/// The sweep table's runs, top to bottom, as the letters of [`FakeBackend::with_sweep`].
fn sweep_order(d: &SyncDriver<FakeBackend>) -> String {
    let letters = ["a", "b", "c", "d"];
    let t = d.app.sweep.as_ref().unwrap().table.as_ref().unwrap();
    t.rows
        .iter()
        .map(|r| {
            let i = (0..4)
                .find(|&i| d.backend.id(3 - i).to_string() == r.run)
                .expect("a sweep run");
            letters[i]
        })
        .collect()
}

#[test]
fn sweep_table_opens_on_the_runs_tag_and_m_cycles_the_ordering_metric() {
    let mut d = SyncDriver::new(FakeBackend::with_sweep(), 120, 30, NOW, false);
    // A run without a tag has no sweep.
    d.press("jjjjj"); // the running run: untagged
    d.press("w");
    assert_eq!(d.app.view, View::Runs);
    let e = d.app.status.as_ref().unwrap();
    assert!(e.error && e.text.contains("has no tag"), "{}", e.text);

    // The newest run is in the sweep: `w` opens its table, best first by the main loss.
    d.press("gw");
    assert_eq!(d.app.view, View::Sweep);
    let s = d.app.sweep.as_ref().unwrap();
    assert_eq!(s.name, "lr-sweep");
    let t = s.table.as_ref().unwrap();
    assert_eq!(t.keys, ["learn.lr", "seed"]);
    assert_eq!(
        t.metrics,
        ["loss/total", "eval/sim_d", "eval/cs"],
        "the ordering metric, then the scores"
    );
    assert!(t.lower_better[0]);
    assert_eq!(sweep_order(&d), "badc");
    let calls = d.backend.calls();
    assert!(
        calls.contains(&r#"sweep lr-sweep ["loss/total:min", "eval/sim_d", "eval/cs"]"#.into()),
        "{calls:?}"
    );

    // `m`: SIM-D orders it (higher is better), then CS, then the reconstruction loss, then
    // round to the main loss; `M` goes back.
    d.press("m");
    let t = d.app.sweep.as_ref().unwrap().table.as_ref().unwrap();
    assert_eq!(t.metrics, ["eval/sim_d", "loss/total", "eval/cs"]);
    assert!(!t.lower_better[0]);
    assert_eq!(sweep_order(&d), "cadb");
    d.press("m");
    assert_eq!(sweep_order(&d), "bcad");
    d.press("m");
    assert_eq!(
        d.app
            .sweep
            .as_ref()
            .unwrap()
            .table
            .as_ref()
            .unwrap()
            .metrics[0],
        "loss/rec"
    );
    assert_eq!(sweep_order(&d), "badc");
    d.press("m");
    assert_eq!(
        d.app.sweep.as_ref().unwrap().sort.as_deref(),
        Some("loss/total")
    );
    d.press("M");
    assert_eq!(
        d.app.sweep.as_ref().unwrap().sort.as_deref(),
        Some("loss/rec")
    );
    d.press("MM");
    assert_eq!(sweep_order(&d), "cadb");
    // `o` flips the direction: worst SIM-D first.
    d.press("o");
    assert!(
        d.app
            .sweep
            .as_ref()
            .unwrap()
            .table
            .as_ref()
            .unwrap()
            .lower_better[0]
    );
    assert_eq!(sweep_order(&d), "bdac");

    // Enter opens the selected run (b: the selection follows its run as the order changes); Esc comes back to the table.
    let first = d.backend.id(2); // run b
    d.press("<Enter>");
    assert_eq!(d.app.view, View::Detail);
    assert_eq!(d.app.detail.as_ref().unwrap().id, first);
    d.press("<Esc>");
    assert_eq!(d.app.view, View::Sweep);

    // Space marks, `d` compares the marked runs.
    d.press("<Space><Space>d");
    assert_eq!(d.app.view, View::Compare);
    assert_eq!(d.app.compare.as_ref().unwrap().ids.len(), 2);
    // `w` in the compare view: the tag both runs share.
    d.press("w");
    assert_eq!(d.app.view, View::Sweep);
}

#[test]
fn sweep_table_follows_a_tag_filter_and_reports_an_unknown_sweep() {
    let mut d = SyncDriver::new(FakeBackend::with_sweep(), 120, 30, NOW, false);
    // The filter's tag wins over the selected run's tags.
    d.press("/tag:lr-sweep<Enter>w");
    assert_eq!(d.app.sweep.as_ref().unwrap().name, "lr-sweep");
    d.press("<Esc><Esc>/tag:nope<Enter>w");
    assert_eq!(d.app.view, View::Sweep);
    let s = d.app.sweep.as_ref().unwrap();
    assert!(s.table.is_none());
    assert!(
        s.error
            .as_deref()
            .unwrap()
            .contains("no run is tagged nope"),
        "{:?}",
        s.error
    );
}
