//! Sparse formats of a conv's weights `[K, Cin, Cout]`, built from a kernel whose pruned
//! entries are zero, for the CPU kernels in `cpu::sparse` that skip the zeros:
//!
//! - [`Format::Element`]: unstructured; per offset, compressed sparse columns (each output
//!   channel's nonzero input channels and values).
//! - [`Format::Block`]: 1×16 blocks over `[Cin, Cout]` (one input channel × 16 consecutive
//!   output channels, the AVX-512 vector width); per offset and 16-column strip, the input
//!   channels whose block is not all zero, with the block's 16 values.
//! - [`Format::NM`]: N:M along `Cin` (at most N nonzeros in every M consecutive input
//!   channels of each output channel), stored as exactly N values and in-group indices per
//!   group, as 2:4 hardware formats do.
//!
//! Offsets whose weights are all zero hold no entries: their pairs are skipped too.

use crate::error::{Error, Result};

/// Which sparse layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Unstructured, compressed sparse columns.
    Element,
    /// 1×16 blocks.
    Block,
    /// N nonzeros in every M input channels.
    NM(u8, u8),
}

impl Format {
    /// `element`, `block`, `2:4`, …
    pub fn name(self) -> String {
        match self {
            Format::Element => "element".into(),
            Format::Block => "block".into(),
            Format::NM(n, m) => format!("{n}:{m}"),
        }
    }

    /// Parse [`Format::name`]'s spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "element" => Ok(Format::Element),
            "block" => Ok(Format::Block),
            _ => {
                let bad = || Error::invalid("sparse format", format!("expected element, block or N:M, got `{s}`"));
                let (n, m) = s.split_once(':').ok_or_else(bad)?;
                let (n, m) = (n.parse::<u8>().map_err(|_| bad())?, m.parse::<u8>().map_err(|_| bad())?);
                if n == 0 || m == 0 || n > m {
                    return Err(Error::invalid("--nm", format!("N:M needs 0 < N ≤ M, got {n}:{m}")));
                }
                Ok(Format::NM(n, m))
            }
        }
    }
}

/// Width of a [`Format::Block`] block (output channels).
pub const BLOCK: usize = 16;

/// One offset's nonzeros.
#[derive(Debug, Clone, PartialEq)]
pub enum OffsetWeights {
    /// Column `j` owns entries `starts[j]..starts[j + 1]` of `rows` (input channels) and `vals`.
    Columns {
        /// `Cout + 1` entries.
        starts: Vec<u32>,
        /// Input channel of each entry.
        rows: Vec<u32>,
        /// Value of each entry.
        vals: Vec<f32>,
    },
    /// Strip `s` (output channels `16s..16s + 16`) owns blocks `starts[s]..starts[s + 1]`.
    Blocks {
        /// `Cout / 16 + 1` entries.
        starts: Vec<u32>,
        /// Input channel of each block.
        rows: Vec<u32>,
        /// 16 values per block.
        vals: Vec<f32>,
    },
    /// Per output channel `j` and group `g` of M input channels: N values at
    /// `(j · Cin/M + g) · N ..` and their positions in the group.
    NM {
        /// Values, `[Cout, Cin / M, N]`.
        vals: Vec<f32>,
        /// Position of each value inside its group of M.
        idx: Vec<u8>,
    },
    /// All zero: the offset is skipped.
    Empty,
}

/// A conv's weights in a sparse format.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseWeights {
    /// The layout.
    pub format: Format,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// One entry per kernel offset.
    pub offsets: Vec<OffsetWeights>,
    /// Stored nonzeros (values, blocks counted at 16), for work accounting.
    pub stored: usize,
}

impl SparseWeights {
    /// Compress `kernel` (`[volume, cin, cout]`, pruned entries zero) into `format`. Fails when
    /// the zeros do not have the format's structure (more than N nonzeros in a group of M, or
    /// `Cin` not a multiple of M; `Cout` not a multiple of 16 for blocks).
    pub fn new(format: Format, kernel: &[f32], volume: usize, cin: usize, cout: usize) -> Result<Self> {
        if kernel.len() != volume * cin * cout {
            return Err(Error::tensor(
                "kernel",
                format!("expected [{volume}, {cin}, {cout}], got {} values", kernel.len()),
            ));
        }
        let mut offsets = Vec::with_capacity(volume);
        let mut stored = 0;
        for k in 0..volume {
            let w = &kernel[k * cin * cout..(k + 1) * cin * cout];
            if w.iter().all(|&v| v == 0.0) {
                offsets.push(OffsetWeights::Empty);
                continue;
            }
            let o = match format {
                Format::Element => {
                    let (mut starts, mut rows, mut vals) = (vec![0u32], Vec::new(), Vec::new());
                    for j in 0..cout {
                        for i in 0..cin {
                            let v = w[i * cout + j];
                            if v != 0.0 {
                                rows.push(i as u32);
                                vals.push(v);
                            }
                        }
                        starts.push(rows.len() as u32);
                    }
                    stored += vals.len();
                    OffsetWeights::Columns { starts, rows, vals }
                }
                Format::Block => {
                    if !cout.is_multiple_of(BLOCK) {
                        return Err(Error::invalid("block sparsity", format!("needs Cout % 16 == 0, got {cout}")));
                    }
                    let (mut starts, mut rows, mut vals) = (vec![0u32], Vec::new(), Vec::new());
                    for s in 0..cout / BLOCK {
                        for i in 0..cin {
                            let b = &w[i * cout + s * BLOCK..i * cout + (s + 1) * BLOCK];
                            if b.iter().any(|&v| v != 0.0) {
                                rows.push(i as u32);
                                vals.extend_from_slice(b);
                            }
                        }
                        starts.push(rows.len() as u32);
                    }
                    stored += vals.len();
                    OffsetWeights::Blocks { starts, rows, vals }
                }
                Format::NM(n, m) => {
                    let (n, m) = (n as usize, m as usize);
                    if !cin.is_multiple_of(m) {
                        return Err(Error::invalid("N:M sparsity", format!("M = {m} does not divide Cin = {cin}")));
                    }
                    let (mut vals, mut idx) = (Vec::new(), Vec::new());
                    for j in 0..cout {
                        for g in 0..cin / m {
                            let mut found = 0;
                            for p in 0..m {
                                let v = w[(g * m + p) * cout + j];
                                if v != 0.0 {
                                    found += 1;
                                    if found > n {
                                        return Err(Error::invalid(
                                            "N:M sparsity",
                                            format!(
                                                "offset {k}, output channel {j}: more than {n} nonzeros in input channels {}..{}",
                                                g * m,
                                                g * m + m
                                            ),
                                        ));
                                    }
                                    vals.push(v);
                                    idx.push(p as u8);
                                }
                            }
                            // Pad to exactly N entries (zeros at position 0 add nothing).
                            for _ in found..n {
                                vals.push(0.0);
                                idx.push(0);
                            }
                        }
                    }
                    stored += vals.len();
                    OffsetWeights::NM { vals, idx }
                }
            };
            offsets.push(o);
        }
        Ok(Self { format, cin, cout, offsets, stored })
    }

    /// Check the invariants the kernels rely on (the fields are public, so a hand-made value
    /// may break them): column/strip starts ascending within the entries, every row index below
    /// `cin`, N:M positions below M, lengths matching the shape.
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::tensor("sparse weights", msg));
        let (cin, cout) = (self.cin, self.cout);
        for (k, o) in self.offsets.iter().enumerate() {
            match o {
                OffsetWeights::Columns { starts, rows, vals } | OffsetWeights::Blocks { starts, rows, vals } => {
                    let (strips, per) = match o {
                        OffsetWeights::Columns { .. } => (cout, 1),
                        _ => (cout / BLOCK, BLOCK),
                    };
                    if matches!(o, OffsetWeights::Blocks { .. }) && !cout.is_multiple_of(BLOCK) {
                        return bad(format!("offset {k}: blocks need Cout % 16 == 0"));
                    }
                    if starts.len() != strips + 1
                        || starts[0] != 0
                        || starts.windows(2).any(|w| w[0] > w[1])
                        || starts[strips] as usize != rows.len()
                        || vals.len() != rows.len() * per
                    {
                        return bad(format!("offset {k}: starts, rows and values do not agree"));
                    }
                    if rows.iter().any(|&r| r as usize >= cin) {
                        return bad(format!("offset {k}: an input channel is not below {cin}"));
                    }
                }
                OffsetWeights::NM { vals, idx } => {
                    let Format::NM(n, m) = self.format else {
                        return bad(format!("offset {k}: N:M values in a {} kernel", self.format.name()));
                    };
                    let (n, m) = (n as usize, m as usize);
                    if m == 0 || !cin.is_multiple_of(m) || vals.len() != cout * cin / m * n || idx.len() != vals.len() {
                        return bad(format!("offset {k}: N:M values do not match [{cin}, {cout}]"));
                    }
                    if idx.iter().any(|&p| p as usize >= m) {
                        return bad(format!("offset {k}: an N:M position is not below {m}"));
                    }
                }
                OffsetWeights::Empty => {}
            }
        }
        Ok(())
    }

    /// Stored values over the dense kernel's (1 = dense).
    pub fn density(&self) -> f64 {
        self.stored as f64 / (self.offsets.len() * self.cin * self.cout).max(1) as f64
    }

    /// Back to a dense `[volume, cin, cout]` kernel (the reference the kernels are tested against).
    pub fn to_dense(&self) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let mut out = vec![0f32; self.offsets.len() * cin * cout];
        for (k, o) in self.offsets.iter().enumerate() {
            let w = &mut out[k * cin * cout..(k + 1) * cin * cout];
            match o {
                OffsetWeights::Columns { starts, rows, vals } => {
                    for j in 0..cout {
                        for e in starts[j] as usize..starts[j + 1] as usize {
                            w[rows[e] as usize * cout + j] = vals[e];
                        }
                    }
                }
                OffsetWeights::Blocks { starts, rows, vals } => {
                    for s in 0..cout / BLOCK {
                        for b in starts[s] as usize..starts[s + 1] as usize {
                            let i = rows[b] as usize;
                            w[i * cout + s * BLOCK..i * cout + (s + 1) * BLOCK]
                                .copy_from_slice(&vals[b * BLOCK..(b + 1) * BLOCK]);
                        }
                    }
                }
                OffsetWeights::NM { vals, idx } => {
                    let Format::NM(n, m) = self.format else { continue };
                    let (n, m) = (n as usize, m as usize);
                    for j in 0..cout {
                        for g in 0..cin / m {
                            for e in 0..n {
                                let p = (j * (cin / m) + g) * n + e;
                                if vals[p] != 0.0 {
                                    w[(g * m + idx[p] as usize) * cout + j] = vals[p];
                                }
                            }
                        }
                    }
                }
                OffsetWeights::Empty => {}
            }
        }
        out
    }
}

/// A pruning unit: its magnitude and the indices of its weights.
pub type Unit = (f64, Vec<usize>);

/// The units a kernel `[K, cin, cout]` is pruned in, with their magnitude: single weights
/// (`Element`, also used for N:M) or 1×16 blocks (`Block`, their L1); each unit's element
/// indices.
pub fn units(kernel: &[f32], cin: usize, cout: usize, format: Format) -> Vec<Unit> {
    let k = kernel.len() / (cin * cout).max(1);
    let mut out = Vec::new();
    for o in 0..k {
        let base = o * cin * cout;
        match format {
            Format::Block => {
                for i in 0..cin {
                    for s in 0..cout / BLOCK {
                        let idx: Vec<usize> = (0..BLOCK).map(|c| base + i * cout + s * BLOCK + c).collect();
                        out.push((idx.iter().map(|&e| kernel[e].abs() as f64).sum(), idx));
                    }
                }
            }
            Format::Element | Format::NM(..) => {
                out.extend((0..cin * cout).map(|e| (kernel[base + e].abs() as f64, vec![base + e])));
            }
        }
    }
    out
}

/// Positions of the `n` lowest scores (ties to the lower position).
pub fn lowest(scores: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

/// Keep the `n` largest of every `m` consecutive input channels of each output channel of a
/// kernel `[K, cin, cout]` (`m` must divide `cin`).
pub fn prune_nm(kernel: &mut [f32], cin: usize, cout: usize, n: usize, m: usize) {
    let k = kernel.len() / (cin * cout).max(1);
    for o in 0..k {
        for j in 0..cout {
            for g in 0..cin / m {
                let at = |p: usize| o * cin * cout + (g * m + p) * cout + j;
                let s: Vec<f64> = (0..m).map(|p| kernel[at(p)].abs() as f64).collect();
                for p in lowest(&s, m.saturating_sub(n)) {
                    kernel[at(p)] = 0.0;
                }
            }
        }
    }
}

/// Magnitude-prune one kernel in place to `format`: the `sparsity` fraction of its weights or
/// blocks with the least magnitude zeroed, or N:M (where `sparsity` is implied).
pub fn prune_kernel(kernel: &mut [f32], cin: usize, cout: usize, format: Format, sparsity: f64) {
    if let Format::NM(n, m) = format {
        prune_nm(kernel, cin, cout, n as usize, m as usize);
        return;
    }
    let u = units(kernel, cin, cout, format);
    let scores: Vec<f64> = u.iter().map(|x| x.0).collect();
    for i in lowest(&scores, ((u.len() as f64) * sparsity).round() as usize) {
        for &e in &u[i].1 {
            kernel[e] = 0.0;
        }
    }
}
