//! AdamW with its state in plain tensors, so a checkpoint can hold it and a resumed run continues
//! bit for bit (PyTorch's `torch.optim.AdamW` update rule).

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over a list of named variables.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Number of updates applied so far.
    pub step: u64,
    params: AdamWParams,
}

impl AdamW {
    /// A fresh optimiser (zero moments).
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let first = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            vars,
            first,
            second,
            step: 0,
            params,
        })
    }

    /// Bytes held by the optimised variables themselves.
    pub fn var_bytes(&self) -> u64 {
        self.vars
            .iter()
            .map(|(_, v)| tensor_bytes(v.as_tensor()))
            .sum()
    }

    /// Bytes held by the optimiser's state (the two moments of every variable).
    pub fn state_bytes(&self) -> u64 {
        self.first
            .iter()
            .chain(&self.second)
            .map(tensor_bytes)
            .sum()
    }

    /// The optimised variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Global L2 norm of the gradients (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &candle_core::backprop::GradStore) -> Result<f64> {
        let mut total = 0f64;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                total += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`; gradients are scaled by `grad_scale` first (clipping).
    pub fn update(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let m = ((&self.first[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.second[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
            let upd = ((&m / bc1)? / denom)?;
            var.set(&(decayed - (upd * lr)?)?.detach())?;
            self.first[i] = m.detach();
            self.second[i] = v.detach();
        }
        Ok(())
    }

    /// The moments as named tensors (`<name>.m`, `<name>.v`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("adam.{name}.m"), self.first[i].clone()));
            out.push((format!("adam.{name}.v"), self.second[i].clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::Input(format!("checkpoint lacks `{k}`")))
            };
            self.first[i] = get(format!("adam.{name}.m"))?;
            self.second[i] = get(format!("adam.{name}.v"))?;
        }
        self.step = step;
        Ok(())
    }
}

/// The squared L2 norm of the gradient an embedding *table* would receive from per-position
/// gradients: `grads` [B·L, hidden] (row-major, one row per prompt position) with each
/// position's token id in `ids`; positions of the same id add up to that id's row, and ids at
/// or above `base_vocab` (the placeholders, which are trained variables of their own) are left
/// out. The released code clips over the whole table, so `learn.grad_clip_word_rows` adds this
/// to the trained variables' norm.
pub fn table_rows_norm_sq(grads: &[f32], ids: &[u32], hidden: usize, base_vocab: u32) -> f64 {
    let mut rows: HashMap<u32, Vec<f64>> = HashMap::new();
    for (pos, &id) in ids.iter().enumerate() {
        if id >= base_vocab {
            continue;
        }
        let row = rows.entry(id).or_insert_with(|| vec![0.0; hidden]);
        for (acc, &g) in row.iter_mut().zip(&grads[pos * hidden..(pos + 1) * hidden]) {
            *acc += f64::from(g);
        }
    }
    rows.values().flatten().map(|v| v * v).sum()
}

/// Bytes held by `t`.
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

#[cfg(test)]
mod tests {
    use super::table_rows_norm_sq;

    #[test]
    fn positions_of_one_word_add_up_before_the_norm_and_placeholders_are_left_out() {
        // Four positions, hidden 2: ids 5, 9, 5, 100 (a placeholder of a 100-word vocabulary).
        let grads = [1.0, 2.0, 3.0, 0.0, 1.0, -2.0, 7.0, 7.0];
        let ids = [5, 9, 5, 100];
        // Row 5 gets (1 + 1, 2 − 2) = (2, 0), row 9 gets (3, 0): 4 + 9.
        assert_eq!(table_rows_norm_sq(&grads, &ids, 2, 100), 13.0);
        // Counting each position on its own would give 1 + 4 + 9 + 1 + 4 = 19.
        assert_eq!(table_rows_norm_sq(&grads, &ids, 2, 101), 13.0 + 98.0);
    }
}
