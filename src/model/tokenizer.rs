//! CLIP byte-level BPE tokenizer, read from a diffusers `tokenizer/` folder.
//!
//! It reproduces what `CLIPTokenizer(Fast)` does inside diffusers' Stable Diffusion pipelines
//! (`padding="max_length", truncation=True, max_length=model_max_length`):
//!
//! 1. special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, the unk token and any
//!    token the folder marks as not normalised) are cut out of the raw text;
//! 2. every remaining span is normalised: NFC, whitespace runs become one space, lowercase;
//! 3. placeholder tokens added with [`ClipTokenizer::add_tokens`] are cut out of the normalised
//!    spans (leftmost match first, the longest token when several start at the same place);
//! 4. the rest is split into words by CLIP's pre-tokenisation pattern (whitespace is dropped, so
//!    leading and trailing blanks never matter), each word's UTF-8 bytes are mapped to GPT-2's
//!    printable byte alphabet, the last symbol gets the `</w>` suffix, and the merges are applied
//!    by rank;
//! 5. the ids are framed as `[bos] + tokens[..max_len - 2] + [eos]` and padded with the pad id.
//!
//! SD 2.x folders use `!` (id 0) as the pad token; as in HF, every `!` in a prompt is then the
//! special pad token (`cat!!` → `cat</w>`, `!`, `!`), while SD 1.x folders (pad `<|endoftext|>`)
//! byte-pair-encode `!` like any other punctuation.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::error::{Error, Result};

/// Suffix carried by the last symbol of every word in CLIP's vocabulary.
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-tokenisation pattern, applied to lowercased text.
const PRE_TOKEN_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Sequence length used when `tokenizer_config.json` gives no `model_max_length`
/// (the size of CLIP's position embedding).
const DEFAULT_MAX_LEN: usize = 77;
/// Largest `model_max_length` accepted; HF writes ~1e30 when the length is unknown.
const MAX_SUPPORTED_LEN: u64 = 1 << 20;
/// The word cache is emptied when it grows past this many entries.
const CACHE_LIMIT: usize = 65_536;

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// Which files of a tokenizer folder [`ClipTokenizer::from_dir_with`] reads the vocabulary and
/// merges from (`tokenizer_config.json` is always read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VocabSource {
    /// `vocab.json` + `merges.txt` when both exist, otherwise `tokenizer.json`.
    #[default]
    Auto,
    /// `vocab.json` + `merges.txt` (plus `added_tokens.json` and the config's
    /// `added_tokens_decoder`, when present).
    VocabAndMerges,
    /// `tokenizer.json` (its `model.vocab`, `model.merges` and `added_tokens`).
    TokenizerJson,
}

/// The result of [`ClipTokenizer::encode_detailed`]: the ids plus per-position bookkeeping.
///
/// All vectors except `words` have exactly [`ClipTokenizer::max_len`] entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids: bos, the (truncated) prompt tokens, eos, then padding.
    pub ids: Vec<u32>,
    /// Token text per position, e.g. `"<|startoftext|>"`, `"photo</w>"`, `"<asset0>"`, `"!"`.
    pub tokens: Vec<String>,
    /// Per position, the index into `words` of the pre-token this token came from;
    /// `None` for the framing bos/eos and for padding.
    pub word_of: Vec<Option<usize>>,
    /// Every pre-token of the normalised prompt in order (regex pieces such as `"photo"` or
    /// `"'s"`, and added/special tokens such as `"<asset0>"`), including words whose tokens
    /// were cut off by truncation.
    pub words: Vec<String>,
}

/// A CLIP BPE tokenizer (vocabulary, merges, special and added tokens, framing/padding rules).
///
/// Safe to share between threads; the per-word BPE cache sits behind a mutex.
pub struct ClipTokenizer {
    /// Token text → id, for the base vocabulary and all added tokens.
    encoder: HashMap<String, u32>,
    /// Id → token text (dense: ids are `0..decoder.len()`).
    decoder: Vec<String>,
    /// Number of tokens in the BPE model's own vocabulary.
    base_vocab: usize,
    /// `(left id, right id)` → `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Tokens split out of the raw text before normalisation.
    raw_added: AddedMatcher,
    /// Tokens split out of the normalised text (placeholders added with `add_tokens`).
    normalized_added: AddedMatcher,
    pre_tokenizer: Regex,
    byte_chars: [char; 256],
    bos: u32,
    eos: u32,
    pad: u32,
    unk: u32,
    max_len: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Clone for ClipTokenizer {
    fn clone(&self) -> Self {
        Self {
            encoder: self.encoder.clone(),
            decoder: self.decoder.clone(),
            base_vocab: self.base_vocab,
            merges: self.merges.clone(),
            raw_added: self.raw_added.clone(),
            normalized_added: self.normalized_added.clone(),
            pre_tokenizer: self.pre_tokenizer.clone(),
            byte_chars: self.byte_chars,
            bos: self.bos,
            eos: self.eos,
            pad: self.pad,
            unk: self.unk,
            max_len: self.max_len,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("base_vocab_size", &self.base_vocab)
            .field("vocab_size", &self.decoder.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer from a diffusers `tokenizer/` folder.
    ///
    /// Reads `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
    /// `model_max_length`; tokens may be strings or `{"content": ..}` objects; absent tokens
    /// take CLIPTokenizer's defaults, an absent length is 77) and the vocabulary from
    /// `vocab.json` + `merges.txt`, or from `tokenizer.json` when those two are not both there.
    /// Any missing or malformed file gives an [`Error::File`] naming it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with(dir, VocabSource::Auto)
    }

    /// Like [`ClipTokenizer::from_dir`], but with the vocabulary source chosen by the caller.
    pub fn from_dir_with(dir: &Path, source: VocabSource) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "tokenizer folder not found"));
        }
        let config = read_config(&dir.join("tokenizer_config.json"))?;
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let json_path = dir.join("tokenizer.json");
        let source = match source {
            VocabSource::Auto if vocab_path.is_file() && merges_path.is_file() => {
                VocabSource::VocabAndMerges
            }
            VocabSource::Auto if json_path.is_file() => VocabSource::TokenizerJson,
            VocabSource::Auto => VocabSource::VocabAndMerges,
            other => other,
        };
        let model = match source {
            VocabSource::TokenizerJson => read_tokenizer_json(&json_path)?,
            _ => {
                let vocab = read_vocab_json(&vocab_path)?;
                let merges = read_merges_txt(&merges_path)?;
                let mut added = read_added_tokens_json(&dir.join("added_tokens.json"))?;
                added.extend(config.added_decoder.iter().cloned());
                LoadedModel {
                    vocab,
                    merges,
                    added,
                    path: vocab_path.clone(),
                }
            }
        };
        Self::build(model, config, &dir.join("tokenizer_config.json"))
    }

    /// The CLIP BPE vocabulary and merges that Stable Diffusion 1.x and 2.x ship (49408
    /// tokens, 48894 merges; bundled in mifo's `fixtures/tiny-sd21/tokenizer/`, taken from the
    /// `open_clip_torch` wheel, and compiled into the binary), framed as their
    /// `tokenizer_config.json` files do (`<|startoftext|>`, `<|endoftext|>`, 77 positions) with
    /// `pad` as the pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x). The tokenizer of a
    /// single-file checkpoint read without `--model-config`.
    pub fn bundled(pad: &str) -> Result<Self> {
        const VOCAB: &str = include_str!("../../fixtures/tiny-sd21/tokenizer/vocab.json");
        const MERGES: &str = include_str!("../../fixtures/tiny-sd21/tokenizer/merges.txt");
        let path = Path::new("<bundled CLIP vocabulary>");
        let config = parse_config(
            &serde_json::json!({
                "bos_token": DEFAULT_BOS, "eos_token": DEFAULT_EOS, "unk_token": DEFAULT_EOS,
                "pad_token": pad, "model_max_length": DEFAULT_MAX_LEN,
            }),
            path,
        )?;
        let model = LoadedModel {
            vocab: parse_vocab_json(VOCAB, path)?,
            merges: parse_merges_txt(MERGES, path)?,
            added: Vec::new(),
            path: path.to_path_buf(),
        };
        Self::build(model, config, path)
    }

    fn build(model: LoadedModel, config: Config, config_path: &Path) -> Result<Self> {
        let LoadedModel {
            vocab,
            merges: merge_list,
            added,
            path,
        } = model;
        let base_vocab = vocab.len();
        let mut decoder = vocab;
        let mut encoder: HashMap<String, u32> = decoder
            .iter()
            .enumerate()
            .map(|(id, tok)| (tok.clone(), id as u32))
            .collect();

        // Added tokens: those inside the base vocabulary only get matching rules; the others
        // must continue the id range without gaps.
        let mut added = added;
        added.sort_by_key(|a| a.id);
        added.dedup_by(|a, b| a.id == b.id && a.content == b.content);
        let mut raw_added = AddedMatcher::default();
        let mut normalized_added = AddedMatcher::default();
        for tok in &added {
            let id = tok.id as usize;
            if id < decoder.len() {
                if decoder[id] != tok.content {
                    return Err(Error::file(
                        &path,
                        format!(
                            "added token {:?} has id {id}, which already belongs to {:?}",
                            tok.content, decoder[id]
                        ),
                    ));
                }
            } else if id == decoder.len() {
                if encoder.contains_key(&tok.content) {
                    return Err(Error::file(
                        &path,
                        format!("added token {:?} is listed twice", tok.content),
                    ));
                }
                encoder.insert(tok.content.clone(), tok.id);
                decoder.push(tok.content.clone());
            } else {
                return Err(Error::file(
                    &path,
                    format!(
                        "added token {:?} has id {id}, but the next free id is {}",
                        tok.content,
                        decoder.len()
                    ),
                ));
            }
            if tok.normalized {
                normalized_added.insert(tok.id, normalize(&tok.content));
            } else {
                raw_added.insert(tok.id, tok.content.clone());
            }
        }

        let lookup = |name: &str, tok: &str| -> Result<u32> {
            encoder.get(tok).copied().ok_or_else(|| {
                Error::file(
                    config_path,
                    format!("{name} {tok:?} is not in the vocabulary"),
                )
            })
        };
        let bos = lookup("bos_token", &config.bos)?;
        let eos = lookup("eos_token", &config.eos)?;
        let pad = lookup("pad_token", &config.pad)?;
        let unk = lookup("unk_token", &config.unk)?;
        for (id, tok) in [
            (bos, &config.bos),
            (eos, &config.eos),
            (pad, &config.pad),
            (unk, &config.unk),
        ] {
            if !raw_added.contains(tok) && !normalized_added.contains(&normalize(tok)) {
                raw_added.insert(id, tok.clone());
            }
        }

        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (left, right)) in merge_list.iter().enumerate() {
            let id_of = |sym: &str| -> Result<u32> {
                encoder.get(sym).copied().ok_or_else(|| {
                    Error::file(
                        &path,
                        format!(
                            "merge #{} ({left} {right}) uses {sym:?}, which is not in the vocabulary",
                            rank + 1
                        ),
                    )
                })
            };
            let pair = (id_of(left)?, id_of(right)?);
            let merged = id_of(&format!("{left}{right}"))?;
            merges.entry(pair).or_insert((rank as u32, merged));
        }

        let pre_tokenizer = Regex::new(PRE_TOKEN_PATTERN)
            .map_err(|e| Error::Config(format!("tokenizer pattern: {e}")))?;
        Ok(Self {
            encoder,
            decoder,
            base_vocab,
            merges,
            raw_added,
            normalized_added,
            pre_tokenizer,
            byte_chars: byte_alphabet(),
            bos,
            eos,
            pad,
            unk,
            max_len: config.max_len,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Adds placeholder tokens (e.g. `<asset0>`) and returns their ids, which continue the
    /// vocabulary: `vocab_size()`, `vocab_size() + 1`, … (49408, 49409, … for CLIP).
    ///
    /// Added tokens are matched in the normalised (lowercased) prompt before pre-tokenisation
    /// and always encode to their single id. A token that is empty, already in the vocabulary,
    /// clashes with another added token after normalisation, or is given twice is an
    /// [`Error::Input`], and then nothing is added.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let mut seen = HashSet::new();
        let mut patterns = Vec::with_capacity(tokens.len());
        for tok in tokens {
            if tok.is_empty() {
                return Err(Error::Input("cannot add an empty token".into()));
            }
            if let Some(id) = self.encoder.get(tok) {
                return Err(Error::Input(format!(
                    "token {tok:?} already exists in the tokenizer (id {id})"
                )));
            }
            let pattern = normalize(tok);
            if pattern.trim().is_empty() {
                return Err(Error::Input(format!(
                    "cannot add token {tok:?}: it is only whitespace"
                )));
            }
            if self.normalized_added.contains(&pattern)
                || self.raw_added.contains(&pattern)
                || !seen.insert(pattern.clone())
            {
                return Err(Error::Input(format!(
                    "token {tok:?} is given twice or clashes with an existing added token"
                )));
            }
            patterns.push(pattern);
        }
        let mut ids = Vec::with_capacity(tokens.len());
        for (tok, pattern) in tokens.iter().zip(patterns) {
            let id = self.decoder.len() as u32;
            self.encoder.insert(tok.clone(), id);
            self.decoder.push(tok.clone());
            self.normalized_added.insert(id, pattern);
            ids.push(id);
        }
        Ok(ids)
    }

    /// Encodes a prompt to exactly [`max_len`](Self::max_len) ids:
    /// bos, at most `max_len - 2` prompt tokens, eos, then the pad id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let (content, _) = self.tokenize(text);
        Ok(self.frame(content.into_iter().map(|(id, _)| id)))
    }

    /// Encodes like [`encode`](Self::encode) and also returns each position's token text and
    /// the pre-token (word) it came from.
    pub fn encode_detailed(&self, text: &str) -> Result<Encoding> {
        let (content, words) = self.tokenize(text);
        let keep = self.max_len - 2;
        let mut word_of = Vec::with_capacity(self.max_len);
        word_of.push(None);
        word_of.extend(content.iter().take(keep).map(|&(_, w)| Some(w)));
        word_of.resize(self.max_len, None);
        let ids = self.frame(content.into_iter().map(|(id, _)| id));
        let tokens = ids
            .iter()
            .map(|&id| self.decoder[id as usize].clone())
            .collect();
        Ok(Encoding {
            ids,
            tokens,
            word_of,
            words,
        })
    }

    /// The id of a token text (base vocabulary, special or added token), e.g. `"cat</w>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// The text of a token id, if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(id as usize).map(String::as_str)
    }

    /// Length of every encoded sequence (`model_max_length`, 77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Id used for padding (49407 `<|endoftext|>` in SD 1.x folders, 0 `!` in SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Id of the start-of-text token (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of the end-of-text token (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Size of the BPE model's vocabulary, before tokens added by the folder or
    /// [`add_tokens`](Self::add_tokens) (49408 for CLIP).
    pub fn base_vocab_size(&self) -> usize {
        self.base_vocab
    }

    /// Size of the vocabulary including all added tokens (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// Splits, normalises and BPE-encodes `text` without framing or truncation.
    /// Returns `(id, word index)` per token, and the words.
    fn tokenize(&self, text: &str) -> (Vec<(u32, usize)>, Vec<String>) {
        let mut tokens = Vec::new();
        let mut words = Vec::new();
        for segment in self.raw_added.split(text) {
            match segment {
                Segment::Token(id, matched) => {
                    tokens.push((id, words.len()));
                    words.push(matched.to_string());
                }
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    for part in self.normalized_added.split(&normalized) {
                        match part {
                            Segment::Token(id, matched) => {
                                tokens.push((id, words.len()));
                                words.push(matched.to_string());
                            }
                            Segment::Text(plain) => {
                                for piece in self.pre_tokenizer.find_iter(plain) {
                                    let word = words.len();
                                    tokens.extend(
                                        self.bpe(piece.as_str()).into_iter().map(|id| (id, word)),
                                    );
                                    words.push(piece.as_str().to_string());
                                }
                            }
                        }
                    }
                }
            }
        }
        (tokens, words)
    }

    /// `[bos] + content[..max_len - 2] + [eos]`, padded to `max_len`.
    fn frame(&self, content: impl Iterator<Item = u32>) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend(content.take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        ids
    }

    /// Byte-pair-encodes one pre-token (already lowercased), using and filling the cache.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = cache.get(word) {
            return ids.clone();
        }
        drop(cache);

        let bytes = word.as_bytes();
        let mut symbols: Vec<u32> = Vec::with_capacity(bytes.len());
        let mut buf = String::new();
        for (i, &b) in bytes.iter().enumerate() {
            buf.clear();
            buf.push(self.byte_chars[b as usize]);
            if i + 1 == bytes.len() {
                buf.push_str(END_OF_WORD);
            }
            symbols.push(self.encoder.get(&buf).copied().unwrap_or(self.unk));
        }

        loop {
            // The adjacent pair with the lowest merge rank.
            let best = symbols
                .windows(2)
                .filter_map(|w| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(r, m)| (r, w[0], w[1], m))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, left, right, merged)) = best else {
                break;
            };
            // Merge every occurrence of that pair, scanning left to right.
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }

        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_string(), symbols.clone());
        symbols
    }
}

/// NFC, whitespace runs → one space, then per-character lowercase (the order HF's CLIP
/// normaliser uses).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for (c, _) in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// GPT-2's reversible byte → printable character table: printable Latin-1 bytes map to
/// themselves, the remaining bytes to U+0100 onwards, in byte order.
fn byte_alphabet() -> [char; 256] {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// A piece of text after splitting out added tokens.
enum Segment<'a> {
    /// Ordinary text, to be normalised / pre-tokenised further.
    Text(&'a str),
    /// An added token, with its id and the text it matched.
    Token(u32, &'a str),
}

/// Exact-substring matcher for added tokens: leftmost match wins, the longest token among
/// those starting at the same position.
#[derive(Clone, Debug, Default)]
struct AddedMatcher {
    /// `(pattern, id)`, longest pattern first.
    tokens: Vec<(String, u32)>,
}

impl AddedMatcher {
    fn insert(&mut self, id: u32, pattern: String) {
        if pattern.is_empty() || self.contains(&pattern) {
            return;
        }
        self.tokens.push((pattern, id));
        self.tokens.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    }

    fn contains(&self, pattern: &str) -> bool {
        self.tokens.iter().any(|(p, _)| p == pattern)
    }

    fn split<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        if self.tokens.is_empty() {
            return vec![Segment::Text(text)];
        }
        let mut out = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            match self
                .tokens
                .iter()
                .find(|(p, _)| rest.starts_with(p.as_str()))
            {
                Some((p, id)) => {
                    if start < pos {
                        out.push(Segment::Text(&text[start..pos]));
                    }
                    out.push(Segment::Token(*id, &text[pos..pos + p.len()]));
                    pos += p.len();
                    start = pos;
                }
                None => pos += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            out.push(Segment::Text(&text[start..]));
        }
        out
    }
}

/// An added token as listed by a tokenizer folder.
#[derive(Clone, Debug)]
struct LoadedAdded {
    id: u32,
    content: String,
    /// Matched on normalised text (true) or on the raw text (false).
    normalized: bool,
}

/// Vocabulary, merges and added tokens read from one source.
struct LoadedModel {
    /// Dense id → token.
    vocab: Vec<String>,
    merges: Vec<(String, String)>,
    added: Vec<LoadedAdded>,
    /// File named in errors about the model.
    path: std::path::PathBuf,
}

/// What is used from `tokenizer_config.json`.
struct Config {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
    max_len: usize,
    added_decoder: Vec<LoadedAdded>,
}

fn read_text(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(Error::file(path, "file not found"));
    }
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

fn read_config(path: &Path) -> Result<Config> {
    parse_config(&read_json(path)?, path)
}

fn parse_config(json: &Value, path: &Path) -> Result<Config> {
    let obj = json
        .as_object()
        .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
    let token = |key: &str, default: &str| -> Result<String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(v) => token_content(v).map(str::to_string).ok_or_else(|| {
                Error::file(
                    path,
                    format!("{key} must be a string or an object with \"content\""),
                )
            }),
        }
    };
    let bos = token("bos_token", DEFAULT_BOS)?;
    let eos = token("eos_token", DEFAULT_EOS)?;
    let pad = token("pad_token", DEFAULT_EOS)?;
    let unk = token("unk_token", DEFAULT_EOS)?;
    let max_len = match obj.get("model_max_length") {
        None | Some(Value::Null) => DEFAULT_MAX_LEN,
        Some(v) => match v.as_u64() {
            Some(n) if (2..=MAX_SUPPORTED_LEN).contains(&n) => n as usize,
            _ => {
                return Err(Error::file(
                    path,
                    format!("model_max_length {v} is not a sequence length between 2 and {MAX_SUPPORTED_LEN}"),
                ))
            }
        },
    };
    let mut added_decoder = Vec::new();
    if let Some(decoder) = obj.get("added_tokens_decoder") {
        let map = decoder
            .as_object()
            .ok_or_else(|| Error::file(path, "added_tokens_decoder must be an object"))?;
        for (id, entry) in map {
            let bad = || {
                Error::file(
                    path,
                    format!("added_tokens_decoder entry {id:?} is malformed"),
                )
            };
            let id: u32 = id.parse().map_err(|_| bad())?;
            let content = token_content(entry).ok_or_else(bad)?.to_string();
            let special = entry
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let normalized = entry
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(!special);
            added_decoder.push(LoadedAdded {
                id,
                content,
                normalized,
            });
        }
    }
    Ok(Config {
        bos,
        eos,
        pad,
        unk,
        max_len,
        added_decoder,
    })
}

/// A token given as `"text"` or `{"content": "text", ..}`.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Turns a token → id map into a dense id → token list.
fn dense_vocab(map: &serde_json::Map<String, Value>, path: &Path) -> Result<Vec<String>> {
    let mut slots: Vec<Option<String>> = vec![None; map.len()];
    for (tok, id) in map {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::file(path, format!("id of token {tok:?} is not an integer")))?;
        let slot = slots.get_mut(id as usize).ok_or_else(|| {
            Error::file(
                path,
                format!("token {tok:?} has id {id}, outside 0..{}", map.len()),
            )
        })?;
        if slot.is_some() {
            return Err(Error::file(path, format!("id {id} is used twice")));
        }
        *slot = Some(tok.clone());
    }
    if slots.is_empty() {
        return Err(Error::file(path, "the vocabulary is empty"));
    }
    Ok(slots.into_iter().flatten().collect())
}

fn read_vocab_json(path: &Path) -> Result<Vec<String>> {
    parse_vocab_json(&read_text(path)?, path)
}

fn parse_vocab_json(text: &str, path: &Path) -> Result<Vec<String>> {
    let json: Value = serde_json::from_str(text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let map = json
        .as_object()
        .ok_or_else(|| Error::file(path, "expected a JSON object of token → id"))?;
    dense_vocab(map, path)
}

fn read_merges_txt(path: &Path) -> Result<Vec<(String, String)>> {
    parse_merges_txt(&read_text(path)?, path)
}

fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let pair = line
            .split_once(' ')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '));
        let Some((a, b)) = pair else {
            return Err(Error::file(
                path,
                format!(
                    "line {}: expected two symbols separated by one space",
                    n + 1
                ),
            ));
        };
        merges.push((a.to_string(), b.to_string()));
    }
    Ok(merges)
}

fn read_added_tokens_json(path: &Path) -> Result<Vec<LoadedAdded>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let json = read_json(path)?;
    let map = json
        .as_object()
        .ok_or_else(|| Error::file(path, "expected a JSON object of token → id"))?;
    map.iter()
        .map(|(tok, id)| {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| Error::file(path, format!("id of {tok:?} is not an integer")))?;
            Ok(LoadedAdded {
                id,
                content: tok.clone(),
                normalized: true,
            })
        })
        .collect()
}

fn read_tokenizer_json(path: &Path) -> Result<LoadedModel> {
    let json = read_json(path)?;
    let model = json
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::file(path, "no \"model\" object"))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            return Err(Error::file(
                path,
                format!("model type {kind:?} is not supported (expected \"BPE\")"),
            ));
        }
    }
    if let Some(suffix) = model.get("end_of_word_suffix").and_then(Value::as_str) {
        if suffix != END_OF_WORD {
            return Err(Error::file(
                path,
                format!("end_of_word_suffix {suffix:?} is not supported (expected \"</w>\")"),
            ));
        }
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::file(path, "model.vocab is missing or not an object"))?;
    let vocab = dense_vocab(vocab, path)?;
    let merge_values = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::file(path, "model.merges is missing or not an array"))?;
    let mut merges = Vec::with_capacity(merge_values.len());
    for (n, m) in merge_values.iter().enumerate() {
        let pair = match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(parts) => match parts.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| {
            Error::file(
                path,
                format!("model.merges[{n}] is neither \"a b\" nor [\"a\", \"b\"]"),
            )
        })?);
    }
    let mut added = Vec::new();
    if let Some(list) = json.get("added_tokens") {
        let list = list
            .as_array()
            .ok_or_else(|| Error::file(path, "added_tokens is not an array"))?;
        for (n, entry) in list.iter().enumerate() {
            let bad = || Error::file(path, format!("added_tokens[{n}] is malformed"));
            let id = entry
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(bad)?;
            let content = entry
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(bad)?
                .to_string();
            let special = entry
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let normalized = entry
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(!special);
            added.push(LoadedAdded {
                id,
                content,
                normalized,
            });
        }
    }
    Ok(LoadedModel {
        vocab,
        merges,
        added,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21/tokenizer")
    }

    fn reference_prompts() -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21/reference.json");
        let json: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        json["meta"]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    }

    fn reference_ids(name: &str) -> Vec<Vec<u32>> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21/reference.safetensors");
        let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        tensors[name]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(|v| v as u32).collect())
            .collect()
    }

    /// A scratch folder removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("mifo-tokenizer-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Copies the named fixture files into the folder.
        fn with_fixture_files(tag: &str, files: &[&str]) -> Self {
            let tmp = Self::new(tag);
            for f in files {
                fs::copy(fixture_dir().join(f), tmp.0.join(f)).unwrap();
            }
            tmp
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn placeholders() -> Vec<String> {
        vec!["<asset0>".to_string(), "<asset1>".to_string()]
    }

    /// Checks every reference tensor against a tokenizer loaded from `dir` with `source`.
    fn check_reference(dir: &Path, source: VocabSource) {
        let prompts = reference_prompts();
        assert_eq!(prompts.len(), 4);
        let mut tok = ClipTokenizer::from_dir_with(dir, source).unwrap();
        assert_eq!(tok.base_vocab_size(), 49408);
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (49406, 49407, 0)
        );
        assert_eq!(tok.max_len(), 77);

        let base = reference_ids("tokens.prompt_input_ids_base_tokenizer");
        for (i, prompt) in prompts.iter().enumerate() {
            assert_eq!(
                tok.encode(prompt).unwrap(),
                base[i],
                "base tokenizer, prompt {i}"
            );
        }
        let uncond = reference_ids("tokens.uncond_input_ids");
        assert_eq!(tok.encode("").unwrap(), uncond[0]);

        assert_eq!(tok.add_tokens(&placeholders()).unwrap(), vec![49408, 49409]);
        assert_eq!(tok.vocab_size(), 49410);
        assert_eq!(tok.base_vocab_size(), 49408);
        let with_added = reference_ids("tokens.prompt_input_ids");
        for (i, prompt) in prompts.iter().enumerate() {
            assert_eq!(
                tok.encode(prompt).unwrap(),
                with_added[i],
                "added tokens, prompt {i}"
            );
            assert_eq!(tok.encode_detailed(prompt).unwrap().ids, with_added[i]);
        }
        assert_eq!(tok.encode("").unwrap(), uncond[0]);
    }

    #[test]
    fn reference_ids_from_vocab_and_merges() {
        check_reference(&fixture_dir(), VocabSource::VocabAndMerges);
    }

    #[test]
    fn reference_ids_from_tokenizer_json() {
        check_reference(&fixture_dir(), VocabSource::TokenizerJson);
    }

    #[test]
    fn reference_ids_from_folder_with_only_tokenizer_json() {
        let tmp =
            TempDir::with_fixture_files("json-only", &["tokenizer.json", "tokenizer_config.json"]);
        check_reference(&tmp.0, VocabSource::Auto);
    }

    #[test]
    fn a_photo_of_a_cat() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        let ids = tok.encode("a photo of a cat").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&id| id == tok.pad_id()));
        // Case and whitespace do not matter.
        assert_eq!(tok.encode("  A   PHOTO\tof a\ncat ").unwrap(), ids);
    }

    #[test]
    fn sd2_pad_token_splits_exclamation_marks() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        assert_eq!(
            &tok.encode("CAT!!").unwrap()[..5],
            &[49406, 2368, 0, 0, 49407]
        );
    }

    #[test]
    fn sd1_style_pad_encodes_exclamation_with_bpe() {
        let tmp = TempDir::with_fixture_files("sd1", &["vocab.json", "merges.txt"]);
        fs::write(
            tmp.0.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "model_max_length": 77}"#,
        )
        .unwrap();
        let mut tok = ClipTokenizer::from_dir(&tmp.0).unwrap();
        assert_eq!(tok.pad_id(), 49407);
        tok.add_tokens(&placeholders()).unwrap();
        let prompt = &reference_prompts()[2];
        let ids = tok.encode(prompt).unwrap();
        let reference = &reference_ids("tokens.prompt_input_ids")[2];
        let end = reference.iter().position(|&id| id == 49407).unwrap();
        // Same tokens up to the final `"!`, which is one BPE token here, not `"` + pad.
        assert_eq!(reference[end - 2..end], [257, 0]);
        assert_eq!(ids[..end - 2], reference[..end - 2]);
        assert_eq!(ids[end - 2..end + 2], [10377, 49407, 49407, 49407]);
        assert!(ids[end..].iter().all(|&id| id == 49407));
    }

    #[test]
    fn truncation_keeps_eos_last() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        let ids = tok.encode(&"cat ".repeat(200)).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 49406);
        assert!(ids[1..76].iter().all(|&id| id == 2368));
        assert_eq!(ids[76], 49407);
    }

    #[test]
    fn encode_detailed_maps_positions_to_words() {
        let mut tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        tok.add_tokens(&placeholders()).unwrap();
        let prompt = &reference_prompts()[0];
        let enc = tok.encode_detailed(prompt).unwrap();
        assert_eq!(enc.ids, tok.encode(prompt).unwrap());
        assert_eq!(enc.tokens.len(), 77);
        assert_eq!(enc.word_of.len(), 77);
        assert_eq!(enc.ids[4], 49408);
        assert_eq!(enc.tokens[4], "<asset0>");
        assert_eq!(enc.words[enc.word_of[4].unwrap()], "<asset0>");
        assert_eq!(enc.tokens[0], "<|startoftext|>");
        assert_eq!(enc.tokens[2], "photo</w>");
        assert_eq!(enc.word_of[0], None);
        assert_eq!(
            enc.words,
            ["a", "photo", "of", "<asset0>", "and", "<asset1>"]
        );
        let eos = enc.ids.iter().position(|&id| id == 49407).unwrap();
        assert!(enc.word_of[eos..].iter().all(Option::is_none));
        assert_eq!(enc.tokens[eos + 1], "!");

        // Without the placeholder, `<asset0>` is four words of one token each.
        let base = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        let enc = base.encode_detailed(prompt).unwrap();
        assert_eq!(&enc.ids[4..8], &[283, 13039, 271, 285]);
        assert_eq!(&enc.words[3..7], &["<", "asset", "0", ">"]);
        assert_eq!(&enc.word_of[4..8], &[Some(3), Some(4), Some(5), Some(6)]);
    }

    #[test]
    fn multi_token_words_share_a_word_index() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        let enc = tok.encode_detailed("Van Gogh's").unwrap();
        assert_eq!(enc.words, ["van", "gogh", "'s"]);
        let eos = enc.ids.iter().position(|&id| id == 49407).unwrap();
        let word_of: Vec<usize> = enc.word_of[1..eos].iter().map(|w| w.unwrap()).collect();
        assert!(word_of.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(word_of.first(), Some(&0));
        assert_eq!(word_of.last(), Some(&2));
        assert!(enc.tokens[eos - 1].ends_with("</w>"));
    }

    #[test]
    fn add_tokens_rejects_existing_and_duplicates() {
        let mut tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        assert!(matches!(
            tok.add_tokens(&["cat</w>".into()]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            tok.add_tokens(&["<v0>".into(), "<v0>".into()]),
            Err(Error::Input(_))
        ));
        assert!(matches!(tok.add_tokens(&["".into()]), Err(Error::Input(_))));
        assert_eq!(tok.vocab_size(), 49408, "failed calls add nothing");
        assert_eq!(tok.add_tokens(&["<v0>".into()]).unwrap(), vec![49408]);
        assert!(matches!(
            tok.add_tokens(&["<v0>".into()]),
            Err(Error::Input(_))
        ));
        assert_eq!(tok.token_to_id("<v0>"), Some(49408));
        assert_eq!(tok.id_to_token(49408), Some("<v0>"));
        assert_eq!(tok.id_to_token(49409), None);
        assert_eq!(tok.token_to_id("cat</w>"), Some(2368));
        // Added tokens are matched in the lowercased text, longest first, with no spaces needed.
        tok.add_tokens(&["<v0>x".into()]).unwrap();
        assert_eq!(
            &tok.encode("A <V0><v0>X cat").unwrap()[..6],
            &[49406, 320, 49408, 49409, 2368, 49407]
        );
    }

    #[test]
    fn unicode_and_bytes_round_trip_through_bpe() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        // Composed and decomposed forms encode the same after NFC.
        assert_eq!(
            tok.encode("caf\u{e9}").unwrap(),
            tok.encode("cafe\u{301}").unwrap()
        );
        // Every token of an exotic string is a real vocabulary entry (never unk).
        let ids = tok.encode("🐱 日本 ∑x").unwrap();
        let eos = ids.iter().rposition(|&id| id == 49407).unwrap();
        assert!(eos > 2);
        assert!(ids[1..eos].iter().all(|&id| id < 49406));
    }

    #[test]
    fn missing_vocab_file_is_named() {
        let tmp = TempDir::with_fixture_files("no-vocab", &["merges.txt", "tokenizer_config.json"]);
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::File { .. }), "{msg}");
        assert!(msg.contains("vocab.json"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let err = ClipTokenizer::from_dir_with(&tmp.0, VocabSource::TokenizerJson).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn bad_files_give_one_line_errors() {
        let tmp = TempDir::with_fixture_files("bad", &["vocab.json", "merges.txt"]);
        let config = tmp.0.join("tokenizer_config.json");
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

        fs::write(&config, "{not json").unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tokenizer_config.json") && msg.contains("JSON"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");

        fs::write(&config, r#"{"pad_token": "<|nope|>"}"#).unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("pad_token"), "{err}");

        fs::write(&config, r#"{"model_max_length": 1e30}"#).unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("model_max_length"), "{err}");

        fs::write(&config, "{}").unwrap();
        let tok = ClipTokenizer::from_dir(&tmp.0).unwrap();
        assert_eq!((tok.pad_id(), tok.max_len()), (49407, 77));

        fs::write(tmp.0.join("merges.txt"), "#version: 0.2\ni n\nbroken\n").unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("merges.txt") && msg.contains("line 3"),
            "{msg}"
        );

        fs::write(tmp.0.join("vocab.json"), "[1, 2]").unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");

        let err = ClipTokenizer::from_dir(&tmp.0.join("absent")).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let table = byte_alphabet();
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert_eq!(table[0], '\u{100}');
    }
}
