//! ASPRS LAS and LAZ point clouds, read with the `las` crate (LAZ through laz-rs): x, y, z
//! with the file's scale and offset applied, then re-centred on the cloud's bounding-box centre
//! (airborne tiles sit at map coordinates of 10⁵–10⁶ m, far outside the range voxel keys
//! cover); intensity scaled from 16 bits to [0, 1], the range of KITTI's remission; the ASPRS
//! classification of every point.
//!
//! The header is checked here before the crate reads the file: a point count, an extended
//! record length or a LAZ chunk count that the file cannot hold would otherwise become an
//! allocation of that size (the fuzz test found the chunk count).

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::voxel::PointCloud;

/// A LAS/LAZ file read for the engine.
#[derive(Debug, Clone)]
pub struct LasScan {
    /// x, y, z (metres, re-centred), intensity in [0, 1].
    pub cloud: PointCloud,
    /// What was subtracted from x, y, z: the bounding-box centre, rounded to whole metres.
    pub centre: [f64; 3],
    /// ASPRS classification per point (2 ground, 6 building, …).
    pub classes: Vec<u8>,
}

/// The ASPRS standard class name of a classification code (LAS 1.4, table 17).
pub fn asprs_name(code: u8) -> &'static str {
    match code {
        0 => "never classified",
        1 => "unclassified",
        2 => "ground",
        3 => "low vegetation",
        4 => "medium vegetation",
        5 => "high vegetation",
        6 => "building",
        7 => "low point (noise)",
        9 => "water",
        10 => "rail",
        11 => "road surface",
        13 => "wire guard",
        14 => "wire conductor",
        15 => "transmission tower",
        16 => "wire connector",
        17 => "bridge deck",
        18 => "high noise",
        _ => "reserved / user defined",
    }
}

/// Little-endian fields of the public header block, read without the crate.
fn u16_at(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Check what the header claims against the file's size (see the module note).
fn check_header(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::format(path, msg);
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Vec::with_capacity(375);
    f.by_ref().take(375).read_to_end(&mut h).map_err(|e| Error::io(path, e))?;
    if h.len() < 227 || &h[..4] != b"LASF" {
        return Err(bad("not a LAS file (no LASF header)".into()));
    }
    let (major, minor) = (h[24], h[25]);
    let need = match (major, minor) {
        (1, 0..=2) => 227,
        (1, 3) => 235,
        (1, 4) => 375,
        _ => return Err(bad(format!("unsupported LAS version {major}.{minor}"))),
    };
    let header_size = u16_at(&h, 94);
    if header_size < need || h.len() < need as usize {
        return Err(bad(format!("LAS {major}.{minor} header of {header_size} bytes (needs {need})")));
    }
    let offset = u32_at(&h, 96);
    let (format, record_len) = (h[104], u16_at(&h, 105));
    let mut points = u32_at(&h, 107);
    if minor == 4 {
        points = points.max(u64_at(&h, 247));
    }
    if record_len == 0 && points > 0 {
        return Err(bad("point records of 0 bytes".into()));
    }
    let bytes = points.checked_mul(record_len).ok_or_else(|| bad(format!("claims {points} points")))?;
    let compressed = format & 0xC0 != 0;
    // LAZ packs LAS records about 5–10×; 64× plus a MiB is beyond any real file.
    let room = if compressed { len.saturating_mul(64).saturating_add(1 << 20) } else { len.saturating_sub(offset) };
    if bytes > room {
        return Err(bad(format!(
            "claims {points} points of {record_len} bytes, more than a {len}-byte {} file holds",
            if compressed { "LAZ" } else { "LAS" }
        )));
    }
    if compressed && points > 0 {
        // laz-rs sizes its chunk table by the count stored in the file; a chunk holds at least
        // one point, so more chunks than points is corrupt.
        use std::io::Seek;
        let i64_at = |f: &mut std::fs::File, at: u64| -> Result<Option<u64>> {
            if at.checked_add(8).is_none_or(|end| end > len) {
                return Ok(None);
            }
            f.seek(std::io::SeekFrom::Start(at)).map_err(|e| Error::io(path, e))?;
            let mut v = [0u8; 8];
            f.read_exact(&mut v).map_err(|e| Error::io(path, e))?;
            Ok(u64::try_from(i64::from_le_bytes(v)).ok())
        };
        // Where the table is: after the point data, or (a writer that could not seek back)
        // in the file's last 8 bytes.
        let table = match i64_at(&mut f, offset)?.filter(|&t| t > offset) {
            Some(t) => Some(t),
            None => i64_at(&mut f, len.saturating_sub(8))?.filter(|&t| t > offset),
        };
        let table = table.ok_or_else(|| bad("LAZ without a chunk table".into()))?;
        if table.checked_add(8).is_none_or(|end| end > len) {
            return Err(bad(format!("LAZ chunk table at byte {table}, past the end of the file")));
        }
        f.seek(std::io::SeekFrom::Start(table + 4)).map_err(|e| Error::io(path, e))?;
        let mut c = [0u8; 4];
        f.read_exact(&mut c).map_err(|e| Error::io(path, e))?;
        let chunks = u64::from(u32::from_le_bytes(c));
        if chunks > points {
            return Err(bad(format!("LAZ chunk table lists {chunks} chunks for {points} points")));
        }
    }
    if minor == 4 {
        // Extended records carry 64-bit lengths: walk them and check each against the file.
        let (mut at, count) = (u64_at(&h, 235), u32_at(&h, 243));
        for i in 0..count {
            use std::io::Seek;
            if at.checked_add(60).is_none_or(|end| end > len) {
                return Err(bad(format!("extended record {i} starts past the end of the file")));
            }
            f.seek(std::io::SeekFrom::Start(at)).map_err(|e| Error::io(path, e))?;
            let mut e = [0u8; 60];
            f.read_exact(&mut e).map_err(|e| Error::io(path, e))?;
            let n = u64_at(&e, 20);
            at = at
                .checked_add(60)
                .and_then(|a| a.checked_add(n))
                .filter(|&end| end <= len)
                .ok_or_else(|| bad(format!("extended record {i} claims {n} bytes, more than the file holds")))?;
        }
    }
    Ok(())
}

/// Read a `.las` or `.laz` file (see the module note).
pub fn read_las(path: &Path) -> Result<LasScan> {
    check_header(path)?;
    let las_err = |e: las::Error| Error::format(path, format!("LAS: {e}"));
    // The decoders assume well-formed streams; a panic on a corrupt one becomes this file's
    // error (nothing outlives the reader, so nothing is left half-updated).
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reader = las::Reader::from_path(path)?;
        reader.read_all()
    }));
    let data = match read {
        Ok(r) => r.map_err(las_err)?,
        Err(_) => return Err(Error::format(path, "corrupt LAS/LAZ point data (the decoder failed)")),
    };
    let n = data.len();
    let (xs, ys, zs): (Vec<f64>, Vec<f64>, Vec<f64>) = (data.x().collect(), data.y().collect(), data.z().collect());
    let mut centre = [0.0f64; 3];
    for (a, v) in [&xs, &ys, &zs].into_iter().enumerate() {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
        if n > 0 && !(lo.is_finite() && hi.is_finite()) {
            return Err(Error::format(path, "non-finite coordinates (scale or offset)"));
        }
        centre[a] = if n > 0 { ((lo + hi) / 2.0).round() } else { 0.0 };
    }
    let mut rows = Vec::with_capacity(n * 4);
    for ((((x, y), z), i), _) in xs.iter().zip(&ys).zip(&zs).zip(data.intensity()).zip(0..n) {
        rows.extend_from_slice(&[
            (x - centre[0]) as f32,
            (y - centre[1]) as f32,
            (z - centre[2]) as f32,
            f32::from(i) / 65535.0,
        ]);
    }
    let classes: Vec<u8> = data.classification().collect();
    if rows.len() != n * 4 || classes.len() != n {
        return Err(Error::format(path, "point columns of different lengths"));
    }
    Ok(LasScan { cloud: PointCloud::new(rows, 4)?, centre, classes })
}
