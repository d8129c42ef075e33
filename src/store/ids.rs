//! Identifiers: blake3 digests (blobs, specs, model fingerprints) and time-ordered run ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::StoreError;

/// A blake3 digest. Written as 64 lowercase hex characters in JSON and on screen, and as 32 raw
/// bytes in binary records.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

/// The blake3 hash of a blob's bytes; also the blob's file name.
pub type BlobHash = Digest;
/// The blake3 hash of a spec's canonical encoding (see [`super::RunSpec::canonical_bytes`]).
pub type SpecHash = Digest;

impl Digest {
    /// Hashes `bytes` with blake3.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The 64-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }

    /// The first `n` hex characters, for display.
    pub fn short(&self, n: usize) -> String {
        let mut hex = self.to_hex();
        hex.truncate(n);
        hex
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Digest(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    /// Parses 64 hex characters (either case).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = text.as_bytes();
        let bad = || {
            StoreError::InvalidInput(format!("'{text}' is not a blake3 hash (64 hex characters)"))
        };
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(bad)?;
            let lo = hex_value(pair[1]).ok_or_else(bad)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(Digest)
        }
    }
}

/// Crockford's base32 alphabet, lowercase: no i, l, o, u.
const BASE32: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters of a run id that encode the creation time (milliseconds since the Unix epoch).
const TIME_CHARS: usize = 10;
/// Random characters after the time part.
const RANDOM_CHARS: usize = 6;
/// Length of every run id.
pub const RUN_ID_LEN: usize = TIME_CHARS + RANDOM_CHARS;

/// A run's id: 16 characters of lowercase Crockford base32, the first 10 encoding the creation time
/// in milliseconds since the Unix epoch, the last 6 random. Ids sort by creation time (the store
/// also bumps an id that would not sort after the newest one), so the `runs` tree iterates oldest
/// to newest. Any unique prefix names a run on the command line.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// A new id for a run created at `unix_ms` with random bits `random` (only the low 30 are used).
    pub fn from_parts(unix_ms: u64, random: u32) -> Self {
        let mut text = String::with_capacity(RUN_ID_LEN);
        for i in (0..TIME_CHARS).rev() {
            let digit = (unix_ms >> (5 * i)) & 31;
            text.push(char::from(BASE32[digit as usize]));
        }
        for i in (0..RANDOM_CHARS).rev() {
            let digit = (random >> (5 * i)) & 31;
            text.push(char::from(BASE32[digit as usize]));
        }
        RunId(text)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's bytes, the key of the run in every sled tree.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Creation time encoded in the id (milliseconds since the Unix epoch).
    pub fn unix_ms(&self) -> u64 {
        self.0.as_bytes()[..TIME_CHARS]
            .iter()
            .fold(0u64, |acc, &c| {
                (acc << 5) | u64::from(base32_value(c).unwrap_or(0))
            })
    }

    /// The id `step` places after `self`, reading the id as an 80-bit base32 number (saturating at
    /// the largest id). Used to keep ids increasing when the clock does not move on.
    pub fn advanced_by(&self, step: u64) -> RunId {
        let value = self.0.bytes().fold(0u128, |acc, c| {
            (acc << 5) | u128::from(base32_value(c).unwrap_or(0))
        });
        let max = (1u128 << (5 * RUN_ID_LEN)) - 1;
        let next = value.saturating_add(u128::from(step)).min(max);
        let text = (0..RUN_ID_LEN)
            .rev()
            .map(|i| char::from(BASE32[((next >> (5 * i)) & 31) as usize]))
            .collect();
        RunId(text)
    }

    /// Parses a full run id from key bytes.
    pub fn from_key(key: &[u8]) -> Result<Self, StoreError> {
        let text = std::str::from_utf8(key)
            .map_err(|_| StoreError::InvalidRunId(String::from_utf8_lossy(key).into_owned()))?;
        text.parse()
    }
}

fn base32_value(c: u8) -> Option<u8> {
    BASE32.iter().position(|&b| b == c).map(|p| p as u8)
}

/// Normalises a user-typed run id prefix: lower case, and every character must be one that run ids
/// contain.
pub fn normalize_run_prefix(prefix: &str) -> Result<String, StoreError> {
    let lower = prefix.trim().to_ascii_lowercase();
    if lower.is_empty()
        || lower.len() > RUN_ID_LEN
        || !lower.bytes().all(|c| base32_value(c).is_some())
    {
        return Err(StoreError::InvalidRunId(prefix.to_string()));
    }
    Ok(lower)
}

impl FromStr for RunId {
    type Err = StoreError;

    /// Parses a full 16-character run id (either case).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = normalize_run_prefix(text)?;
        if lower.len() != RUN_ID_LEN {
            return Err(StoreError::InvalidRunId(text.to_string()));
        }
        Ok(RunId(lower))
    }
}

impl TryFrom<String> for RunId {
    type Error = StoreError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time_and_round_trip() {
        let a = RunId::from_parts(1_700_000_000_000, 0x3fff_ffff);
        let b = RunId::from_parts(1_700_000_000_001, 0);
        assert!(a < b);
        assert_eq!(a.unix_ms(), 1_700_000_000_000);
        assert_eq!(a.as_str().len(), RUN_ID_LEN);
        assert_eq!(a.as_str().parse::<RunId>().unwrap(), a);
        // All-ones random bits: the next id carries into the time part.
        assert_eq!(a.advanced_by(1), b);
        assert!(b.advanced_by(1000) > b);
    }

    #[test]
    fn digest_hex_round_trips_and_rejects_garbage() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert_eq!(
            d.to_hex(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert!("xyz".parse::<Digest>().is_err());
        assert!(normalize_run_prefix("0I").is_err());
        assert_eq!(normalize_run_prefix("0AB").unwrap(), "0ab");
    }
}
