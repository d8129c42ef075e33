//! mifo's AdamW and gradient norm against numbers computed independently: PyTorch's
//! `clip_grad_norm_` + `AdamW` update rule in plain float64 Python
//! (`tools/reference/optim_reference.py`, stored in `fixtures/reference/adamw_clip.json`): three
//! steps with a different learning rate each, the first one clipped.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use mifo::learn::optim::{AdamW, AdamWParams};
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference/adamw_clip.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn shape(f: &Value, name: &str) -> Vec<usize> {
    f["shapes"][name]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// Asserts `got` matches `want` element by element to a relative 1e-10 (both are float64; the
/// two sides round differently only in the last bits).
fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-10 * w.abs().max(1e-6),
            "{what}[{i}]: mifo {g:e}, reference {w:e}"
        );
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn adamw_with_clipping_matches_the_reference() {
    let f = fixture();
    let dev = Device::Cpu;
    let names = ["a", "b"];
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|&n| {
            let init = floats(&f["initial"][n]);
            let var = Var::from_tensor(
                &Tensor::from_vec(init, shape(&f, n), &dev)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            )
            .unwrap();
            (n.to_string(), var)
        })
        .collect();
    let max_norm = f["max_norm"].as_f64().unwrap();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1: f["beta1"].as_f64().unwrap(),
            beta2: f["beta2"].as_f64().unwrap(),
            eps: f["eps"].as_f64().unwrap(),
            weight_decay: f["weight_decay"].as_f64().unwrap(),
        },
    )
    .unwrap();
    let steps = f["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    let mut clipped = 0;
    for (k, step) in steps.iter().enumerate() {
        // loss = Σ var ⊙ G has gradient G with respect to var.
        let mut loss: Option<Tensor> = None;
        for (n, var) in &vars {
            let g =
                Tensor::from_vec(floats(&step["grads"][n.as_str()]), shape(&f, n), &dev).unwrap();
            let term = (var.as_tensor() * g).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                Some(l) => (l + term).unwrap(),
                None => term,
            });
        }
        let grads = loss.unwrap().backward().unwrap();
        let norm = opt.grad_norm(&grads).unwrap();
        let want_norm = step["grad_norm"].as_f64().unwrap();
        assert_close(&format!("step {} grad norm", k + 1), &[norm], &[want_norm]);
        // The learning loop's clip (src/learn: scale = max / (norm + 1e-6) above max).
        let scale = if norm > max_norm {
            clipped += 1;
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        assert_close(
            &format!("step {} clip coefficient", k + 1),
            &[scale],
            &[step["clip_coef"].as_f64().unwrap()],
        );
        opt.update(&grads, step["lr"].as_f64().unwrap(), scale)
            .unwrap();
        assert_eq!(opt.step, k as u64 + 1);
        for (n, var) in &vars {
            assert_close(
                &format!("step {} param {n}", k + 1),
                &values(var.as_tensor()),
                &floats(&step["params"][n.as_str()]),
            );
        }
        let state: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
        for n in names {
            for moment in ["m", "v"] {
                assert_close(
                    &format!("step {} {moment} of {n}", k + 1),
                    &values(&state[&format!("adam.{n}.{moment}")]),
                    &floats(&step[moment][n]),
                );
            }
        }
    }
    assert_eq!(clipped, 1, "the fixture's first step is the clipped one");
}
