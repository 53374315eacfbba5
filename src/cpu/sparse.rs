//! Sparse-weight convolution on the CPU: gather → sparse GEMM → scatter, skipping the zeros of
//! a [`SparseWeights`] kernel.
//!
//! - Blocks (1×16): input rows are read in place and each nonzero block is one AVX-512 FMA per
//!   pair row with the row's input value broadcast, the dense fused kernel's inner step with the
//!   zero blocks left out.
//! - Element (compressed columns) and N:M: 16 pairs at a time, their input rows transposed into
//!   a `[Cin][16]` tile so that each nonzero weight is one 16-lane FMA; the 16 lanes are 16
//!   output rows, written back row by row.
//!
//! Work is split by output rows in fixed tiles (output-stationary, as the dense one-pass conv):
//! each task walks every offset's pairs into its rows while they sit in cache. Every pair of an
//! offset carries the same nonzeros, so tasks with equal rows get about equal nonzeros — the
//! load-balancing point of EIE/ESE (Han et al., 2016/2017) holds here without reordering. Every
//! output row receives the offsets' products in the map's canonical order, each in one add, so
//! the result has the same bits for any thread count.

use rayon::prelude::*;

use super::conv::Epilogue;
use crate::error::{Error, Result};
use crate::kmap::KernelMap;
use crate::sparse_weights::{Format, OffsetWeights, SparseWeights, BLOCK};

/// Output rows per task (fixed, so the split never depends on the thread count).
const TILE: usize = 128;

/// `relu?(Σ_k W[k]ᵀ · x[in(k, q)] + bias + residual)` for every output row `q`, with the
/// weights `w` in a sparse format.
pub fn conv_sparse(map: &KernelMap, x: &[f32], cin: usize, w: &SparseWeights, epi: Epilogue<'_>) -> Result<Vec<f32>> {
    let cout = w.cout;
    // The kernels index without bounds checks on the strength of this.
    w.check()?;
    if x.len() != map.n_in() * cin {
        return Err(Error::tensor("feats", format!("expected [{}, {cin}], got {} values", map.n_in(), x.len())));
    }
    if w.cin != cin || w.offsets.len() != map.volume() {
        return Err(Error::tensor(
            "kernel",
            format!(
                "sparse weights are [{}, {}, {cout}], the map and input need [{}, {cin}, {cout}]",
                w.offsets.len(),
                w.cin,
                map.volume()
            ),
        ));
    }
    if epi.bias.is_some_and(|b| b.len() != cout) {
        return Err(Error::tensor("bias", format!("expected [{cout}]")));
    }
    if epi.residual.is_some_and(|r| r.len() != map.n_out() * cout) {
        return Err(Error::tensor("residual", "does not match the conv output"));
    }
    let n_out = map.n_out();
    let mut out = vec![0f32; n_out * cout];
    let order: Vec<usize> = map
        .canonical_order()
        .into_iter()
        .filter(|&k| !matches!(w.offsets[k], OffsetWeights::Empty) && map.size(k) > 0)
        .collect();
    // Output-stationary: each task owns TILE output rows and walks every offset's pairs into
    // them while they sit in cache (pairs of an offset are sorted by output row).
    let starts = super::conv::TileStarts::new(map, TILE);
    out.par_chunks_mut(TILE * cout.max(1)).enumerate().for_each(|(t, tile)| {
        let lo = (t * TILE) as u32;
        for &k in &order {
            let (ins, outs) = starts.pairs(map, k, t);
            if !ins.is_empty() {
                offset_rows(Chunk { x, cin, w, ow: &w.offsets[k], ins, outs, base: lo, cout }, tile);
            }
        }
        for (r, row) in tile.chunks_mut(cout.max(1)).enumerate() {
            let q = lo as usize + r;
            if let Some(b) = epi.bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            if let Some(res) = epi.residual {
                row.iter_mut().zip(&res[q * cout..(q + 1) * cout]).for_each(|(v, r)| *v += r);
            }
            if epi.relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    });
    Ok(out)
}

/// One offset's pairs against one output tile: rows `ins` of `x` (`cin` wide) through the
/// offset's weights `ow` (of `w`), added into the `cout`-wide output rows `outs - base`.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    x: &'a [f32],
    cin: usize,
    w: &'a SparseWeights,
    ow: &'a OffsetWeights,
    ins: &'a [u32],
    outs: &'a [u32],
    base: u32,
    cout: usize,
}

/// `tile[outs[i] - base] += x[ins[i]] · W` for one offset's pairs.
fn offset_rows(c: Chunk<'_>, tile: &mut [f32]) {
    let Chunk { x, cin, ins, outs, base, cout, .. } = c;
    let rows = tile.len() / cout.max(1);
    let n_in = x.len() / cin.max(1);
    // The map is this crate's, but the kernels below index raw memory: check once per call.
    assert!(ins.iter().all(|&i| (i as usize) < n_in), "input row out of range");
    assert!(outs.iter().all(|&o| o >= base && ((o - base) as usize) < rows), "output row out of range");
    // SAFETY: every index was checked above; `tile` is exclusively ours.
    unsafe { offset_chunk(c, tile.as_mut_ptr()) }
}

/// # Safety
/// Every `ins[i]` is a row of `x`, every `outs[i] - base` a row of the `cout`-wide rows at
/// `out`, which no one else touches while this runs.
unsafe fn offset_chunk(c: Chunk<'_>, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features are present; the rest is the caller's.
        unsafe { avx512::chunk(c, out) };
        return;
    }
    // SAFETY: the caller's.
    unsafe { portable_chunk(c, out) }
}

/// # Safety
/// As `offset_chunk`.
#[inline(always)]
unsafe fn portable_chunk(c: Chunk<'_>, out: *mut f32) {
    let Chunk { x, cin, w, ow, ins, outs, base, cout } = c;
    const L: usize = 16;
    let mut xt = vec![0f32; cin * L];
    let mut tile = vec![0f32; L * cout];
    for (ti, to) in ins.chunks(L).zip(outs.chunks(L)) {
        let m = ti.len();
        // Transpose the tile's input rows: xt[i][l] = x[ins[l]][i] (unused lanes zero).
        xt.fill(0.0);
        for (l, &r) in ti.iter().enumerate() {
            let row = &x[r as usize * cin..(r as usize + 1) * cin];
            for (i, &v) in row.iter().enumerate() {
                xt[i * L + l] = v;
            }
        }
        tile.fill(0.0);
        let mut put = |j: usize, acc: [f32; L]| {
            for l in 0..m {
                tile[l * cout + j] = acc[l];
            }
        };
        match (ow, w.format) {
            (OffsetWeights::Columns { starts, rows, vals }, _) => {
                for j in 0..cout {
                    let r = starts[j] as usize..starts[j + 1] as usize;
                    put(j, column(&xt, rows[r.clone()].iter().map(|&i| i as usize).zip(vals[r].iter().copied())));
                }
            }
            (OffsetWeights::NM { vals, idx }, Format::NM(n, mm)) => {
                let (n, mm) = (n as usize, mm as usize);
                let per = cin / mm * n;
                for j in 0..cout {
                    let (v, ix) = (&vals[j * per..(j + 1) * per], &idx[j * per..(j + 1) * per]);
                    put(j, column(&xt, (0..per).map(|p| ((p / n) * mm + ix[p] as usize, v[p]))));
                }
            }
            (OffsetWeights::Blocks { starts, rows, vals }, _) => {
                // Portable fallback of the block kernel: per pair row, each block's 16 columns.
                for (l, &r) in ti.iter().enumerate() {
                    let xr = &x[r as usize * cin..(r as usize + 1) * cin];
                    for s in 0..cout / BLOCK {
                        let mut acc = [0f32; BLOCK];
                        for b in starts[s] as usize..starts[s + 1] as usize {
                            let a = xr[rows[b] as usize];
                            for c in 0..BLOCK {
                                acc[c] = a.mul_add(vals[b * BLOCK + c], acc[c]);
                            }
                        }
                        tile[l * cout + s * BLOCK..l * cout + (s + 1) * BLOCK].copy_from_slice(&acc);
                    }
                }
            }
            _ => {}
        }
        for (l, &o) in to.iter().enumerate() {
            // SAFETY: the caller owns row `o` of `out`.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add((o - base) as usize * cout), cout) };
            dst.iter_mut().zip(&tile[l * cout..(l + 1) * cout]).for_each(|(d, s)| *d += s);
        }
    }
}

/// One output channel of 16 pair rows: `Σ xt[i] · v` over its entries, in order.
#[inline(always)]
fn column(xt: &[f32], entries: impl Iterator<Item = (usize, f32)>) -> [f32; 16] {
    let mut acc = [0f32; 16];
    for (i, v) in entries {
        let xi: &[f32; 16] = xt[i * 16..(i + 1) * 16].try_into().unwrap_or(&[0.0; 16]);
        for l in 0..16 {
            acc[l] = xi[l].mul_add(v, acc[l]);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{portable_chunk, Chunk, OffsetWeights, BLOCK};

    /// The block kernel with intrinsics; the column formats through the portable code compiled
    /// with AVX-512 (its 16-lane loops become one FMA each).
    ///
    /// # Safety
    /// AVX-512F and FMA present; otherwise as `offset_chunk`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn chunk(c: Chunk<'_>, out: *mut f32) {
        let Chunk { x, cin, ow, ins, outs, base, cout, .. } = c;
        let OffsetWeights::Blocks { starts, rows, vals } = ow else {
            if x.len() <= i32::MAX as usize && matches!(ow, OffsetWeights::Columns { .. } | OffsetWeights::NM { .. }) {
                // SAFETY: forwarded; gather offsets fit i32 (checked).
                unsafe { columns(c, out) };
            } else {
                // SAFETY: forwarded.
                unsafe { portable_chunk(c, out) };
            }
            return;
        };
        const MR: usize = 12;
        let xp = x.as_ptr();
        let n = ins.len();
        let mut s0 = 0;
        while s0 < n {
            let m = (n - s0).min(MR);
            let mut rp = [xp; MR];
            for (r, p) in rp.iter_mut().enumerate() {
                // A short tail repeats its first row in the unused lanes (computed, never stored).
                let i = ins[s0 + if r < m { r } else { 0 }] as usize;
                // SAFETY: map indices are in range (the caller's contract).
                *p = unsafe { xp.add(i * cin) };
            }
            for s in 0..cout / BLOCK {
                let mut acc = [_mm512_setzero_ps(); MR];
                for b in starts[s] as usize..starts[s + 1] as usize {
                    let i = rows[b] as usize;
                    // SAFETY: block b holds 16 values.
                    let wv = unsafe { _mm512_loadu_ps(vals.as_ptr().add(b * BLOCK)) };
                    for r in 0..MR {
                        // SAFETY: i < cin: row r holds cin values.
                        let a = _mm512_set1_ps(unsafe { *rp[r].add(i) });
                        acc[r] = _mm512_fmadd_ps(a, wv, acc[r]);
                    }
                }
                for r in 0..m {
                    let o = (outs[s0 + r] - base) as usize;
                    // SAFETY: the caller owns row o; the strip stays inside cout.
                    unsafe {
                        let p = out.add(o * cout + s * BLOCK);
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc[r]));
                    }
                }
            }
            s0 += m;
        }
    }

    /// Compressed columns and N:M, 16 pairs at a time: the 16 input rows gathered transposed
    /// (`xt[i]` = input channel `i` of the 16 rows), one FMA per nonzero per output channel,
    /// the products staged per channel and gathered back into rows.
    ///
    /// # Safety
    /// AVX-512F and FMA present; `x.len()` fits i32; otherwise as `offset_chunk`.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn columns(c: Chunk<'_>, out: *mut f32) {
        let Chunk { x, cin, w, ow, ins, outs, base, cout } = c;
        let mut xt = vec![_mm512_setzero_ps(); cin];
        let mut tt = vec![0f32; cout * 16];
        let lanes = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
        for (ti, to) in ins.chunks(16).zip(outs.chunks(16)) {
            let m = ti.len();
            let mut idx = [0i32; 16];
            for (l, v) in idx.iter_mut().enumerate() {
                // Unused lanes repeat the first row (computed, never written back).
                *v = (ti[if l < m { l } else { 0 }] as usize * cin) as i32;
            }
            // SAFETY: idx holds 16 i32.
            let vidx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
            for (i, xi) in xt.iter_mut().enumerate() {
                // SAFETY: every row index is in range (caller) and i < cin.
                *xi = unsafe { _mm512_i32gather_ps::<4>(vidx, x.as_ptr().add(i)) };
            }
            let mut put = |j: usize, acc: __m512| {
                // SAFETY: j < cout: tt holds cout * 16 values.
                unsafe { _mm512_storeu_ps(tt.as_mut_ptr().add(j * 16), acc) };
            };
            match (ow, w.format) {
                (OffsetWeights::Columns { starts, rows, vals }, _) => {
                    // Four columns at a time: independent FMA chains in registers hide the FMA
                    // latency; each column still sums its entries in order.
                    let mut j = 0;
                    while j + 4 <= cout {
                        // SAFETY: columns j..j + 4 exist.
                        let acc = unsafe { csc_cols::<4>(&xt, starts, rows, vals, j) };
                        acc.iter().enumerate().for_each(|(c, &a)| put(j + c, a));
                        j += 4;
                    }
                    while j < cout {
                        // SAFETY: column j exists.
                        let acc = unsafe { csc_cols::<1>(&xt, starts, rows, vals, j) };
                        put(j, acc[0]);
                        j += 1;
                    }
                }
                (OffsetWeights::NM { vals, idx }, super::Format::NM(n, mm)) => {
                    let (n, mm) = (n as usize, mm as usize);
                    let mut j = 0;
                    while j + 8 <= cout {
                        // SAFETY: columns j..j + 8 exist.
                        let acc = unsafe { nm_cols::<8>(&xt, vals, idx, n, mm, cin, j) };
                        acc.iter().enumerate().for_each(|(c, &a)| put(j + c, a));
                        j += 8;
                    }
                    while j < cout {
                        // SAFETY: column j exists.
                        let acc = unsafe { nm_cols::<1>(&xt, vals, idx, n, mm, cin, j) };
                        put(j, acc[0]);
                        j += 1;
                    }
                }
                _ => return,
            }
            for (l, &o) in to.iter().enumerate() {
                // SAFETY: the caller owns row o - base.
                let row = unsafe { out.add((o - base) as usize * cout) };
                let mut j = 0;
                while j + 16 <= cout {
                    // SAFETY: tt[(j + c)·16 + l] for c < 16 lies inside tt; the row holds cout values.
                    unsafe {
                        let v = _mm512_i32gather_ps::<4>(lanes, tt.as_ptr().add(j * 16 + l));
                        let p = row.add(j);
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v));
                    }
                    j += 16;
                }
                for jj in j..cout {
                    // SAFETY: as above.
                    unsafe { *row.add(jj) += tt[jj * 16 + l] };
                }
            }
        }
    }

    /// Output channels `j..j + G` of compressed columns, each summed in entry order.
    ///
    /// # Safety
    /// AVX-512F and FMA present; the columns exist; the weights passed `check` (row indices
    /// below `xt.len()`, starts within the entries).
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn csc_cols<const G: usize>(
        xt: &[__m512],
        starts: &[u32],
        rows: &[u32],
        vals: &[f32],
        j: usize,
    ) -> [__m512; G] {
        let (xp, rp, vp) = (xt.as_ptr(), rows.as_ptr(), vals.as_ptr());
        let r: [(usize, usize); G] = std::array::from_fn(|c| (starts[j + c] as usize, starts[j + c + 1] as usize));
        let common = r.iter().map(|&(a, b)| b - a).min().unwrap_or(0);
        let mut acc = [_mm512_setzero_ps(); G];
        // SAFETY (all reads below): q < starts[j + c + 1] ≤ rows.len() = vals.len(), and every
        // row index is below xt.len() (`check`).
        for e in 0..common {
            for c in 0..G {
                let q = r[c].0 + e;
                unsafe {
                    acc[c] = _mm512_fmadd_ps(*xp.add(*rp.add(q) as usize), _mm512_set1_ps(*vp.add(q)), acc[c]);
                }
            }
        }
        for c in 0..G {
            for q in r[c].0 + common..r[c].1 {
                unsafe {
                    acc[c] = _mm512_fmadd_ps(*xp.add(*rp.add(q) as usize), _mm512_set1_ps(*vp.add(q)), acc[c]);
                }
            }
        }
        acc
    }

    /// Output channels `j..j + G` of an N:M kernel.
    ///
    /// # Safety
    /// AVX-512F and FMA present; the columns exist; the weights passed `check` and `xt` holds
    /// `cin` rows.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn nm_cols<const G: usize>(
        xt: &[__m512],
        vals: &[f32],
        idx: &[u8],
        n: usize,
        mm: usize,
        cin: usize,
        j: usize,
    ) -> [__m512; G] {
        let per = cin / mm * n;
        let (xp, vp, ip) = (xt.as_ptr(), vals.as_ptr(), idx.as_ptr());
        let mut acc = [_mm512_setzero_ps(); G];
        for grp in 0..cin / mm {
            for e in 0..n {
                let p = grp * n + e;
                for c in 0..G {
                    let q = (j + c) * per + p;
                    // SAFETY: q < cout·per = vals.len() = idx.len(); grp·mm + idx < cin (`check`).
                    unsafe {
                        let xi = *xp.add(grp * mm + *ip.add(q) as usize);
                        acc[c] = _mm512_fmadd_ps(xi, _mm512_set1_ps(*vp.add(q)), acc[c]);
                    }
                }
            }
        }
        acc
    }
}
