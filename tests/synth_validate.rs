//! Input validation of the synthesis stage (one-line errors, warnings), `--set synth.*` plumbing,
//! and how subject tokens are found in the prompt.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mifo::config::{apply_overrides, parse_override};
use mifo::model::tokenizer::ClipTokenizer;
use mifo::model::StableDiffusion;
use mifo::synth::control::plan_tokens;
use mifo::synth::{self, parse_box, BoxSpec, SynthConfig, SynthRequest};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21")
}

fn model() -> StableDiffusion {
    let mut sd = StableDiffusion::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let mut tok = sd.tokenizer.clone();
    tok.add_tokens(&["<v0>".to_string(), "<v1>".to_string()])
        .unwrap();
    sd.tokenizer = tok;
    sd
}

fn rows(n: usize) -> Tensor {
    Tensor::zeros((n, 32), DType::F32, &Device::Cpu).unwrap()
}

fn req<'a>(sd: &'a StableDiffusion, prompt: &str, boxes: &[&str]) -> SynthRequest<'a> {
    SynthRequest {
        sd,
        placeholder_rows: Some(rows(2)),
        prompt: prompt.to_string(),
        boxes: boxes.iter().map(|b| parse_box(b).unwrap()).collect(),
        samples: 1,
        seed: 0,
        config: SynthConfig::default(),
    }
}

/// The error of `validate`, which must be a single line.
fn error_of(r: &SynthRequest) -> String {
    let e = synth::validate(r)
        .expect_err("expected a validation error")
        .to_string();
    assert!(!e.contains('\n'), "multi-line error: {e}");
    e
}

const PROMPT: &str = "a photo of <v0> and <v1> on the beach";

#[test]
fn valid_requests_and_overlap_warning() {
    let sd = model();
    let ok = req(&sd, PROMPT, &["<v0>=0,0,0.5,1", "<v1>=0.5,0,1,1"]);
    assert!(synth::validate(&ok).unwrap().is_empty());
    // A placeholder of the prompt that no box names is fine (just not box-controlled).
    let one = req(&sd, PROMPT, &["<v1>=0.5,0,1,1"]);
    assert!(synth::validate(&one).unwrap().is_empty());
    // Plain words as subjects on a plain model.
    let mut plain = req(
        &sd,
        "a dog and a cat on the grass",
        &["dog=0,0,0.5,1", "cat=0.5,0,1,1"],
    );
    plain.placeholder_rows = None;
    assert!(synth::validate(&plain).unwrap().is_empty());
    // Overlap of more than half of the smaller box → a warning, not an error.
    let w = synth::validate(&req(&sd, PROMPT, &["<v0>=0,0,0.6,1", "<v1>=0.2,0,1,1"])).unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("overlap") && w[0].contains("<v0>") && w[0].contains("<v1>"),
        "{w:?}"
    );
    // Exactly half is not more than half.
    let w = synth::validate(&req(&sd, PROMPT, &["<v0>=0,0,0.5,1", "<v1>=0.25,0,0.75,1"])).unwrap();
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn box_subject_must_occur_in_the_prompt() {
    let sd = model();
    // The prompt lacks the placeholder a box names.
    let e = error_of(&req(
        &sd,
        "a photo of <v0> on the beach",
        &["<v0>=0,0,0.5,1", "<v1>=0.5,0,1,1"],
    ));
    assert!(
        e.contains("<v1>") && e.contains("does not occur in the prompt"),
        "{e}"
    );
    // A plain word that is not there.
    let e = error_of(&req(&sd, PROMPT, &["dog=0,0,0.5,1"]));
    assert!(e.contains("`dog` does not occur"), "{e}");
    // A word that only occurs as part of another word is not a match.
    let e = error_of(&req(&sd, "a photo of hotdogs", &["dog=0,0,0.5,1"]));
    assert!(e.contains("does not occur"), "{e}");
}

#[test]
fn bad_boxes() {
    let sd = model();
    let mut r = req(&sd, PROMPT, &["<v0>=0,0,0.5,1"]);
    r.boxes[0] = BoxSpec {
        subject: "<v0>".into(),
        rect: [0.0, 0.0, 1.2, 1.0],
    };
    assert!(error_of(&r).contains("[0, 1]"));
    r.boxes[0].rect = [-0.1, 0.0, 0.5, 1.0];
    assert!(error_of(&r).contains("[0, 1]"));
    r.boxes[0].rect = [0.5, 0.0, 0.5, 1.0];
    assert!(error_of(&r).contains("x0 must be smaller than x1"));
    r.boxes[0].rect = [0.0, 0.8, 0.5, 0.2];
    assert!(error_of(&r).contains("y0 must be smaller than y1"));
    // The same checks when parsing, plus syntax.
    assert!(parse_box("<v0>=0,0,1.01,1")
        .unwrap_err()
        .to_string()
        .contains("[0, 1]"));
    assert!(parse_box("<v0>=0.7,0,0.3,1")
        .unwrap_err()
        .to_string()
        .contains("x0 must be smaller"));
    assert!(parse_box("<v0>=0,0.5,1,0.5")
        .unwrap_err()
        .to_string()
        .contains("y0 must be smaller"));
    for bad in [
        "<v0>:0,0,1,1",
        "<v0>=0,0,1",
        "<v0>=0;0;1;1",
        "<v0>=x,0,1,1",
        "<v0>=0,0,1,nan",
    ] {
        let e = parse_box(bad).expect_err(bad).to_string();
        assert!(
            e.contains("expected SUBJECT=x0,y0,x1,y1") || e.contains("[0, 1]"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn other_request_errors() {
    let sd = model();
    // A stop word cannot be a subject.
    let e = error_of(&req(&sd, PROMPT, &["the=0,0,0.5,1"]));
    assert!(e.contains("stop word"), "{e}");
    // Two boxes for one subject.
    let e = error_of(&req(&sd, PROMPT, &["<v0>=0,0,0.5,1", "<v0>=0.5,0,1,1"]));
    assert!(e.contains("two boxes"), "{e}");
    // A placeholder without an embedding row.
    let mut r = req(&sd, PROMPT, &["<v0>=0,0,0.5,1"]);
    r.placeholder_rows = Some(rows(1));
    let e = error_of(&r);
    assert!(
        e.contains("<v1>") && e.contains("without an embedding"),
        "{e}"
    );
    // Box control without boxes.
    let e = error_of(&req(&sd, PROMPT, &[]));
    assert!(e.contains("at least one --box"), "{e}");
    let mut r = req(&sd, PROMPT, &[]);
    r.config.box_control = false;
    assert!(synth::validate(&r).is_ok());
    // Zero samples; a layer prefix that matches nothing; unsupported eta.
    let mut r = req(&sd, PROMPT, &["<v0>=0,0,0.5,1"]);
    r.samples = 0;
    assert!(error_of(&r).contains("--samples"));
    let mut r = req(&sd, PROMPT, &["<v0>=0,0,0.5,1"]);
    r.config.loss_layers = vec!["up_blocks.9".into()];
    let e = error_of(&r);
    assert!(
        e.contains("synth.loss_layers") && e.contains("up_blocks.9"),
        "{e}"
    );
    r.config.loss_layers = vec!["up_blocks.1.attentions.0.transformer_blocks.0.attn2".into()];
    assert!(synth::validate(&r).is_ok());
    let mut r = req(&sd, PROMPT, &["<v0>=0,0,0.5,1"]);
    r.config.eta = 0.5;
    assert!(error_of(&r).contains("synth.eta"));
}

#[test]
fn set_overrides() {
    let base = SynthConfig::default();
    let set = |items: &[&str]| {
        let o: Vec<_> = items.iter().map(|s| parse_override(s).unwrap()).collect();
        apply_overrides(&base, "synth", &o)
    };
    let c = set(&[
        "synth.steps=20",
        "synth.guided_steps=4",
        "synth.guidance_scale=5",
        "synth.box_control=false",
        "synth.sa_control=false",
        "synth.ca_control=false",
        "synth.out_of_box=false",
        "synth.alpha_decay=false",
        "synth.latent_opt=false",
        "synth.refine=false",
        "synth.loss_layers=[\"mid_block\"]",
    ])
    .unwrap();
    assert_eq!((c.steps, c.guided_steps, c.guidance_scale), (20, 4, 5.0));
    assert!(!(c.box_control || c.sa_control || c.ca_control || c.out_of_box));
    assert!(!(c.alpha_decay || c.latent_opt || c.refine));
    assert_eq!(c.loss_layers, vec!["mid_block".to_string()]);
    let e = set(&["synth.nope=1"]).unwrap_err().to_string();
    assert!(
        e.contains("unknown key `synth.nope`") && e.contains("synth.guided_steps"),
        "{e}"
    );
    let e = set(&["synth.steps=many"]).unwrap_err().to_string();
    assert!(e.contains("expected an integer"), "{e}");
    // Presets differ only in the α schedule, the loss form and the joint early stop.
    let official = SynthConfig::preset("official").unwrap();
    let mut keys = mifo::config::changed_keys(&base, &official);
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "alpha_final",
            "alpha_index",
            "alpha_max",
            "alpha_min",
            "alpha_step_base",
            "joint_stop",
            "loss_form"
        ]
    );
    assert_eq!(
        (base.loss_form.as_str(), official.loss_form.as_str()),
        ("paper", "official")
    );
    let e = set(&["synth.loss_form=squared"])
        .unwrap()
        .check()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("synth.loss_form") && e.contains("official or paper"),
        "{e}"
    );
    assert_eq!(SynthConfig::preset("paper").unwrap(), base);
    // JSON round trip; keys missing from an older record take their defaults.
    let json = serde_json::to_string(&official).unwrap();
    assert_eq!(
        serde_json::from_str::<SynthConfig>(&json).unwrap(),
        official
    );
    let old: SynthConfig = serde_json::from_str(r#"{"steps": 7, "box_control": false}"#).unwrap();
    assert_eq!(
        old,
        SynthConfig {
            steps: 7,
            box_control: false,
            // Records from before the keys ran the released code's form, α by the step.
            loss_form: "official".into(),
            alpha_index: "step".into(),
            ..SynthConfig::default()
        }
    );
}

#[test]
fn subject_tokens_are_found_by_the_program() {
    let mut tok = ClipTokenizer::from_dir(&fixture().join("tokenizer")).unwrap();
    tok.add_tokens(&["<v0>".to_string(), "<v1>".to_string()])
        .unwrap();
    let plan = plan_tokens(&tok, PROMPT, &["<v0>".into(), "<v1>".into()]).unwrap();
    // SOT a photo of <v0> and <v1> on the beach EOS
    assert_eq!(plan.subjects[0].positions, vec![4]);
    assert_eq!(plan.subjects[1].positions, vec![6]);
    assert_eq!(plan.eos, 10);
    assert_eq!(plan.ids[10], tok.eos_id());
    assert_eq!(plan.stop_positions, vec![1, 3, 5, 7, 8]);
    // A multi-word subject, and a word that BPE splits into several tokens: all its tokens are
    // the subject's, the leading token is the last one.
    let plan = plan_tokens(
        &tok,
        "a teddy bear next to a xylophonist",
        &["teddy bear".into(), "xylophonist".into()],
    )
    .unwrap();
    assert_eq!(plan.subjects[0].positions, vec![2, 3]);
    assert_eq!(plan.subjects[0].leading, 3);
    let x = &plan.subjects[1].positions;
    assert!(
        x.len() >= 2,
        "xylophonist → {:?}",
        x.iter().map(|&p| &plan.tokens[p]).collect::<Vec<_>>()
    );
    assert_eq!(x[0], 7);
    assert_eq!(plan.subjects[1].leading, *x.last().unwrap());
    assert_eq!(plan.eos, x.last().unwrap() + 1);
    // Every occurrence of a subject counts; case does not matter.
    let plan = plan_tokens(
        &tok,
        "<V0> on the left, <v0> on the right",
        &["<v0>".into()],
    )
    .unwrap();
    assert_eq!(plan.subjects[0].positions, vec![1, 6]);
}
