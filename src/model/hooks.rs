//! Ready-made attention hooks.

use std::collections::BTreeMap;

use candle_core::{Tensor, D};

use super::attention::{AttentionHook, AttnCall, AttnKind};
use crate::error::{Error, Result};

/// Records, for cross-attention layers whose module path starts with one of `prefixes`, the
/// head-mean probabilities of chosen key columns: [B, q, J] per layer, on the autograd graph.
#[derive(Default)]
pub struct ColumnRecorder {
    prefixes: Vec<String>,
    columns: Vec<u32>,
    maps: BTreeMap<String, (Tensor, usize, usize)>,
    order: Vec<String>,
}

impl ColumnRecorder {
    /// Records `columns` (key positions) in the layers matching `prefixes`.
    pub fn new(prefixes: &[String], columns: &[usize]) -> Self {
        Self {
            prefixes: prefixes.to_vec(),
            columns: columns.iter().map(|&c| c as u32).collect(),
            ..Default::default()
        }
    }

    /// Layer paths recorded, in execution order.
    pub fn layers(&self) -> &[String] {
        &self.order
    }

    /// Head-mean map of column `j` (index into `columns`) of `layer`: [B, h, w].
    pub fn map(&self, layer: &str, j: usize) -> Result<Tensor> {
        let (cols, h, w) = self
            .maps
            .get(layer)
            .ok_or_else(|| Error::Input(format!("attention layer `{layer}` was not recorded")))?;
        let b = cols.dim(0)?;
        Ok(cols.narrow(2, j, 1)?.squeeze(2)?.reshape((b, *h, *w))?)
    }

    /// All columns of `layer` for batch item `b`: [J, h, w].
    pub fn maps_of(&self, layer: &str, b: usize) -> Result<Tensor> {
        let (cols, h, w) = self
            .maps
            .get(layer)
            .ok_or_else(|| Error::Input(format!("attention layer `{layer}` was not recorded")))?;
        let j = cols.dim(2)?;
        Ok(cols.get(b)?.t()?.reshape((j, *h, *w))?)
    }
}

impl AttentionHook for ColumnRecorder {
    fn wants(&mut self, call: &AttnCall) -> bool {
        self.may_read(call.kind, call.path)
    }

    fn may_read(&self, kind: AttnKind, path: &str) -> bool {
        kind == AttnKind::CrossAttn
            && !self.columns.is_empty()
            && self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        let idx = Tensor::new(self.columns.as_slice(), probs.device())?;
        let cols = probs.mean(1)?.index_select(&idx, D::Minus1)?; // [B, q, J]
        let path = call.path.to_string();
        if !self.maps.contains_key(&path) {
            self.order.push(path.clone());
        }
        self.maps.insert(path, (cols, call.height, call.width));
        Ok(())
    }
}
