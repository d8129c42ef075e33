//! PNG text chunks: provenance written into exported images without re-encoding their pixels.
//!
//! A text whose keyword and value are Latin-1 goes into a `tEXt` chunk (what every reader shows);
//! other text into an uncompressed UTF-8 `iTXt` chunk. Chunks are inserted right after `IHDR`.

use super::error::{StoreError, StoreResult};

/// The 8-byte PNG signature.
pub const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// True when `bytes` start with the PNG signature.
pub fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(PNG_SIGNATURE)
}

/// One chunk of a PNG: (type, data).
type Chunk<'a> = ([u8; 4], &'a [u8]);

/// Splits a PNG into chunks, checking lengths and CRCs; `what` names it in errors.
fn chunks<'a>(png: &'a [u8], what: &str) -> StoreResult<Vec<Chunk<'a>>> {
    if !is_png(png) {
        return Err(StoreError::corrupt(what, "not a PNG (bad signature)"));
    }
    let mut at = PNG_SIGNATURE.len();
    let mut out = Vec::new();
    while at < png.len() {
        let header = png
            .get(at..at + 8)
            .ok_or_else(|| StoreError::corrupt(what, "truncated chunk header"))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = [header[4], header[5], header[6], header[7]];
        let data_end = (at + 8)
            .checked_add(len)
            .filter(|&end| end.checked_add(4).is_some_and(|e| e <= png.len()))
            .ok_or_else(|| StoreError::corrupt(what, "chunk runs past the end of the file"))?;
        let data = &png[at + 8..data_end];
        let stored_crc = u32::from_be_bytes([
            png[data_end],
            png[data_end + 1],
            png[data_end + 2],
            png[data_end + 3],
        ]);
        if stored_crc != crc32(&[&kind, data]) {
            return Err(StoreError::corrupt(
                what,
                format!("CRC mismatch in chunk {}", String::from_utf8_lossy(&kind)),
            ));
        }
        out.push((kind, data));
        at = data_end + 4;
        if &kind == b"IEND" {
            break;
        }
    }
    if out.first().map(|c| &c.0) != Some(b"IHDR") {
        return Err(StoreError::corrupt(what, "first chunk is not IHDR"));
    }
    Ok(out)
}

/// Returns `png` with a text chunk per (keyword, text) inserted after `IHDR`. Keywords must be 1 to
/// 79 Latin-1 characters (PNG rule).
pub fn add_png_text_chunks(png: &[u8], texts: &[(&str, &str)]) -> StoreResult<Vec<u8>> {
    let parsed = chunks(png, "PNG output")?;
    let mut out = Vec::with_capacity(
        png.len()
            + texts
                .iter()
                .map(|(k, t)| k.len() + t.len() + 20)
                .sum::<usize>(),
    );
    out.extend_from_slice(PNG_SIGNATURE);
    for (i, (kind, data)) in parsed.iter().enumerate() {
        write_chunk(&mut out, kind, data);
        if i == 0 {
            for (keyword, text) in texts {
                let (kind, data) = text_chunk(keyword, text)?;
                write_chunk(&mut out, &kind, &data);
            }
        }
    }
    Ok(out)
}

/// The `tEXt` and uncompressed `iTXt` entries of a PNG, as (keyword, text).
pub fn png_text_chunks(png: &[u8]) -> StoreResult<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for (kind, data) in chunks(png, "PNG")? {
        match &kind {
            b"tEXt" => {
                if let Some(nul) = data.iter().position(|&b| b == 0) {
                    texts.push((latin1(&data[..nul]), latin1(&data[nul + 1..])));
                }
            }
            b"iTXt" => {
                // keyword 0 compression-flag compression-method language 0 translated 0 text
                let Some(nul) = data.iter().position(|&b| b == 0) else {
                    continue;
                };
                let rest = &data[nul + 1..];
                if rest.len() < 2 || rest[0] != 0 {
                    continue; // compressed iTXt: not written by us
                }
                let mut parts = rest[2..].splitn(3, |&b| b == 0);
                let (_lang, _translated, text) = (parts.next(), parts.next(), parts.next());
                if let Some(text) = text {
                    texts.push((
                        latin1(&data[..nul]),
                        String::from_utf8_lossy(text).into_owned(),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(texts)
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn to_latin1(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

fn text_chunk(keyword: &str, text: &str) -> StoreResult<([u8; 4], Vec<u8>)> {
    let key = to_latin1(keyword)
        .filter(|k| (1..=79).contains(&k.len()) && !k.contains(&0))
        .ok_or_else(|| {
            StoreError::InvalidInput(format!(
                "PNG text keyword {keyword:?} must be 1-79 Latin-1 characters"
            ))
        })?;
    let mut data = key;
    data.push(0);
    match to_latin1(text).filter(|t| !t.contains(&0)) {
        Some(latin) => {
            data.extend_from_slice(&latin);
            Ok((*b"tEXt", data))
        }
        None => {
            data.extend_from_slice(&[0, 0, 0, 0]); // not compressed, method 0, no language, no translation
            data.extend_from_slice(text.replace('\0', "").as_bytes());
            Ok((*b"iTXt", data))
        }
    }
}

fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// CRC-32 (IEEE, as PNG uses) over the concatenation of `parts`.
fn crc32(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut n = 0;
        while n < 256 {
            let mut c = n as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[n] = c;
            n += 1;
        }
        table
    };
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    crc ^ 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_spec_value_for_iend() {
        assert_eq!(crc32(&[b"IEND"]), 0xae42_6082);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(png_text_chunks(b"not a png").is_err());
        let mut truncated = PNG_SIGNATURE.to_vec();
        truncated.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, b'I', b'H', b'D', b'R']);
        assert!(add_png_text_chunks(&truncated, &[("a", "b")]).is_err());
    }
}
