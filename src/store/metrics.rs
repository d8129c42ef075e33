//! Metric series: the store's append, flush and read methods, and their storage in chunks of up
//! to [`CHUNK_POINTS`] points (never one sled key per point). Live appends are buffered per run
//! and series ([`SeriesBuffer`]) and written a chunk at a time.
//!
//! Key in the `metrics` tree: `run id (16 bytes) ++ series name ++ 0x00 ++ chunk number (u32 BE)`,
//! so one prefix scan reads a run's series in name and chunk order.
//!
//! Chunk encoding (version 1):
//! ```text
//! chunk   = 0x01 count:varint mode:u8 body
//! mode 0  (any steps):      body = (step value)*count
//!         step  = varint (first point: the step; later points: zigzag varint of step - previous step)
//! mode 1  (evenly spaced):  body = first:varint stride:varint value*count
//!         (step i = first + i * stride; what a training loop logging every N steps produces)
//! value   = 0x00              when the f64 bits equal the previous value's (0 before the first)
//!         | h bytes           otherwise, with x = bits XOR previous bits,
//!                             lz = leading zero bytes of x, tz = trailing zero bytes of x,
//!                             h = 1 + 8*lz + tz, then the 8-lz-tz middle bytes of x, big-endian
//! ```
//! An evenly spaced loss computed in f32 and widened to f64 (29 zero low bits) costs at most 6 bytes
//! a point instead of 16 raw. Decoding checks every length against the bytes present: a corrupt chunk is an error,
//! never a panic or a large allocation.

use std::collections::BTreeMap;

use super::error::{DbContext, StoreError, StoreResult};
use super::ids::{RunId, RUN_ID_LEN};
use super::record::{RunRecord, SeriesSummary};
use super::{lock, Store};

/// Points per chunk: live appends are buffered and written as one chunk when this many are pending
/// (or on an explicit flush, and when the run finishes).
pub const CHUNK_POINTS: usize = 512;
/// Most points a stored chunk may claim (bounds decoding).
pub const MAX_CHUNK_POINTS: usize = 1 << 16;
/// Longest series name, in bytes.
pub const MAX_SERIES_NAME: usize = 200;
const CHUNK_FORMAT: u8 = 1;

/// One metric point: (step, value).
pub type Point = (u64, f64);

/// Checks a series name: 1 to [`MAX_SERIES_NAME`] bytes, no control characters.
pub fn validate_series_name(name: &str) -> StoreResult<()> {
    if name.is_empty() || name.len() > MAX_SERIES_NAME || name.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(format!(
            "metric name {name:?} must be 1 to {MAX_SERIES_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

/// The key prefix of one series of one run (`run ++ name ++ 0x00`).
pub fn series_prefix(run: &RunId, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(RUN_ID_LEN + name.len() + 5);
    key.extend_from_slice(run.as_bytes());
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

/// The key of chunk `seq` of a series.
pub fn chunk_key(run: &RunId, name: &str, seq: u32) -> Vec<u8> {
    let mut key = series_prefix(run, name);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a `metrics` key into (run id bytes, series name, chunk number).
pub fn parse_chunk_key(key: &[u8]) -> Option<(&[u8], &str, u32)> {
    if key.len() < RUN_ID_LEN + 1 + 1 + 4 {
        return None;
    }
    let (run, rest) = key.split_at(RUN_ID_LEN);
    let (name_nul, seq) = rest.split_at(rest.len() - 4);
    let name = name_nul.strip_suffix(&[0])?;
    let name = std::str::from_utf8(name).ok()?;
    let seq = u32::from_be_bytes(seq.try_into().ok()?);
    Some((run, name, seq))
}

/// Encodes points as one chunk.
pub fn encode_chunk(points: &[Point]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + points.len() * 7);
    out.push(CHUNK_FORMAT);
    put_varint(&mut out, points.len() as u64);
    match even_stride(points) {
        Some(stride) => {
            out.push(STEPS_EVEN);
            put_varint(&mut out, points.first().map_or(0, |p| p.0));
            put_varint(&mut out, stride);
            let mut prev_bits = 0u64;
            for &(_, value) in points {
                put_value(&mut out, value, &mut prev_bits);
            }
        }
        None => {
            out.push(STEPS_LISTED);
            let mut prev_step = 0u64;
            let mut prev_bits = 0u64;
            for (i, &(step, value)) in points.iter().enumerate() {
                if i == 0 {
                    put_varint(&mut out, step);
                } else {
                    put_varint(&mut out, zigzag(step.wrapping_sub(prev_step) as i64));
                }
                prev_step = step;
                put_value(&mut out, value, &mut prev_bits);
            }
        }
    }
    out
}

const STEPS_LISTED: u8 = 0;
const STEPS_EVEN: u8 = 1;

/// The common stride when steps are `first + i * stride` without overflow.
fn even_stride(points: &[Point]) -> Option<u64> {
    let (first, second) = match points {
        [] => return Some(0),
        [_] => return Some(0),
        [a, b, ..] => (a.0, b.0),
    };
    let stride = second.checked_sub(first)?;
    points
        .windows(2)
        .all(|w| w[0].0.checked_add(stride) == Some(w[1].0))
        .then_some(stride)
}

fn put_value(out: &mut Vec<u8>, value: f64, prev_bits: &mut u64) {
    let bits = value.to_bits();
    let x = bits ^ *prev_bits;
    *prev_bits = bits;
    if x == 0 {
        out.push(0);
        return;
    }
    let lz = (x.leading_zeros() / 8) as usize;
    let tz = (x.trailing_zeros() / 8) as usize;
    out.push((1 + 8 * lz + tz) as u8);
    out.extend_from_slice(&x.to_be_bytes()[lz..8 - tz]);
}

/// Decodes one chunk, appending its points to `points`; `what` names the chunk in errors.
pub fn decode_chunk_into(
    bytes: &[u8],
    points: &mut Vec<Point>,
    what: &dyn Fn() -> String,
) -> StoreResult<()> {
    let corrupt = |detail: &str| StoreError::corrupt(what(), detail);
    let mut reader = Reader { bytes, at: 0 };
    let format = reader.byte().ok_or_else(|| corrupt("empty chunk"))?;
    if format != CHUNK_FORMAT {
        return Err(corrupt(&format!("unknown chunk format {format}")));
    }
    let count = reader
        .varint()
        .ok_or_else(|| corrupt("truncated point count"))?;
    // Every point takes at least one byte, so the count is bounded by the bytes present.
    if count as usize > MAX_CHUNK_POINTS || count > bytes.len() as u64 {
        return Err(corrupt(&format!(
            "claims {count} points in {} bytes",
            bytes.len()
        )));
    }
    let mode = reader
        .byte()
        .ok_or_else(|| corrupt("truncated step mode"))?;
    let even = match mode {
        STEPS_LISTED => None,
        STEPS_EVEN => {
            let first = reader
                .varint()
                .ok_or_else(|| corrupt("truncated first step"))?;
            let stride = reader.varint().ok_or_else(|| corrupt("truncated stride"))?;
            Some((first, stride))
        }
        other => return Err(corrupt(&format!("unknown step mode {other}"))),
    };
    points.reserve(count as usize);
    let mut step = 0u64;
    let mut bits = 0u64;
    for i in 0..count {
        step = match even {
            Some((first, stride)) => i
                .checked_mul(stride)
                .and_then(|offset| first.checked_add(offset))
                .ok_or_else(|| corrupt("steps overflow"))?,
            None => {
                let raw = reader.varint().ok_or_else(|| corrupt("truncated step"))?;
                if i == 0 {
                    raw
                } else {
                    step.wrapping_add(unzigzag(raw) as u64)
                }
            }
        };
        let header = reader.byte().ok_or_else(|| corrupt("truncated value"))?;
        if header != 0 {
            let h = usize::from(header - 1);
            let (lz, tz) = (h / 8, h % 8);
            if lz + tz > 7 {
                return Err(corrupt(&format!("bad value header {header}")));
            }
            let middle = reader
                .take(8 - lz - tz)
                .ok_or_else(|| corrupt("truncated value"))?;
            let mut be = [0u8; 8];
            be[lz..8 - tz].copy_from_slice(middle);
            bits ^= u64::from_be_bytes(be);
        }
        points.push((step, f64::from_bits(bits)));
    }
    if reader.at != bytes.len() {
        return Err(corrupt(&format!(
            "{} trailing bytes",
            bytes.len() - reader.at
        )));
    }
    Ok(())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return None;
            }
            value |= part << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// A series' points buffered in this process until a chunk is full (or flushed).
#[derive(Default)]
pub(super) struct SeriesBuffer {
    /// Next chunk number, read from the tree on first flush.
    pub(super) next_seq: Option<u32>,
    /// Points not yet written.
    pub(super) points: Vec<Point>,
}

impl Store {
    /// Appends one point to series `name` of running run `id`. Points are buffered and written in
    /// chunks of [`CHUNK_POINTS`]; [`Self::flush_metrics`] writes a partial chunk.
    pub fn append_metric(&self, id: &RunId, name: &str, step: u64, value: f64) -> StoreResult<()> {
        self.append_points(id, name, &[(step, value)])
    }

    /// Appends points to series `name` of running run `id` (see [`Self::append_metric`]).
    pub fn append_points(&self, id: &RunId, name: &str, points: &[Point]) -> StoreResult<()> {
        validate_series_name(name)?;
        self.require_owned(id, "metrics can be appended")?;
        let mut pending = lock(&self.inner.pending);
        let buffer = pending
            .entry(id.clone())
            .or_default()
            .entry(name.to_string())
            .or_default();
        buffer.points.extend_from_slice(points);
        while buffer.points.len() >= CHUNK_POINTS {
            let rest = buffer.points.split_off(CHUNK_POINTS);
            let full = std::mem::replace(&mut buffer.points, rest);
            self.write_chunk(id, name, buffer, &full)?;
        }
        Ok(())
    }

    /// Writes the buffered points of run `id` as (partial) chunks.
    pub fn flush_metrics(&self, id: &RunId) -> StoreResult<()> {
        let mut pending = lock(&self.inner.pending);
        let Some(series) = pending.get_mut(id) else {
            return Ok(());
        };
        for (name, buffer) in series.iter_mut() {
            if !buffer.points.is_empty() {
                let points = std::mem::take(&mut buffer.points);
                self.write_chunk(id, name, buffer, &points)?;
            }
        }
        Ok(())
    }

    fn write_chunk(
        &self,
        id: &RunId,
        name: &str,
        buffer: &mut SeriesBuffer,
        points: &[Point],
    ) -> StoreResult<()> {
        let seq = match buffer.next_seq {
            Some(seq) => seq,
            None => {
                let prefix = series_prefix(id, name);
                match self
                    .inner
                    .metrics
                    .scan_prefix(&prefix)
                    .keys()
                    .next_back()
                    .transpose()
                    .db(|| format!("reading metric {name} of run {id}"))?
                {
                    Some(key) => parse_chunk_key(&key)
                        .map(|(_, _, seq)| seq.saturating_add(1))
                        .ok_or_else(|| {
                            StoreError::corrupt(format!("metric key of run {id}"), "malformed")
                        })?,
                    None => 0,
                }
            }
        };
        self.inner
            .metrics
            .insert(chunk_key(id, name, seq), encode_chunk(points))
            .db(|| format!("writing metric {name} of run {id}"))?;
        buffer.next_seq = Some(seq + 1);
        Ok(())
    }

    /// Every metric series of run `id` (stored chunks plus points still buffered in this process).
    pub fn metrics(&self, id: &RunId) -> StoreResult<BTreeMap<String, Vec<Point>>> {
        let mut series: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        for entry in self.inner.metrics.scan_prefix(id.as_bytes()) {
            let (key, bytes) = entry.db(|| format!("reading metrics of run {id}"))?;
            let (_, name, seq) = parse_chunk_key(&key).ok_or_else(|| {
                StoreError::corrupt(format!("metric key of run {id}"), "malformed")
            })?;
            let points = series.entry(name.to_string()).or_default();
            decode_chunk_into(&bytes, points, &|| {
                format!("metric chunk {name}#{seq} of run {id}")
            })?;
        }
        if let Some(pending) = lock(&self.inner.pending).get(id) {
            for (name, buffer) in pending {
                if !buffer.points.is_empty() {
                    series
                        .entry(name.clone())
                        .or_default()
                        .extend_from_slice(&buffer.points);
                }
            }
        }
        Ok(series)
    }

    /// One metric series of run `id` (empty when the run has no such series).
    pub fn metric_series(&self, id: &RunId, name: &str) -> StoreResult<Vec<Point>> {
        let mut points = Vec::new();
        for entry in self.inner.metrics.scan_prefix(series_prefix(id, name)) {
            let (key, bytes) = entry.db(|| format!("reading metric {name} of run {id}"))?;
            let seq = parse_chunk_key(&key).map_or(0, |(_, _, seq)| seq);
            decode_chunk_into(&bytes, &mut points, &|| {
                format!("metric chunk {name}#{seq} of run {id}")
            })?;
        }
        if let Some(buffer) = lock(&self.inner.pending).get(id).and_then(|s| s.get(name)) {
            points.extend_from_slice(&buffer.points);
        }
        Ok(points)
    }

    pub(super) fn summarise_metrics(
        &self,
        id: &RunId,
    ) -> StoreResult<BTreeMap<String, SeriesSummary>> {
        Ok(self
            .metrics(id)?
            .iter()
            .filter_map(|(name, points)| SeriesSummary::of(points).map(|s| (name.clone(), s)))
            .collect())
    }

    /// Per-series summaries of run `id`: the record's when the run has finished, else computed from
    /// the stored points.
    pub fn metric_summaries(
        &self,
        record: &RunRecord,
    ) -> StoreResult<BTreeMap<String, SeriesSummary>> {
        if record.status.is_final() {
            Ok(record.summary.clone())
        } else {
            self.summarise_metrics(&record.id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> StoreResult<Vec<Point>> {
        let mut points = Vec::new();
        decode_chunk_into(bytes, &mut points, &|| "test chunk".to_string())?;
        Ok(points)
    }

    #[test]
    fn chunks_round_trip_exactly() {
        let points: Vec<Point> = vec![
            (0, 0.0),
            (1, 1.5),
            (2, 1.5),
            (1, -0.0),
            (u64::MAX, f64::NAN),
            (7, f64::INFINITY),
            (8, f64::from(0.123_f32)),
            (9, 1e-300),
        ];
        let decoded = decode(&encode_chunk(&points)).unwrap();
        assert_eq!(decoded.len(), points.len());
        for (a, b) in points.iter().zip(&decoded) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1.to_bits(), b.1.to_bits());
        }
    }

    #[test]
    fn f32_losses_cost_at_most_six_bytes_a_point() {
        let points: Vec<Point> = (0..1000u64)
            .map(|s| (10 + 5 * s, f64::from(1.0f32 / (1.0 + s as f32))))
            .collect();
        let bytes = encode_chunk(&points);
        assert_eq!(bytes[3], STEPS_EVEN);
        assert!(bytes.len() <= 6 * 1000 + 8, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), points);
    }

    #[test]
    fn uneven_and_single_steps_round_trip() {
        for points in [
            vec![(5, 1.0)],
            vec![],
            vec![(3, 1.0), (2, 2.0)],
            vec![(0, 1.0), (1, 2.0), (3, 3.0)],
        ] {
            assert_eq!(decode(&encode_chunk(&points)).unwrap(), points);
        }
        // A hostile stride that would overflow is an error, not a panic.
        let mut hostile = vec![CHUNK_FORMAT, 3, STEPS_EVEN];
        put_varint(&mut hostile, u64::MAX - 1);
        put_varint(&mut hostile, u64::MAX / 2);
        hostile.extend_from_slice(&[0, 0, 0]);
        assert!(decode(&hostile).is_err());
    }

    #[test]
    fn corrupt_chunks_are_errors() {
        let bytes = encode_chunk(&[(1, 2.0), (2, 3.0)]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        // A hostile count must not allocate: it is checked against the bytes present.
        let mut hostile = vec![CHUNK_FORMAT];
        put_varint(&mut hostile, u64::MAX);
        assert!(decode(&hostile)
            .unwrap_err()
            .to_string()
            .contains("test chunk"));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
    }

    #[test]
    fn chunk_keys_parse_back() {
        let run = RunId::from_parts(5, 6);
        let key = chunk_key(&run, "loss/total", 3);
        let (r, name, seq) = parse_chunk_key(&key).unwrap();
        assert_eq!((r, name, seq), (run.as_bytes(), "loss/total", 3));
    }
}
