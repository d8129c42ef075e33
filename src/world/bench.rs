//! The plan of `mifo world bench`: which scenes, which learning and synthesis configurations,
//! which boxes. The CLI runs the plan through the engine (every run stored and tagged) and the
//! oracle scores it.
//!
//! * Scenes: `--scenes N` two-object world scenes of seeds 1000, 1001, …, even ones differing
//!   only in colour, odd ones only in shape (the visually similar instances MIFO is about).
//! * Learning: `mifo` = the `paper` preset; `reward-only` = the same with
//!   `learn.penalty_steps=0`; with `--methods`, one variant per baseline learning method
//!   (`break-a-scene`, `ti-m`, `db-m`: `learn.method`, each from its own preset).
//! * Synthesis: per learned scene, two layouts — `swapped` (each instance where the other
//!   stood) and `moved` (both in new places side by side), boxes the size of each instance's own
//!   box — each one run of `--seeds` samples, for every row: `mifo` (the `paper` preset mapped
//!   to the world model, [`super::synth_config`]), `reward-only` (the same synthesis of the
//!   reward-only tokens), one row per other synthesis method on MIFO's tokens
//!   (`bounded-attention`, `plain`: `synth.method`), one row per synthesis ablation switch
//!   turned off, and, only when asked for, one row per baseline learning method (its tokens
//!   drawn by MIFO's synthesis).

use serde::Serialize;

use super::scene::{Attribute, SceneSpec};
use super::SceneFile;
use crate::learn::{LearnConfig, LearnMethod};
use crate::synth::SynthConfig;

/// First scene seed of the bench.
pub const FIRST_SCENE_SEED: u64 = 1000;

/// The bench's `i`-th scene.
pub fn scene(i: usize) -> SceneSpec {
    SceneSpec {
        seed: FIRST_SCENE_SEED + i as u64,
        objects: 2,
        differ: Some(if i.is_multiple_of(2) {
            Attribute::Colour
        } else {
            Attribute::Shape
        }),
        size: 64,
    }
}

/// A learning configuration of the bench.
#[derive(Clone, Debug)]
pub struct LearnVariant {
    /// Its name (`mifo`, `reward-only`, or a baseline learning method's).
    pub name: &'static str,
    /// The preset its runs record (their config's changes are shown against it).
    pub preset: &'static str,
    /// The config.
    pub config: LearnConfig,
}

/// The learning configurations, each from `config_of(method)` (the world mapping,
/// [`super::method_learn_config`], unless the bench is asked for the unmapped presets):
/// `mifo`, `reward-only` (MIFO without the penalty phase), then each baseline method.
pub fn learn_variants(config_of: &dyn Fn(LearnMethod) -> LearnConfig) -> Vec<LearnVariant> {
    let base = config_of(LearnMethod::Mifo);
    let mut variants = vec![
        LearnVariant {
            name: "mifo",
            preset: "paper",
            config: base.clone(),
        },
        LearnVariant {
            name: "reward-only",
            preset: "paper",
            config: LearnConfig {
                penalty_steps: 0,
                ..base
            },
        },
    ];
    for method in [LearnMethod::BreakAScene, LearnMethod::TiM, LearnMethod::DbM] {
        variants.push(LearnVariant {
            name: method.name(),
            preset: method.name(),
            config: config_of(method),
        });
    }
    variants
}

/// One row of the bench table: a synthesis configuration on one learning configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The row's name (also the last part of its runs' tag).
    pub name: &'static str,
    /// The learning variant whose tokens it draws (`None`: it learns nothing and draws the
    /// scene's own words, the [`WORDS_ROW`]).
    pub learn: Option<&'static str>,
    /// The `--set` key the row changes from the paper preset (empty for none).
    pub change: &'static str,
    /// The synthesis config.
    #[serde(skip)]
    pub config: SynthConfig,
}

/// The reference row: no learning; the plain model draws the scene's caption with the boxes on
/// its noun phrases, the same synthesis as `mifo`. What the tokens would reach if they were the
/// words themselves.
pub const WORDS_ROW: &str = "words";

/// Names of the rows that are synthesis methods (`mifo world bench --methods`).
pub const METHOD_ROWS: &[&str] = &["mifo", "bounded-attention", "plain"];

/// Names of the rows that are baseline learning methods (`mifo world bench --methods`; not in
/// the default set of rows, as each learns every scene once more).
pub const LEARN_METHOD_ROWS: &[&str] = &["break-a-scene", "ti-m", "db-m"];

/// Every row, MIFO first, each starting from `base` (the world mapping of the paper preset,
/// [`super::synth_config`], unless the bench is asked for the unmapped preset).
pub fn rows(base: &SynthConfig) -> Vec<Row> {
    let paper = base.clone();
    let off = |name: &'static str, change: &'static str, f: fn(&mut SynthConfig)| {
        let mut config = paper.clone();
        f(&mut config);
        Row {
            name,
            learn: Some("mifo"),
            change,
            config,
        }
    };
    vec![
        Row {
            name: "mifo",
            learn: Some("mifo"),
            change: "",
            config: paper.clone(),
        },
        Row {
            name: "reward-only",
            learn: Some("reward-only"),
            change: "learn.penalty_steps=0",
            config: paper.clone(),
        },
        off("bounded-attention", "synth.method=bounded-attention", |c| {
            c.method = "bounded-attention".into()
        }),
        off("plain", "synth.method=plain", |c| c.method = "plain".into()),
        off("box-control-off", "synth.box_control=false", |c| {
            c.box_control = false
        }),
        off("sa-control-off", "synth.sa_control=false", |c| {
            c.sa_control = false
        }),
        off("ca-control-off", "synth.ca_control=false", |c| {
            c.ca_control = false
        }),
        off("out-of-box-off", "synth.out_of_box=false", |c| {
            c.out_of_box = false
        }),
        off("alpha-decay-off", "synth.alpha_decay=false", |c| {
            c.alpha_decay = false
        }),
        off("latent-opt-off", "synth.latent_opt=false", |c| {
            c.latent_opt = false
        }),
        off("refine-off", "synth.refine=false", |c| c.refine = false),
        Row {
            name: WORDS_ROW,
            learn: None,
            change: "the scene's caption, boxes on its words",
            config: paper.clone(),
        },
        Row {
            name: "break-a-scene",
            learn: Some("break-a-scene"),
            change: "learn.method=break-a-scene",
            config: paper.clone(),
        },
        Row {
            name: "ti-m",
            learn: Some("ti-m"),
            change: "learn.method=ti-m",
            config: paper.clone(),
        },
        Row {
            name: "db-m",
            learn: Some("db-m"),
            change: "learn.method=db-m",
            config: paper,
        },
    ]
}

/// Where the boxes go. Each instance's box keeps the size of the instance's box in the
/// learning scene (the world's identity is colour and shape, and a learned token draws its
/// instance at the size it saw), so a box never asks for a resize that `outside` would count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Each instance centred where the other one stood.
    Swapped,
    /// Both in new places, side by side in the middle band (centres at x = 0.26 and 0.74).
    Moved,
}

/// Both layouts.
pub const LAYOUTS: [Layout; 2] = [Layout::Swapped, Layout::Moved];

impl Layout {
    /// `swapped` / `moved`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Swapped => "swapped",
            Layout::Moved => "moved",
        }
    }

    /// The `--box` arguments for a two-object scene: on the placeholders `<v0>`, `<v1>`, or with
    /// `words` on the objects' own noun phrases (`red circle`), for the [`WORDS_ROW`].
    pub fn boxes(self, scene: &SceneFile, words: bool) -> Vec<String> {
        let fmt = |r: [f32; 4]| format!("{:.4},{:.4},{:.4},{:.4}", r[0], r[1], r[2], r[3]);
        let (a, b) = (
            scene.objects[0].box_fractions,
            scene.objects[1].box_fractions,
        );
        let centre = |r: [f32; 4]| [(r[0] + r[2]) / 2.0, (r[1] + r[3]) / 2.0];
        let (to_a, to_b) = match self {
            Layout::Swapped => (centre(b), centre(a)),
            Layout::Moved => ([0.26, 0.5], [0.74, 0.5]),
        };
        let subject = |k: usize| {
            let o = &scene.objects[k];
            if words {
                o.object.noun_phrase()
            } else {
                o.token.clone()
            }
        };
        vec![
            format!("{}={}", subject(0), fmt(recentred(a, to_a))),
            format!("{}={}", subject(1), fmt(recentred(b, to_b))),
        ]
    }
}

/// `rect` (x0, y0, x1, y1 fractions) moved so that its centre is `centre`, then shifted back
/// inside the unit square if it stuck out (its size is kept).
pub fn recentred(rect: [f32; 4], centre: [f32; 2]) -> [f32; 4] {
    let mut out = [0f32; 4];
    for axis in 0..2 {
        let size = rect[axis + 2] - rect[axis];
        let lo = (centre[axis] - size / 2.0).clamp(0.0, 1.0 - size);
        out[axis] = lo;
        out[axis + 2] = lo + size;
    }
    out
}

/// Targets for the `mifo` row (from the world issue).
pub const TARGETS: &str = "targets for mifo: identity ≥ 80%, leak ≤ 10%, outside ≤ 10%; leak below reward-only, outside below box-control-off";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ablation_row_turns_exactly_its_switch_off() {
        let rows = rows(&super::super::synth_config());
        let paper = serde_json::to_value(super::super::synth_config()).unwrap();
        for row in &rows {
            let v = serde_json::to_value(&row.config).unwrap();
            let changed: Vec<&String> = v
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, val)| paper[k.as_str()] != **val)
                .map(|(k, _)| k)
                .collect();
            match row.change.strip_prefix("synth.") {
                Some(key) => {
                    let key = key.split('=').next().unwrap();
                    assert_eq!(changed, [key], "row {}", row.name);
                }
                None => assert!(changed.is_empty(), "row {}: {changed:?}", row.name),
            }
        }
        let variants = learn_variants(&crate::world::method_learn_config);
        let learns: Vec<&str> = variants.iter().map(|l| l.name).collect();
        assert!(rows
            .iter()
            .all(|r| r.learn.map_or(r.name == WORDS_ROW, |l| learns.contains(&l))));
        assert_eq!(
            variants[1].config.penalty_steps, 0,
            "reward-only has no penalty phase"
        );
    }

    /// Each learning-method row draws its own method's tokens, learned from that method's
    /// preset; Break-a-Scene's world layers are the level its SD 2.1 layers are: the coarsest
    /// down and up blocks with cross-attention (the middle block left out), read from each
    /// model's `unet/config.json`.
    #[test]
    fn learning_method_rows_learn_with_their_method_on_the_mapped_layers() {
        let variants = learn_variants(&crate::world::method_learn_config);
        for name in LEARN_METHOD_ROWS {
            let row = rows(&crate::world::synth_config())
                .into_iter()
                .find(|r| r.name == *name)
                .unwrap();
            assert_eq!(row.learn, Some(*name));
            let v = variants.iter().find(|v| v.name == *name).unwrap();
            assert_eq!(v.config.method, *name);
            assert_eq!(v.preset, *name);
            v.config.validate().unwrap();
        }
        let coarsest = |model: &str| -> Vec<String> {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(model)
                .join("unet/config.json");
            let c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            let down = c["down_block_types"].as_array().unwrap();
            let i = down
                .iter()
                .rposition(|t| t.as_str().unwrap().starts_with("CrossAttn"))
                .unwrap();
            let up = c["up_block_types"].as_array().unwrap();
            let j = up.len() - 1 - i;
            assert!(up[j].as_str().unwrap().starts_with("CrossAttn"));
            vec![format!("down_blocks.{i}"), format!("up_blocks.{j}")]
        };
        let bas = crate::world::method_learn_config(LearnMethod::BreakAScene);
        assert_eq!(bas.attn_layers, coarsest("world-sd"));
        assert_eq!(
            LearnConfig::break_a_scene().attn_layers,
            coarsest("tiny-sd21")
        );
    }

    #[test]
    fn swapped_boxes_exchange_the_instances_places_and_keep_their_sizes() {
        for i in 0..6 {
            let file = SceneFile::of(&scene(i).draw().unwrap());
            for layout in LAYOUTS {
                let b = layout.boxes(&file, false);
                assert!(b[0].starts_with("<v0>=") && b[1].starts_with("<v1>="));
                let parsed: Vec<crate::synth::BoxSpec> = b
                    .iter()
                    .map(|s| crate::synth::parse_box(s).unwrap())
                    .collect();
                for (k, other) in [(0usize, 1usize), (1, 0)] {
                    let (got, own) = (parsed[k].rect, file.objects[k].box_fractions);
                    assert!(got.iter().all(|v| (0.0..=1.0).contains(v)), "{got:?}");
                    for axis in 0..2 {
                        let size = own[axis + 2] - own[axis];
                        assert!((got[axis + 2] - got[axis] - size).abs() < 1e-3);
                        if layout == Layout::Swapped {
                            // Centred on the other instance, unless the box had to be
                            // shifted back inside the image.
                            let o = file.objects[other].box_fractions;
                            let want =
                                ((o[axis] + o[axis + 2]) / 2.0 - size / 2.0).clamp(0.0, 1.0 - size);
                            assert!((got[axis] - want).abs() < 1e-3, "scene {i} <v{k}>");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn recentring_keeps_the_size_and_stays_inside() {
        let r = recentred([0.1, 0.2, 0.4, 0.6], [0.9, 0.5]);
        assert!(
            (r[0] - 0.7).abs() < 1e-6 && (r[2] - 1.0).abs() < 1e-6,
            "{r:?}"
        );
        assert!(
            (r[1] - 0.3).abs() < 1e-6 && (r[3] - 0.7).abs() < 1e-6,
            "{r:?}"
        );
    }
}
