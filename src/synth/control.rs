//! Box control inside attention (notes §4.3–4.4): which prompt tokens belong to which subject,
//! the additive logit masks of every attention layer, the loss terms of the latent
//! optimisation, and what the normal passes record (leak, maps for mask refinement, final maps).
//!
//! # Tokens
//! The prompt is encoded with [`ClipTokenizer::encode_detailed`]. A box's subject (a placeholder
//! such as `<v0>`, or word(s) such as `dog` / `teddy bear`) is encoded the same way and its word
//! sequence is searched in the prompt's words; every token of every occurrence is a *subject
//! token* (a word may span several BPE tokens; placeholders are single tokens). The subject's
//! *leading token* (used for mask refinement) is its last token — the released code picks the
//! last noun by POS tag, and without a tagger the last token is the head noun of an English
//! noun phrase.
//!
//! # Stop words (the released code's "filter tokens")
//! The released code POS-tags the prompt and filters tokens tagged CC, CD, DT, EX, IN, LS, MD,
//! PDT, POS, PRP, PRP$, RP, TO, UH, WDT, WP, WRB, plus left/right/top/bottom. We have no tagger,
//! so a word is a stop word when it is in [`STOP_WORDS`] (articles and determiners,
//! conjunctions, prepositions, pronouns, modals, wh-words, `there`, `'s`, number words) or is
//! made of digits only. Stop words
//! * are never subjects: a box naming only stop words is an input error;
//! * are hidden from every pixel in the conditional cross-attention (as the released code does
//!   with its filter tokens), unless `hide_stop_words = false` or the word is part of a subject.
//!
//! The start token, ordinary words (`photo`, `beach`), and padding are never masked. The end
//! token (EOS, the first position after the prompt) is hidden from background pixels in the
//! normal passes.
//!
//! # Masks (added to the logits before the softmax; masked entries get the dtype's minimum)
//! * Cross-attention, conditional half only: subject tokens (and stop words) are hidden from all
//!   pixels, then each subject's tokens are re-allowed inside its region (its box before
//!   `guided_steps`, its refined mask after); in the optimisation passes also in the background.
//!   In the normal passes EOS is hidden from background pixels.
//! * Self-attention, both halves: a query inside subject i's region sees only keys of region i
//!   and of the background (a query in several regions sees their union and the background);
//!   background queries see everything.
//!
//! # Loss (optimisation passes, conditional half, `loss_layers`, always the boxes)
//! Per subject s and layer: CA: FG = Σ_heads Σ_{p∈box_s} Σ_{k∈tok_s ∪ EOS} A, BG = the same over
//! background pixels (pixels in no box). SA: FG = Σ_heads Σ_{q∈box_s} Σ_{k∈box_s} A, BG = the same
//! over background queries. FG and BG are averaged over the layers of each kind, and
//! term = (1 − FG/(FG + BG))² + α·log(1 + BG); L = λ_CA·Σ_s term_CA + λ_SA·Σ_s term_SA.
//! That is the released code's form (`synth.loss_form = official`). The paper's form
//! (`paper`, Eqs. 6–7 and 15) takes squared L2 norms of the head-mean map instead of sums,
//! BG over every pixel outside the subject's own box (1 − M_s, other boxes included), and
//! L = Σ_s (λ_CA·term_CA,s + λ_SA·term_SA,s)².
//!
//! # Leak
//! `leak/<subject>` at a step: for each cross-attention layer of `loss_layers` in the normal
//! pass (conditional half), the head-mean attention of the subject's tokens summed over tokens
//! gives a map; the leak of that layer is the map's mass outside the subject's **box** divided by
//! its total mass; the metric is the mean over those layers. The box (not the refined mask) is the
//! reference so that runs with and without box control are comparable.
//!
//! The map is read from the attention the layer would have produced **without** the box bias
//! (the softmax of the same forward's logits before the mask is added,
//! [`AttentionHook::unbiased_probs`]): after the bias a subject's tokens are hidden outside its
//! region, so a leak read there would be 0 by construction. What the metric shows is where the
//! model, at the current latents, wants to put each subject — the latent optimisation and the
//! masks of earlier layers and steps move it, the mask of the layer itself does not.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::boxes::{box_mask, resize_mask, BoxSpec};
use super::config::{LossForm, SynthConfig, SynthMethod};
use crate::error::{Error, Result};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{AttentionHook, AttnCall, AttnKind};

/// Words that are never subjects and (with `hide_stop_words`) are hidden from all pixels.
#[rustfmt::skip]
pub const STOP_WORDS: &[&str] = &[
    // determiners / articles (DT, PDT, WDT)
    "a", "an", "the", "this", "that", "these", "those", "some", "any", "each", "every", "all",
    "both", "either", "neither", "no", "another", "such", "half",
    // conjunctions (CC)
    "and", "or", "but", "nor", "yet", "plus", "&",
    // prepositions / subordinators (IN), plus the released code's forced IN words
    "of", "in", "on", "at", "by", "for", "with", "without", "from", "into", "onto", "upon",
    "over", "under", "above", "below", "behind", "beside", "besides", "between", "among",
    "amongst", "near", "around", "through", "across", "along", "against", "toward", "towards",
    "within", "about", "after", "before", "during", "inside", "outside", "beneath", "underneath",
    "beyond", "like", "unlike", "than", "as", "if", "while", "because", "since", "until", "via",
    "per", "amid", "left", "right", "top", "bottom",
    // TO, EX, POS, RP, UH
    "to", "there", "'s", "'", "up", "down", "off", "out", "away", "oh",
    // pronouns (PRP, PRP$, WP, WP$)
    "i", "me", "my", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers",
    "it", "its", "we", "us", "our", "ours", "they", "them", "their", "theirs", "itself",
    "himself", "herself", "themselves", "who", "whom", "whose", "what", "which",
    // modals (MD)
    "can", "could", "may", "might", "must", "shall", "should", "will", "would",
    // wh-adverbs (WRB)
    "where", "when", "why", "how",
    // number words (CD)
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "dozen", "hundred", "thousand",
];

/// Whether a prompt word (as the tokenizer split it) is a stop word.
pub fn is_stop_word(word: &str) -> bool {
    let w = word.trim().to_lowercase();
    (!w.is_empty() && w.chars().all(|c| c.is_ascii_digit())) || STOP_WORDS.contains(&w.as_str())
}

/// A box subject's tokens in the encoded prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectTokens {
    /// The subject as named in the box.
    pub name: String,
    /// Positions in the 77-token sequence (SOT = 0), ascending.
    pub positions: Vec<usize>,
    /// The leading token's position (the subject's last token).
    pub leading: usize,
}

/// Where everything is in the encoded prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenPlan {
    /// Token ids, `max_len` of them.
    pub ids: Vec<u32>,
    /// Token texts per position.
    pub tokens: Vec<String>,
    /// One entry per box, in box order.
    pub subjects: Vec<SubjectTokens>,
    /// Position of the end-of-text token.
    pub eos: usize,
    /// Positions of stop words that belong to no subject.
    pub stop_positions: Vec<usize>,
}

/// Finds the subject tokens of each box subject, the EOS position and the stop-word positions.
/// Errors (one line each): a subject that does not occur in the prompt, occurs only past the
/// token limit, consists only of stop words, is named by two boxes, or shares tokens with
/// another subject.
pub fn plan_tokens(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    subjects: &[String],
) -> Result<TokenPlan> {
    let enc = tokenizer.encode_detailed(prompt)?;
    let n_content = enc.word_of.iter().filter(|w| w.is_some()).count();
    let eos = n_content + 1;
    let mut out = Vec::with_capacity(subjects.len());
    let mut owner: HashMap<usize, usize> = HashMap::new();
    for (si, name) in subjects.iter().enumerate() {
        if subjects[..si].iter().any(|o| o.trim() == name.trim()) {
            return Err(Error::Input(format!(
                "two boxes name the subject `{name}`; give each subject one box"
            )));
        }
        let words = tokenizer.encode_detailed(name)?.words;
        if words.is_empty() {
            return Err(Error::Input(format!("box subject `{name}` is empty")));
        }
        if words.iter().all(|w| is_stop_word(w)) {
            return Err(Error::Input(format!(
                "box subject `{name}` is a stop word (a, the, of, and, …); name a noun or a placeholder"
            )));
        }
        let m = words.len();
        let mut word_idx = Vec::new();
        if enc.words.len() >= m {
            for start in 0..=enc.words.len() - m {
                if enc.words[start..start + m] == words[..] {
                    word_idx.extend(start..start + m);
                }
            }
        }
        if word_idx.is_empty() {
            return Err(Error::Input(format!(
                "box subject `{name}` does not occur in the prompt \"{prompt}\""
            )));
        }
        let positions: Vec<usize> = enc
            .word_of
            .iter()
            .enumerate()
            .filter_map(|(p, w)| w.filter(|w| word_idx.contains(w)).map(|_| p))
            .collect();
        let Some(&leading) = positions.last() else {
            return Err(Error::Input(format!(
                "box subject `{name}` lies beyond the text encoder's {}-token limit",
                tokenizer.max_len() - 2
            )));
        };
        for &p in &positions {
            if let Some(&other) = owner.get(&p) {
                return Err(Error::Input(format!(
                    "box subjects `{}` and `{name}` share the prompt token `{}`",
                    subjects[other], enc.tokens[p]
                )));
            }
            owner.insert(p, si);
        }
        out.push(SubjectTokens {
            name: name.clone(),
            positions,
            leading,
        });
    }
    let stop_positions = enc
        .word_of
        .iter()
        .enumerate()
        .filter_map(|(p, w)| {
            let w = (*w)?;
            (is_stop_word(&enc.words[w]) && !owner.contains_key(&p)).then_some(p)
        })
        .collect();
    Ok(TokenPlan {
        ids: enc.ids,
        tokens: enc.tokens,
        subjects: out,
        eos,
        stop_positions,
    })
}

/// Whether a module path lies under one of the prefixes (whole dotted components).
pub fn path_matches(path: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('.');
        path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'.'))
    })
}

/// Which kind of forward pass the hook is serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// A latent-optimisation pass on the conditional half only (batch 1): subject tokens are
    /// also visible to the background, EOS is not masked, loss terms are collected.
    Guidance,
    /// A denoising pass on `[uncond, cond]`: EOS hidden from the background; leak and maps
    /// are recorded.
    Normal,
}

/// The regions used by the masks: the boxes, or refined masks at one resolution.
#[derive(Clone, Debug, PartialEq)]
pub enum Regions {
    /// Each subject's box.
    Boxes,
    /// Refined masks, one per subject, row-major at `(h, w)`.
    Masks {
        /// Resolution of the masks.
        size: (usize, usize),
        /// One mask per subject.
        masks: Vec<Vec<bool>>,
    },
}

/// Per-pass statistics of the normal pass.
#[derive(Clone, Debug, Default)]
pub struct PassStats {
    /// Per subject, the leak of each loss layer seen in this pass.
    pub leak: Vec<Vec<f64>>,
    /// Per subject, the sum over cluster layers of the head-mean map of its tokens (when
    /// capturing), at `map_size`.
    pub maps: Vec<Vec<f64>>,
    /// Number of cluster layers summed into `maps`.
    pub map_layers: usize,
    /// Resolution of `maps`.
    pub map_size: Option<(usize, usize)>,
}

/// Running sums of the cluster layers' maps over all normal passes so far, kept on the model's
/// device (they reach the host only when a refinement reads their means).
#[derive(Clone, Debug, Default)]
pub struct MapAccumulator {
    /// Resolution of the cluster layers.
    pub size: Option<(usize, usize)>,
    /// Σ head-mean self-attention maps, [n, n] f32.
    self_sum: Option<Tensor>,
    /// Number of self maps summed.
    pub self_count: usize,
    /// Σ head-mean cross-attention at each subject's leading token, [n, subjects] f32.
    cross_sum: Option<Tensor>,
    /// Number of cross maps summed.
    pub cross_count: usize,
}

impl MapAccumulator {
    fn add(sum: &mut Option<Tensor>, map: Tensor) -> Result<()> {
        *sum = Some(match sum.take() {
            Some(s) => (s + map)?,
            None => map,
        });
        Ok(())
    }

    /// The running means on the host as f32 (self `n × n`, cross `n × subjects`, row-major),
    /// if both kinds were seen.
    pub fn means(&self) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (Some(s), Some(c)) = (&self.self_sum, &self.cross_sum) else {
            return Ok(None);
        };
        let host = |t: &Tensor, count: usize| -> Result<Vec<f32>> {
            Ok((t / count.max(1) as f64)?
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1()?)
        };
        Ok(Some((
            host(s, self.self_count)?,
            host(c, self.cross_count)?,
        )))
    }
}

/// The attention hook of one synthesis run.
pub struct ControlHook<'a> {
    config: &'a SynthConfig,
    plan: &'a TokenPlan,
    boxes: &'a [BoxSpec],
    device: Device,
    mask_value: f32,
    /// Whether masks are applied (box control on).
    pub control: bool,
    /// Whether the normal passes accumulate maps for refinement.
    pub accumulate: bool,
    /// Whether the normal pass records the final per-subject maps.
    pub capture_maps: bool,
    /// Whether the normal pass records leak.
    pub measure_leak: bool,
    pass: Pass,
    regions: Regions,
    bias_cache: HashMap<(AttnKind, usize, usize, Pass), Tensor>,
    ca_terms: Vec<(Tensor, Tensor)>,
    sa_terms: Vec<(Tensor, Tensor)>,
    /// Statistics of the latest normal pass.
    pub stats: PassStats,
    /// Running maps for refinement.
    pub maps: MapAccumulator,
    /// Per loss layer of the current normal pass, [2, subjects] on the device: attention mass
    /// outside each subject's box and in all (read by [`ControlHook::finish_pass`]).
    pending_leak: Vec<Tensor>,
    /// Column selectors [key_len, subjects] (f32 0/1): all tokens of each subject, and its
    /// leading token.
    selectors: HashMap<usize, (Tensor, Tensor)>,
    /// Each subject's box at a resolution, [n, subjects] f32 0/1.
    box_cache: HashMap<(usize, usize), Tensor>,
}

impl<'a> ControlHook<'a> {
    /// A hook for `plan` / `boxes` under `config`; `mask_value` is the logit added to masked
    /// entries (the model dtype's minimum).
    pub fn new(
        config: &'a SynthConfig,
        plan: &'a TokenPlan,
        boxes: &'a [BoxSpec],
        device: &Device,
        dtype: DType,
    ) -> Self {
        let mask_value = match dtype {
            DType::F16 => -65504.0,
            DType::BF16 => -3.0e38,
            _ => f32::MIN,
        };
        Self {
            config,
            plan,
            boxes,
            device: device.clone(),
            mask_value,
            control: config.box_control,
            accumulate: config.box_control && config.refine,
            capture_maps: false,
            measure_leak: config.attn_metrics,
            pass: Pass::Normal,
            regions: Regions::Boxes,
            bias_cache: HashMap::new(),
            ca_terms: Vec::new(),
            sa_terms: Vec::new(),
            stats: PassStats::default(),
            maps: MapAccumulator::default(),
            pending_leak: Vec::new(),
            selectors: HashMap::new(),
            box_cache: HashMap::new(),
        }
    }

    /// Ends a normal pass: brings its leak measurements to the host in one transfer and
    /// appends them to [`PassStats::leak`].
    pub fn finish_pass(&mut self) -> Result<()> {
        if self.pending_leak.is_empty() {
            return Ok(());
        }
        let s = self.subjects();
        let all: Vec<f32> = Tensor::stack(&self.pending_leak, 0)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        self.pending_leak.clear();
        for layer in all.chunks(2 * s) {
            for si in 0..s {
                let (outside, total) = (layer[si] as f64, layer[s + si] as f64);
                let leak = if total > 0.0 { outside / total } else { 0.0 };
                self.stats.leak[si].push(leak);
            }
        }
        Ok(())
    }

    /// The selectors of [`ControlHook::selectors`] for a key length.
    fn selectors(&mut self, k: usize) -> Result<(Tensor, Tensor)> {
        if let Some(t) = self.selectors.get(&k) {
            return Ok(t.clone());
        }
        let s = self.subjects();
        let mut tokens = vec![0f32; k * s];
        let mut leading = vec![0f32; k * s];
        for (si, subject) in self.plan.subjects.iter().enumerate() {
            for &c in subject.positions.iter().filter(|&&c| c < k) {
                tokens[c * s + si] = 1.0;
            }
            if subject.leading < k {
                leading[subject.leading * s + si] = 1.0;
            }
        }
        let t = (
            Tensor::from_vec(tokens, (k, s), &self.device)?,
            Tensor::from_vec(leading, (k, s), &self.device)?,
        );
        self.selectors.insert(k, t.clone());
        Ok(t)
    }

    /// Each subject's box at (h, w) as [h·w, subjects] f32 0/1 on the device.
    fn box_tensor(&mut self, h: usize, w: usize) -> Result<Tensor> {
        if let Some(t) = self.box_cache.get(&(h, w)) {
            return Ok(t.clone());
        }
        let boxes = self.box_masks(h, w);
        let s = boxes.len();
        let mut data = vec![0f32; h * w * s];
        for (si, b) in boxes.iter().enumerate() {
            for (p, &on) in b.iter().enumerate() {
                data[p * s + si] = f32::from(u8::from(on));
            }
        }
        let t = Tensor::from_vec(data, (h * w, s), &self.device)?;
        self.box_cache.insert((h, w), t.clone());
        Ok(t)
    }

    /// Starts a pass: clears the per-pass records.
    pub fn begin(&mut self, pass: Pass) {
        self.pass = pass;
        self.ca_terms.clear();
        self.sa_terms.clear();
        let s = self.plan.subjects.len();
        self.stats = PassStats {
            leak: vec![Vec::new(); s],
            maps: Vec::new(),
            map_layers: 0,
            map_size: None,
        };
        self.pending_leak.clear();
    }

    /// Replaces the regions (after a refinement) and drops the cached masks.
    pub fn set_regions(&mut self, regions: Regions) {
        self.regions = regions;
        self.bias_cache.clear();
    }

    /// The current regions.
    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    fn subjects(&self) -> usize {
        self.plan.subjects.len()
    }

    /// Each subject's region at `(h, w)`.
    pub fn region_masks(&self, h: usize, w: usize) -> Vec<Vec<bool>> {
        match &self.regions {
            Regions::Boxes => self.box_masks(h, w),
            Regions::Masks { size, masks } => masks
                .iter()
                .map(|m| resize_mask(m, *size, (h, w)))
                .collect(),
        }
    }

    /// Each subject's box at `(h, w)`.
    pub fn box_masks(&self, h: usize, w: usize) -> Vec<Vec<bool>> {
        self.boxes.iter().map(|b| box_mask(&b.rect, h, w)).collect()
    }

    fn background(regions: &[Vec<bool>], n: usize) -> Vec<bool> {
        (0..n).map(|p| !regions.iter().any(|r| r[p])).collect()
    }

    /// Self-attention mask [1, 1, n, n] (both halves).
    fn self_bias(&self, h: usize, w: usize) -> Result<Tensor> {
        let n = h * w;
        let regions = self.region_masks(h, w);
        let bg = Self::background(&regions, n);
        let mut data = vec![0f32; n * n];
        for q in 0..n {
            if bg[q] {
                continue;
            }
            let row = &mut data[q * n..(q + 1) * n];
            for (k, v) in row.iter_mut().enumerate() {
                let visible = bg[k] || regions.iter().any(|r| r[q] && r[k]);
                if !visible {
                    *v = self.mask_value;
                }
            }
        }
        Ok(Tensor::from_vec(data, (1, 1, n, n), &self.device)?)
    }

    /// Cross-attention mask: [2, 1, n, L] (zeros for the unconditional half) in the normal
    /// pass, [1, 1, n, L] in the guidance pass.
    fn cross_bias(&self, h: usize, w: usize, key_len: usize, pass: Pass) -> Result<Tensor> {
        let n = h * w;
        let regions = self.region_masks(h, w);
        let bg = Self::background(&regions, n);
        let mut cond = vec![0f32; n * key_len];
        let mut hidden_cols: Vec<usize> = self
            .plan
            .subjects
            .iter()
            .flat_map(|s| s.positions.iter().copied())
            .collect();
        if self.config.hide_stop_words {
            hidden_cols.extend(&self.plan.stop_positions);
        }
        for p in 0..n {
            let row = &mut cond[p * key_len..(p + 1) * key_len];
            for &c in &hidden_cols {
                if c < key_len {
                    row[c] = self.mask_value;
                }
            }
            for (s, subject) in self.plan.subjects.iter().enumerate() {
                let allowed = regions[s][p] || (pass == Pass::Guidance && bg[p]);
                if allowed {
                    for &c in &subject.positions {
                        if c < key_len {
                            row[c] = 0.0;
                        }
                    }
                }
            }
            if pass == Pass::Normal && bg[p] && self.plan.eos < key_len {
                row[self.plan.eos] = self.mask_value;
            }
        }
        Ok(match pass {
            Pass::Guidance => Tensor::from_vec(cond, (1, 1, n, key_len), &self.device)?,
            Pass::Normal => {
                let mut data = vec![0f32; n * key_len];
                data.extend(cond);
                Tensor::from_vec(data, (2, 1, n, key_len), &self.device)?
            }
        })
    }

    /// Row selectors [S + 1, n] (boxes, then background) and key selectors [S, key_len] for the
    /// loss of one layer, in `dtype`.
    fn loss_selectors(&self, call: &AttnCall, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (h, w) = (call.height, call.width);
        let n = h * w;
        let boxes = self.box_masks(h, w);
        let bg = Self::background(&boxes, n);
        let s = self.subjects();
        let mut rows = Vec::with_capacity((s + 1) * n);
        for b in boxes.iter().chain(std::iter::once(&bg)) {
            rows.extend(b.iter().map(|&v| if v { 1f32 } else { 0.0 }));
        }
        let k = call.key_len;
        let mut keys = vec![0f32; s * k];
        for (si, subject) in self.plan.subjects.iter().enumerate() {
            match call.kind {
                AttnKind::CrossAttn => {
                    for &c in subject
                        .positions
                        .iter()
                        .chain(std::iter::once(&self.plan.eos))
                    {
                        if c < k {
                            keys[si * k + c] = 1.0;
                        }
                    }
                }
                AttnKind::SelfAttn => {
                    for (c, &v) in boxes[si].iter().enumerate() {
                        if v {
                            keys[si * k + c] = 1.0;
                        }
                    }
                }
            }
        }
        let rows = Tensor::from_vec(rows, (s + 1, n), &self.device)?.to_dtype(dtype)?;
        let keys = Tensor::from_vec(keys, (s, k), &self.device)?.to_dtype(dtype)?;
        Ok((rows, keys))
    }

    /// FG [S] and BG [S] of one layer (on the autograd graph), from probs [1, heads, n, k], in
    /// the config's [`LossForm`]: `official` sums head-summed probabilities, BG over the pixels in
    /// no box; `paper` sums squares of the head-mean map, BG over every pixel outside the
    /// subject's own box.
    fn loss_values(&self, call: &AttnCall, probs: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.subjects();
        let (rows, keys) = self.loss_selectors(call, probs.dtype())?;
        let form = match self.config.synth_method() {
            SynthMethod::BoundedAttention => LossForm::Official,
            _ => self.config.form(),
        };
        let (fg, bg) = match form {
            LossForm::Official => {
                let a = probs.sum(1)?.squeeze(0)?; // [n, k], summed over heads
                let per_row = rows.matmul(&a)?; // [S+1, k]
                let fg = (per_row.narrow(0, 0, s)? * &keys)?.sum(1)?;
                let bg_row = per_row.narrow(0, s, 1)?.broadcast_as(keys.shape())?;
                (fg, (bg_row * &keys)?.sum(1)?)
            }
            LossForm::Paper => {
                let a2 = probs.mean(1)?.squeeze(0)?.sqr()?; // [n, k], head-mean, squared
                let inside = rows.narrow(0, 0, s)?.matmul(&a2)?; // [S, k]
                let all = a2.sum_keepdim(0)?.broadcast_as(inside.shape())?; // [S, k]
                let fg = (&inside * &keys)?.sum(1)?;
                let bg = ((all - inside)? * &keys)?.sum(1)?;
                (fg, bg)
            }
        };
        let dt = loss_dtype(probs.dtype());
        Ok((fg.to_dtype(dt)?, bg.to_dtype(dt)?))
    }

    /// Whether any loss term was collected in the current guidance pass.
    pub fn has_loss_terms(&self) -> bool {
        !self.ca_terms.is_empty() || !self.sa_terms.is_empty()
    }

    /// The latent-optimisation loss of the current guidance pass with penalty weights α of the
    /// CA and the SA term (equal unless `synth.alpha_index = code`)
    /// (a scalar tensor on the graph; f32, or f64 for f64 models): with L_i = λ_CA·CA_i +
    /// λ_SA·SA_i per subject, Σ_i L_i in the `official` form and Σ_i L_i² (Eq. 15) in `paper`.
    pub fn loss(&self, (alpha_ca, alpha_sa): (f64, f64)) -> Result<Tensor> {
        // Per subject [S]: (1 − FG/(FG + w·BG))² + α·log(1 + BG), FG and BG averaged over
        // layers; w = 1, or the number of boxes S for Bounded Attention (which has no penalty).
        let bounded = self.config.synth_method() == SynthMethod::BoundedAttention;
        let bg_weight = if bounded { self.subjects() as f64 } else { 1.0 };
        let term = |terms: &[(Tensor, Tensor)], alpha: f64| -> Result<Option<Tensor>> {
            if terms.is_empty() {
                return Ok(None);
            }
            let fg = Tensor::stack(&terms.iter().map(|t| t.0.clone()).collect::<Vec<_>>(), 0)?
                .mean(0)?;
            let bg = Tensor::stack(&terms.iter().map(|t| t.1.clone()).collect::<Vec<_>>(), 0)?
                .mean(0)?;
            let ratio = (&fg / ((&fg + (&bg * bg_weight)?)? + 1e-12)?)?;
            let reward = ratio.affine(-1.0, 1.0)?.sqr()?;
            if bounded {
                return Ok(Some(reward));
            }
            let penalty = (bg + 1.0)?.log()?;
            Ok(Some((reward + (penalty * alpha)?)?))
        };
        let dt = self
            .ca_terms
            .iter()
            .chain(&self.sa_terms)
            .next()
            .map_or(DType::F32, |t| t.0.dtype());
        let mut per_subject = Tensor::zeros(self.subjects(), dt, &self.device)?;
        if let Some(ca) = term(&self.ca_terms, alpha_ca)? {
            per_subject = (per_subject + (ca * self.config.lambda_ca)?)?;
        }
        if let Some(sa) = term(&self.sa_terms, alpha_sa)? {
            per_subject = (per_subject + (sa * self.config.lambda_sa)?)?;
        }
        if !bounded && self.config.form() == LossForm::Paper {
            Ok(per_subject.sqr()?.sum_all()?)
        } else {
            Ok(per_subject.sum_all()?)
        }
    }

    fn record_normal(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        let (h, w) = (call.height, call.width);
        let n = h * w;
        let is_cluster = path_matches(call.path, &self.config.cluster_layers);
        let want_cluster = is_cluster && (self.accumulate || self.capture_maps);
        if !want_cluster || self.subjects() == 0 {
            return Ok(());
        }
        // Conditional half, head mean: [n, k], on the device.
        let cond = probs.narrow(0, call.batch - 1, 1)?.squeeze(0)?;
        let mean = cond.to_dtype(DType::F32)?.mean(0)?;
        let s = self.subjects();
        if call.kind == AttnKind::CrossAttn {
            let (tokens, leading) = self.selectors(call.key_len)?;
            // Each subject's map: the sum of its token columns, [n, s].
            let token_maps = mean.matmul(&tokens)?;
            self.check_cluster_size(call)?;
            if self.capture_maps {
                // Final step only: the per-subject maps drawn over the image.
                let host: Vec<f32> = token_maps
                    .flatten_all()?
                    .to_device(&Device::Cpu)?
                    .to_vec1()?;
                if self.stats.maps.is_empty() {
                    self.stats.maps = vec![vec![0.0; n]; s];
                    self.stats.map_size = Some((h, w));
                }
                for (si, acc) in self.stats.maps.iter_mut().enumerate() {
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a += host[p * s + si] as f64;
                    }
                }
                self.stats.map_layers += 1;
            }
            if self.accumulate {
                MapAccumulator::add(&mut self.maps.cross_sum, mean.matmul(&leading)?)?;
                self.maps.cross_count += 1;
            }
        } else if self.accumulate {
            self.check_cluster_size(call)?;
            MapAccumulator::add(&mut self.maps.self_sum, mean)?;
            self.maps.self_count += 1;
        }
        Ok(())
    }

    fn check_cluster_size(&mut self, call: &AttnCall) -> Result<()> {
        let size = (call.height, call.width);
        match self.maps.size {
            None => {
                self.maps.size = Some(size);
                Ok(())
            }
            Some(s) if s == size => Ok(()),
            Some(s) => Err(Error::Config(format!(
                "synth.cluster_layers: the layers must share one resolution, but {} is {}×{} and an earlier one is {}×{}",
                call.path, size.0, size.1, s.0, s.1
            ))),
        }
    }
}

impl AttentionHook for ControlHook<'_> {
    fn wants(&mut self, call: &AttnCall) -> bool {
        if self.control {
            return true;
        }
        path_matches(call.path, &self.config.loss_layers)
            || path_matches(call.path, &self.config.cluster_layers)
    }

    fn logit_bias(&mut self, call: &AttnCall) -> Result<Option<Tensor>> {
        if !self.control || self.subjects() == 0 {
            return Ok(None);
        }
        let on = match call.kind {
            AttnKind::SelfAttn => self.config.sa_control,
            AttnKind::CrossAttn => self.config.ca_control,
        };
        if !on {
            return Ok(None);
        }
        let expected_batch = match self.pass {
            Pass::Guidance => 1,
            Pass::Normal => 2,
        };
        if call.batch != expected_batch {
            return Err(Error::Input(format!(
                "synthesis hook: {} got batch {} in a {:?} pass",
                call.path, call.batch, self.pass
            )));
        }
        // The self-attention mask is the same in both passes.
        let pass_key = match call.kind {
            AttnKind::SelfAttn => Pass::Normal,
            AttnKind::CrossAttn => self.pass,
        };
        let key = (call.kind, call.height, call.width, pass_key);
        if let Some(t) = self.bias_cache.get(&key) {
            return Ok(Some(t.clone()));
        }
        let t = match call.kind {
            AttnKind::SelfAttn => self.self_bias(call.height, call.width)?,
            AttnKind::CrossAttn => {
                self.cross_bias(call.height, call.width, call.key_len, self.pass)?
            }
        };
        self.bias_cache.insert(key, t.clone());
        Ok(Some(t))
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        match self.pass {
            Pass::Guidance => {
                if !path_matches(call.path, &self.config.loss_layers) || self.subjects() == 0 {
                    return Ok(());
                }
                let on = match call.kind {
                    AttnKind::SelfAttn => self.config.sa_control,
                    AttnKind::CrossAttn => self.config.ca_control,
                };
                if !on {
                    return Ok(());
                }
                let terms = self.loss_values(call, probs)?;
                match call.kind {
                    AttnKind::CrossAttn => self.ca_terms.push(terms),
                    AttnKind::SelfAttn => self.sa_terms.push(terms),
                }
                Ok(())
            }
            Pass::Normal => self.record_normal(call, probs),
        }
    }

    fn wants_unbiased(&mut self, call: &AttnCall) -> bool {
        self.pass == Pass::Normal
            && self.measure_leak
            && call.kind == AttnKind::CrossAttn
            && self.subjects() > 0
            && path_matches(call.path, &self.config.loss_layers)
    }

    fn unbiased_probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        // Conditional half, head mean [n, k]; each subject's map is the sum of its token
        // columns [n, s]; the leak is its mass outside the box over its whole mass.
        let cond = probs.narrow(0, call.batch - 1, 1)?.squeeze(0)?;
        let mean = cond.to_dtype(DType::F32)?.mean(0)?;
        let (tokens, _) = self.selectors(call.key_len)?;
        let token_maps = mean.matmul(&tokens)?;
        let inside = self.box_tensor(call.height, call.width)?;
        let total = token_maps.sum(0)?;
        let outside = (&token_maps - (&token_maps * &inside)?)?.sum(0)?;
        self.pending_leak.push(Tensor::stack(&[outside, total], 0)?);
        Ok(())
    }
}

/// The dtype the loss is computed in: f64 for f64 models, else f32.
fn loss_dtype(probs: DType) -> DType {
    if probs == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Mean over layers of per-layer values (0 when there are none).
pub fn layer_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_words() {
        for w in [
            "a", "The", "of", "and", "with", "in", "on", "at", "left", "two", "42", "'s",
        ] {
            assert!(is_stop_word(w), "{w}");
        }
        for w in ["dog", "photo", "beach", "<v0>", "v0", "red"] {
            assert!(!is_stop_word(w), "{w}");
        }
    }

    #[test]
    fn prefixes_match_whole_components() {
        let p = vec!["up_blocks.1".to_string(), "mid_block".to_string()];
        assert!(path_matches(
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
            &p
        ));
        assert!(path_matches(
            "mid_block.attentions.0.transformer_blocks.0.attn1",
            &p
        ));
        assert!(!path_matches(
            "up_blocks.10.attentions.0.transformer_blocks.0.attn2",
            &p
        ));
        assert!(!path_matches(
            "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
            &p
        ));
    }

    /// Two subjects in the top row of a 2×2 map (top-left, top-right), the bottom row
    /// background; tokens: SOT, `<v0>` (1), `<v1>` (2), EOS (3).
    fn two_cell_plan() -> (TokenPlan, Vec<BoxSpec>) {
        let plan = TokenPlan {
            ids: vec![0, 1, 2, 3],
            tokens: ["<sot>", "<v0>", "<v1>", "<eos>"]
                .map(String::from)
                .to_vec(),
            subjects: vec![
                SubjectTokens {
                    name: "<v0>".into(),
                    positions: vec![1],
                    leading: 1,
                },
                SubjectTokens {
                    name: "<v1>".into(),
                    positions: vec![2],
                    leading: 2,
                },
            ],
            eos: 3,
            stop_positions: vec![],
        };
        let boxes = vec![
            super::super::boxes::parse_box("<v0>=0,0,0.5,0.5").unwrap(),
            super::super::boxes::parse_box("<v1>=0.5,0,1,0.5").unwrap(),
        ];
        (plan, boxes)
    }

    fn call(kind: AttnKind, path: &str, batch: usize) -> AttnCall<'_> {
        AttnCall {
            index: 0,
            kind_index: 0,
            kind,
            path,
            height: 2,
            width: 2,
            heads: 2,
            batch,
            key_len: 4,
        }
    }

    /// Rows of a [heads = 2, n = 4, k = 4] attention map, each row a distribution.
    fn map(seed: u32) -> Vec<[[f64; 4]; 4]> {
        (0..2)
            .map(|h| {
                let mut rows = [[0.0; 4]; 4];
                for (p, row) in rows.iter_mut().enumerate() {
                    for (k, v) in row.iter_mut().enumerate() {
                        *v = 1.0 + ((seed as usize + 3 * h + 5 * p + 7 * k) % 11) as f64;
                    }
                    let sum: f64 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                rows
            })
            .collect()
    }

    fn tensor(map: &[[[f64; 4]; 4]], batch_before: usize) -> Tensor {
        let mut data = vec![0f32; batch_before * 2 * 16];
        data.extend(map.iter().flatten().flatten().map(|&v| v as f32));
        Tensor::from_vec(data, (batch_before + 1, 2, 4, 4), &Device::Cpu).unwrap()
    }

    /// A box loss in the released code's sums, by hand on the maps `ca` and `sa`: `term(FG, BG)`
    /// per subject and layer, FG and BG summed over heads, over the subject's box cell (0 for
    /// `<v0>`, 1 for `<v1>`) or the background cells (2 and 3), and over its key columns (CA:
    /// the subject's token and EOS; SA: its own box cell); λ_CA 1.5, λ_SA 0.5.
    fn official_sums_by_hand(
        ca: &[[[f64; 4]; 4]],
        sa: &[[[f64; 4]; 4]],
        term: impl Fn(f64, f64) -> f64,
    ) -> f64 {
        let a = |m: &[[[f64; 4]; 4]], p: usize, k: usize| m[0][p][k] + m[1][p][k];
        let ca_v0 = term(
            a(ca, 0, 1) + a(ca, 0, 3),
            a(ca, 2, 1) + a(ca, 2, 3) + a(ca, 3, 1) + a(ca, 3, 3),
        );
        let ca_v1 = term(
            a(ca, 1, 2) + a(ca, 1, 3),
            a(ca, 2, 2) + a(ca, 2, 3) + a(ca, 3, 2) + a(ca, 3, 3),
        );
        let sa_v0 = term(a(sa, 0, 0), a(sa, 2, 0) + a(sa, 3, 0));
        let sa_v1 = term(a(sa, 1, 1), a(sa, 2, 1) + a(sa, 3, 1));
        1.5 * (ca_v0 + ca_v1) + 0.5 * (sa_v0 + sa_v1)
    }

    /// The box loss of one cross- and one self-attention layer against the formula worked out
    /// by hand on the constructed maps: per subject (1 − FG/(FG + BG))² + α·log(1 + BG), with FG
    /// and BG summed over heads, the subject's box (or the background) rows and its key columns.
    #[test]
    fn box_loss_matches_a_hand_computation() {
        let (ca, sa) = (map(1), map(4));
        let alpha = 0.3;
        let got = loss_of("official", &ca, &sa, alpha);

        let want = official_sums_by_hand(&ca, &sa, |fg, bg| {
            (1.0 - fg / (fg + bg)).powi(2) + alpha * (1.0 + bg).ln()
        });
        assert!(
            (got - want).abs() < 1e-5 * want,
            "loss {got}, by hand {want}"
        );
    }

    /// The box loss of one cross- and one self-attention layer in `form` on the given maps.
    fn loss_of(form: &str, ca: &[[[f64; 4]; 4]], sa: &[[[f64; 4]; 4]], alpha: f64) -> f64 {
        let config = SynthConfig {
            loss_form: form.into(),
            ..SynthConfig::default()
        };
        loss_with(&config, ca, sa, alpha)
    }

    /// The box loss of one cross- and one self-attention layer under `config` on the given maps.
    fn loss_with(
        config: &SynthConfig,
        ca: &[[[f64; 4]; 4]],
        sa: &[[[f64; 4]; 4]],
        alpha: f64,
    ) -> f64 {
        let (plan, boxes) = two_cell_plan();
        let mut hook = ControlHook::new(config, &plan, &boxes, &Device::Cpu, DType::F32);
        hook.begin(Pass::Guidance);
        let ca_path = "mid_block.attentions.0.transformer_blocks.0.attn2";
        let sa_path = "mid_block.attentions.0.transformer_blocks.0.attn1";
        hook.probs(&call(AttnKind::CrossAttn, ca_path, 1), &tensor(ca, 0))
            .unwrap();
        hook.probs(&call(AttnKind::SelfAttn, sa_path, 1), &tensor(sa, 0))
            .unwrap();
        hook.loss((alpha, alpha))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// The paper's form (Eqs. 6–7, 15) by hand: FG and BG are sums of squares of the head-mean
    /// map, BG over every cell outside the subject's own box (the other subject's cell
    /// included), and the loss is Σ_s (1.5·CA_s + 0.5·SA_s)².
    #[test]
    fn paper_box_loss_matches_a_hand_computation() {
        let (ca, sa) = (map(1), map(4));
        let alpha = 0.3;
        let got = loss_of("paper", &ca, &sa, alpha);
        let a2 =
            |m: &[[[f64; 4]; 4]], p: usize, k: usize| ((m[0][p][k] + m[1][p][k]) / 2.0).powi(2);
        let term = |fg: f64, bg: f64| (1.0 - fg / (fg + bg)).powi(2) + alpha * (1.0 + bg).ln();
        // Cells: 0 <v0>'s box, 1 <v1>'s box, 2 and 3 background; CA keys: token and EOS (3).
        let out = |m: &[[[f64; 4]; 4]], own: usize, keys: &[usize]| -> f64 {
            (0..4)
                .filter(|&p| p != own)
                .map(|p| keys.iter().map(|&k| a2(m, p, k)).sum::<f64>())
                .sum()
        };
        let ca_v0 = term(a2(&ca, 0, 1) + a2(&ca, 0, 3), out(&ca, 0, &[1, 3]));
        let ca_v1 = term(a2(&ca, 1, 2) + a2(&ca, 1, 3), out(&ca, 1, &[2, 3]));
        let sa_v0 = term(a2(&sa, 0, 0), out(&sa, 0, &[0]));
        let sa_v1 = term(a2(&sa, 1, 1), out(&sa, 1, &[1]));
        let want = (1.5 * ca_v0 + 0.5 * sa_v0).powi(2) + (1.5 * ca_v1 + 0.5 * sa_v1).powi(2);
        assert!(
            (got - want).abs() < 1e-5 * want,
            "loss {got}, by hand {want}"
        );
        // The two forms differ on these maps (the test above pins the official one).
        assert!((loss_of("official", &ca, &sa, alpha) - got).abs() > 1e-3);
    }

    /// Bounded Attention's loss by hand: the released code's sums, the ratio FG/(FG + S·BG)
    /// with S = 2 boxes, no out-of-box penalty (whatever α is given), summed over subjects.
    #[test]
    fn bounded_attention_loss_matches_a_hand_computation() {
        let (ca, sa) = (map(1), map(4));
        let mut config = SynthConfig {
            method: "bounded-attention".into(),
            ..SynthConfig::default()
        };
        // The sampler runs the effective config; the loss must not depend on α either way.
        config = config.effective();
        assert!(!config.out_of_box);
        let got = loss_with(&config, &ca, &sa, 0.3);
        let want = official_sums_by_hand(&ca, &sa, |fg, bg| (1.0 - fg / (fg + 2.0 * bg)).powi(2));
        assert!(
            (got - want).abs() < 1e-5 * want,
            "loss {got}, by hand {want}"
        );
    }

    /// The leak is read from the attention before the box bias: a map with all of `<v0>`'s
    /// mass outside its box leaks 1 for `<v0>`, whatever the biased map says.
    #[test]
    fn leak_is_read_from_the_unbiased_map() {
        let (plan, boxes) = two_cell_plan();
        let config = SynthConfig::default();
        let mut hook = ControlHook::new(&config, &plan, &boxes, &Device::Cpu, DType::F32);
        hook.begin(Pass::Normal);
        let path = "mid_block.attentions.0.transformer_blocks.0.attn2";
        let c = call(AttnKind::CrossAttn, path, 2);
        assert!(hook.wants_unbiased(&c));
        // <v0>'s column (key 1) is non-zero only at cell 1 (<v1>'s box); <v1>'s column
        // (key 2) half in its box (cell 1), half in the background (cell 2).
        let mut m = vec![[[0.0; 4]; 4]; 2];
        for head in m.iter_mut() {
            head[0] = [1.0, 0.0, 0.0, 0.0];
            head[1] = [0.0, 0.5, 0.25, 0.25];
            head[2] = [0.75, 0.0, 0.25, 0.0];
            head[3] = [1.0, 0.0, 0.0, 0.0];
        }
        hook.unbiased_probs(&c, &tensor(&m, 1)).unwrap();
        hook.finish_pass().unwrap();
        assert_eq!(hook.stats.leak[0], vec![1.0]);
        assert!(
            (hook.stats.leak[1][0] - 0.5).abs() < 1e-6,
            "{:?}",
            hook.stats.leak
        );
        // Guidance passes and self-attention never ask for the unbiased map.
        let sa = call(AttnKind::SelfAttn, path, 2);
        assert!(!hook.wants_unbiased(&sa));
        hook.begin(Pass::Guidance);
        assert!(!hook.wants_unbiased(&c));
    }
}
