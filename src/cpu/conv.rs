//! Weight-stationary sparse convolution on the CPU: per offset group gather rows, GEMM, scatter-add.
//!
//! Determinism: every GEMM call has the same shape `(T, Cin, Cout)` (tails padded with
//! zero rows), so each product row has the same bits whichever tile or group computed it;
//! each output row then adds its terms in [`KernelMap::canonical_order`], and no two tasks
//! ever add into the same row at once. Output is bit-identical for any thread count and
//! any grouping.

use rayon::prelude::*;

use super::fused::{self, gather_gemm_scatter_add, gather_gemm_scatter_add_raw};
use super::gemm::{gemm_at_b_acc, gemm_tile, gemm_tile_raw};
use super::SharedMut;
use crate::error::{Error, Result};
use crate::kmap::KernelMap;
use crate::plan::Plan;

/// Rows per GEMM tile: operand tiles of about 256 KiB stay in L2. Depends only on the channels.
pub fn tile_rows(cin: usize, cout: usize) -> usize {
    let t = (65536 / (cin + cout).max(1)).clamp(32, 256);
    t / 16 * 16
}

/// Output rows per task of the output-tiled execution: four times a GEMM tile, so each
/// offset's share of a task still makes a reasonably tall GEMM (MinkUNet cr = 0.5 end to end:
/// 1024 rows ran 8% faster than 256 and 2048 in an interleaved A/B on the real scan).
pub const OUTPUT_TILE_ROWS: usize = 1024;

/// Output rows per task of the ordered scatter of a batched group.
const SCATTER_CHUNK: usize = 512;

/// What follows the convolution, fused into one pass over the output:
/// `out = relu?(out + bias + residual)`, in that order.
#[derive(Debug, Default, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per-channel bias `[Cout]` (a folded BatchNorm's shift).
    pub bias: Option<&'a [f32]>,
    /// A tensor `[N_out, Cout]` to add (residual shortcut).
    pub residual: Option<&'a [f32]>,
    /// Clamp at zero afterwards.
    pub relu: bool,
    /// Output rows a voxel-pruned conv does not compute (output-tiled plans only): their
    /// pairs are never gathered or multiplied, and the epilogue writes their fill instead.
    pub pruned: Option<PrunedRows<'a>>,
}

/// The output rows a voxel-pruned conv skips, and what they hold (see
/// [`crate::voxel_prune::Fill`]).
#[derive(Debug, Clone, Copy)]
pub struct PrunedRows<'a> {
    /// `keep[q]`: output row `q` is computed; `[N_out]`.
    pub keep: &'a [bool],
    /// What every other row holds.
    pub fill: RowFill<'a>,
}

/// The value of a pruned output row.
#[derive(Debug, Clone, Copy)]
pub enum RowFill<'a> {
    /// The same row of this tensor (`[N_out, Cout]`, the layer's input where `Cin = Cout`).
    Copy(&'a [f32]),
    /// The residual, clamped when the epilogue clamps (a block reduced to its shortcut); zero
    /// without a residual.
    Residual,
}

/// `out[q] = Σ_k W[k]ᵀ · x[in(k, q)] (+ bias)` over the pairs of `map`, executed by `plan`.
pub fn conv_forward(
    map: &KernelMap,
    plan: &Plan,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    conv_forward_ex(map, plan, x, cin, w, cout, Epilogue { bias, ..Default::default() })
}

/// [`conv_forward`] with a fused epilogue (bias, residual add, ReLU).
pub fn conv_forward_ex(
    map: &KernelMap,
    plan: &Plan,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    epi: Epilogue<'_>,
) -> Result<Vec<f32>> {
    let bias = epi.bias;
    map.check_operands(x, cin, w, cout, bias)?;
    plan.check(map)?;
    epi.check(map.n_out(), cout)?;
    let n_out = map.n_out();
    if cout == 0 || n_out == 0 {
        return Ok(vec![0f32; n_out * cout]);
    }
    let t = tile_rows(cin, cout);
    if plan.output_tiled {
        return Ok(output_tiled_layer(map, plan, x, cin, w, cout, epi, t));
    }
    if epi.pruned.is_some() {
        return Err(Error::invalid("voxel pruning", "pruned output rows need an output-tiled plan"));
    }
    let wk = |k: usize| &w[k * cin * cout..(k + 1) * cin * cout];
    // A submanifold conv starts with its identity offset, which writes every output row:
    // build the output from it directly instead of zeroing memory first.
    let first_is_identity = plan.groups.first().is_some_and(|g| {
        g.offsets.len() == 1 && Some(g.offsets[0]) == map.identity() && map.size(g.offsets[0]) == n_out
    });
    let (mut out, skip) = if first_is_identity {
        (identity_init(x, cin, wk(plan.groups[0].offsets[0]), cout, n_out, t), 1)
    } else {
        (vec![0f32; n_out * cout], 0)
    };
    // Where each scatter task's pairs start: found once per conv, for every batched group.
    let mut starts = None;
    for (gi, g) in plan.groups.iter().enumerate().skip(skip) {
        if g.offsets.len() == 1 && Some(g.offsets[0]) == map.identity() {
            identity(x, cin, wk(g.offsets[0]), cout, &mut out, t, gi == 0);
        } else if g.offsets.len() == 1 {
            fused(map, g.offsets[0], x, cin, wk(g.offsets[0]), cout, &mut out, t);
        } else {
            let starts = starts.get_or_insert_with(|| TileStarts::new(map, SCATTER_CHUNK));
            batched(map, starts, &g.offsets, g.padded_rows, x, cin, w, cout, &mut out, t);
        }
    }
    if bias.is_some() || epi.residual.is_some() || epi.relu {
        out.par_chunks_mut(SCATTER_CHUNK * cout)
            .enumerate()
            .for_each(|(ci, oc)| epi.apply(oc, cout, ci * SCATTER_CHUNK));
    }
    Ok(out)
}

impl Epilogue<'_> {
    /// Check the residual's and the bias's shapes against an output `[n_out, cout]`.
    pub(crate) fn check(&self, n_out: usize, cout: usize) -> Result<()> {
        if let Some(r) = self.residual {
            if r.len() != n_out * cout {
                return Err(Error::tensor("residual", format!("expected [{n_out}, {cout}], got {} values", r.len())));
            }
        }
        if let Some(b) = self.bias {
            if b.len() != cout {
                return Err(Error::tensor("bias", format!("expected [{cout}], got [{}]", b.len())));
            }
        }
        if let Some(p) = self.pruned {
            if p.keep.len() != n_out {
                return Err(Error::tensor("kept rows", format!("{} flags for {n_out} output rows", p.keep.len())));
            }
            if let RowFill::Copy(f) = p.fill {
                if f.len() != n_out * cout {
                    return Err(Error::tensor(
                        "pruned-row fill",
                        format!("expected [{n_out}, {cout}], got {} values", f.len()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`Epilogue::apply`] on every row of `oc` (one vectorized pass, so the computed rows get
    /// exactly its bits), then the fill over the pruned rows.
    fn apply_pruned(&self, p: PrunedRows<'_>, oc: &mut [f32], cout: usize, first_row: usize) {
        Epilogue { pruned: None, ..*self }.apply(oc, cout, first_row);
        let rows = oc.len() / cout;
        let keep = &p.keep[first_row..first_row + rows];
        let pruned = keep.iter().enumerate().filter(|(_, &k)| !k).map(|(r, _)| r);
        let at = |r: usize| (first_row + r) * cout..(first_row + r + 1) * cout;
        match (p.fill, self.residual) {
            (RowFill::Copy(f), _) => pruned.for_each(|r| oc[r * cout..(r + 1) * cout].copy_from_slice(&f[at(r)])),
            (RowFill::Residual, Some(res)) if self.relu => pruned.for_each(|r| {
                for (o, &v) in oc[r * cout..(r + 1) * cout].iter_mut().zip(&res[at(r)]) {
                    *o = v.max(0.0);
                }
            }),
            (RowFill::Residual, Some(res)) => {
                pruned.for_each(|r| oc[r * cout..(r + 1) * cout].copy_from_slice(&res[at(r)]))
            }
            (RowFill::Residual, None) => pruned.for_each(|r| oc[r * cout..(r + 1) * cout].fill(0.0)),
        }
    }

    /// Apply to the rows `oc` (`[rows, cout]`), the first of which is output row `first_row`.
    /// Per element: `+ bias`, then `+ residual`, then the clamp (one order for every path), in
    /// one pass per case so that each loop vectorizes.
    pub(crate) fn apply(&self, oc: &mut [f32], cout: usize, first_row: usize) {
        if cout == 0 {
            return;
        }
        if let Some(p) = self.pruned {
            return self.apply_pruned(p, oc, cout, first_row);
        }
        let res = self.residual.map(|r| &r[first_row * cout..first_row * cout + oc.len()]);
        match (self.relu, self.bias, res) {
            (false, None, None) => {}
            (true, b, r) => apply_rows::<true>(oc, cout, b, r),
            (false, b, r) => apply_rows::<false>(oc, cout, b, r),
        }
    }
}

/// See [`Epilogue::apply`].
#[inline(always)]
fn apply_rows<const RELU: bool>(oc: &mut [f32], cout: usize, bias: Option<&[f32]>, res: Option<&[f32]>) {
    let clamp = |v: f32| if RELU { v.max(0.0) } else { v };
    match (bias, res) {
        (Some(b), Some(r)) => {
            for (row, rr) in oc.chunks_exact_mut(cout).zip(r.chunks_exact(cout)) {
                for ((o, &bv), &rv) in row.iter_mut().zip(b).zip(rr) {
                    *o = clamp(*o + bv + rv);
                }
            }
        }
        (Some(b), None) => {
            for row in oc.chunks_exact_mut(cout) {
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o = clamp(*o + bv);
                }
            }
        }
        (None, Some(r)) => {
            for (o, &rv) in oc.iter_mut().zip(r) {
                *o = clamp(*o + rv);
            }
        }
        (None, None) => {
            for o in oc.iter_mut() {
                *o = clamp(*o);
            }
        }
    }
}

#[inline(always)]
fn add_row(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Make a scratch buffer at least `n` long (never shrinks: tasks reuse it across calls).
#[inline]
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Gather rows `idx` of `x` into a `[t, cin]` tile (zero rows past `idx.len()`).
#[inline]
fn gather(x: &[f32], cin: usize, idx: &[u32], a: &mut [f32]) {
    for (r, &p) in idx.iter().enumerate() {
        let p = p as usize;
        a[r * cin..(r + 1) * cin].copy_from_slice(&x[p * cin..(p + 1) * cin]);
    }
    a[idx.len() * cin..].fill(0.0);
}

/// The submanifold centre: input row i feeds output row i, so one dense GEMM with no gather.
fn identity(x: &[f32], cin: usize, wk: &[f32], cout: usize, out: &mut [f32], t: usize, first: bool) {
    out.par_chunks_mut(t * cout).enumerate().for_each_init(
        || (vec![0f32; t * cin], vec![0f32; t * cout]),
        |(a, c), (ci, oc)| {
            let rows = oc.len() / cout;
            let xs = &x[ci * t * cin..(ci * t + rows) * cin];
            let lhs: &[f32] = if rows == t {
                xs
            } else {
                a[..rows * cin].copy_from_slice(xs);
                a[rows * cin..].fill(0.0);
                a
            };
            if first && rows == t {
                gemm_tile(t, cin, cout, lhs, wk, oc);
            } else {
                gemm_tile(t, cin, cout, lhs, wk, c);
                if first {
                    oc.copy_from_slice(&c[..rows * cout]);
                } else {
                    for r in 0..rows {
                        add_row(&mut oc[r * cout..(r + 1) * cout], &c[r * cout..(r + 1) * cout]);
                    }
                }
            }
        },
    );
}

/// The identity offset as the first term: `out = x · W` into fresh memory, never zeroed.
fn identity_init(x: &[f32], cin: usize, wk: &[f32], cout: usize, n: usize, t: usize) -> Vec<f32> {
    let scratch = || (vec![0f32; t * cin], vec![0f32; t * cout]);
    let fill = |(a, c): &mut (Vec<f32>, Vec<f32>), ci: usize, oc: &mut [std::mem::MaybeUninit<f32>]| {
        let rows = oc.len() / cout;
        let xs = &x[ci * t * cin..(ci * t + rows) * cin];
        if rows == t {
            // SAFETY: `oc` holds t * cout elements; gemm writes all of them and reads none.
            unsafe { gemm_tile_raw(t, cin, cout, xs, wk, oc.as_mut_ptr().cast::<f32>()) };
        } else {
            a[..rows * cin].copy_from_slice(xs);
            a[rows * cin..].fill(0.0);
            gemm_tile(t, cin, cout, a, wk, c);
            for (d, s) in oc.iter_mut().zip(&c[..rows * cout]) {
                d.write(*s);
            }
        }
    };
    // SAFETY: both branches of `fill` write every element of the chunk.
    unsafe { filled_in_parallel(n * cout, t * cout, scratch, fill) }
}

/// A `Vec` of `len` values written in parallel chunks of `chunk` values (chunk `ci`
/// starts at value `ci * chunk`), never zeroed first: outputs that their first term writes
/// in full skip a pass over memory.
///
/// # Safety
/// `fill` must write every element of every chunk it is given.
pub(crate) unsafe fn filled_in_parallel<T: Copy + Send + Sync, S: Send>(
    len: usize,
    chunk: usize,
    scratch: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut out: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { out.set_len(len) };
    out.par_chunks_mut(chunk.max(1)).enumerate().for_each_init(scratch, |sc, (ci, oc)| fill(sc, ci, oc));
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: the caller's `fill` initialized every element; same allocation, layout-compatible type.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<T>(), out.len(), out.capacity()) }
}

/// One offset alone: tiles of pairs, each gathered, multiplied and scattered by one task.
/// Within one offset every output row occurs once, so tasks never touch the same row.
#[allow(clippy::too_many_arguments)]
fn fused(map: &KernelMap, k: usize, x: &[f32], cin: usize, wk: &[f32], cout: usize, out: &mut [f32], t: usize) {
    let (ins, outs) = map.pairs(k);
    let rows = out.len() / cout;
    let op = SharedMut(out.as_mut_ptr());
    ins.par_chunks(t).zip(outs.par_chunks(t)).for_each_init(
        || (Vec::new(), Vec::new()),
        |(a, c): &mut (Vec<f32>, Vec<f32>), (ic, oc)| {
            // SAFETY: output rows of one offset are distinct, so tasks write disjoint rows.
            if unsafe { gather_gemm_scatter_add_raw(x, cin, wk, cout, ic, oc, 0, op.get(), rows) } {
                return;
            }
            a.resize(t * cin, 0.0);
            c.resize(t * cout, 0.0);
            gather(x, cin, ic, a);
            gemm_tile(t, cin, cout, a, wk, c);
            for (r, &q) in oc.iter().enumerate() {
                // SAFETY: output rows of one offset are distinct, so tasks write disjoint rows.
                let dst = unsafe { std::slice::from_raw_parts_mut(op.get().add(q as usize * cout), cout) };
                add_row(dst, &c[r * cout..(r + 1) * cout]);
            }
        },
    );
}

/// Several offsets as one padded batched GEMM `[G, Mpad, Cin] × [G, Cin, Cout]`, then an
/// ordered scatter parallel over output rows (offsets of a group share output rows).
#[allow(clippy::too_many_arguments)]
fn batched(
    map: &KernelMap,
    starts: &TileStarts,
    offsets: &[usize],
    padded_rows: usize,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    out: &mut [f32],
    t: usize,
) {
    let mpad = padded_rows.div_ceil(t) * t;
    // Zeroed allocation maps pages lazily: padding tiles that hold no pair are never touched.
    let mut buf = vec![0f32; offsets.len() * mpad * cout];
    let jobs: Vec<(usize, usize)> = offsets
        .iter()
        .enumerate()
        .flat_map(|(g, &k)| (0..map.size(k).div_ceil(t)).map(move |tile| (g, tile)))
        .collect();
    let bp = SharedMut(buf.as_mut_ptr());
    jobs.par_iter().for_each_init(
        || vec![0f32; t * cin],
        |a, &(g, tile)| {
            let k = offsets[g];
            let (ins, _) = map.pairs(k);
            let lo = tile * t;
            let hi = (lo + t).min(ins.len());
            gather(x, cin, &ins[lo..hi], a);
            // SAFETY: each job owns rows [g*mpad + lo, g*mpad + lo + t) of the buffer.
            let c = unsafe { std::slice::from_raw_parts_mut(bp.get().add((g * mpad + lo) * cout), t * cout) };
            gemm_tile(t, cin, cout, a, &w[k * cin * cout..(k + 1) * cin * cout], c);
        },
    );
    let buf = &buf;
    out.par_chunks_mut(SCATTER_CHUNK * cout).enumerate().for_each(|(ci, oc)| {
        let lo = (ci * SCATTER_CHUNK) as u32;
        for (g, &k) in offsets.iter().enumerate() {
            let (_, outs) = map.pairs(k);
            let span = starts.range(k, ci);
            for (p, &q) in outs[span.clone()].iter().enumerate().map(|(i, q)| (span.start + i, q)) {
                let r = (q - lo) as usize;
                let row = g * mpad + p;
                add_row(&mut oc[r * cout..(r + 1) * cout], &buf[row * cout..(row + 1) * cout]);
            }
        }
    });
}

/// An output-tiled plan in one pass over the output. Each task owns a run of output rows and,
/// while they stay in cache, writes the identity product (or zeros), then offset by offset in
/// plan order gathers the inputs of its rows, multiplies and adds into them, then applies the
/// epilogue. Per element these are the operations of the identity, offset and epilogue passes
/// run one after another, in the same order (the same bits), without two more trips through
/// memory for the whole output. Outputs in key order gather inputs from a narrow key window, so
/// the gathers hit cache far more than per-offset passes over the whole output would.
#[allow(clippy::too_many_arguments)]
fn output_tiled_layer(
    map: &KernelMap,
    plan: &Plan,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    epi: Epilogue<'_>,
    t: usize,
) -> Vec<f32> {
    let n_out = map.n_out();
    let wk = |k: usize| &w[k * cin * cout..(k + 1) * cin * cout];
    // The dense identity path needs every output row to be its own input row.
    let is_dense_identity = |g: &crate::plan::Group| {
        g.offsets.len() == 1 && Some(g.offsets[0]) == map.identity() && map.size(g.offsets[0]) == n_out
    };
    // Whole `t`-row chunks per task, aligned as in `identity`, so its GEMM calls are the same.
    let keep = epi.pruned.map(|p| p.keep);
    let task_rows = (kept_tile_rows(keep) / t).max(1) * t;
    let fused_kernel = fused::available(cout);
    let starts = TileStarts::new(map, task_rows);
    let fill = |sc: &mut Scratch, ci: usize, oc: &mut [std::mem::MaybeUninit<f32>]| {
        let lo = ci * task_rows;
        let rows = oc.len() / cout;
        if keep.is_some_and(|k| !k[lo..lo + rows].contains(&true)) {
            // Nothing computed here: the epilogue writes every row's fill.
            for d in oc.iter_mut() {
                d.write(0.0);
            }
            // SAFETY: every element was written just above; same layout.
            let oc = unsafe { std::slice::from_raw_parts_mut(oc.as_mut_ptr().cast::<f32>(), oc.len()) };
            epi.apply(oc, cout, lo);
            return;
        }
        let Scratch { a, c, ins: ki, outs: ko } = sc;
        // With pruned rows the identity offset runs through the pair kernel on the kept rows.
        let first_dense = keep.is_none() && plan.groups.first().is_some_and(is_dense_identity);
        if first_dense {
            identity_rows(x, cin, wk(plan.groups[0].offsets[0]), cout, lo, rows, t, a, c, |r0, prod| {
                for (d, s) in oc[r0 * cout..r0 * cout + prod.len()].iter_mut().zip(prod) {
                    d.write(*s);
                }
            });
        } else {
            for d in oc.iter_mut() {
                d.write(0.0);
            }
        }
        // SAFETY: every element of `oc` was written just above; same layout.
        let oc = unsafe { std::slice::from_raw_parts_mut(oc.as_mut_ptr().cast::<f32>(), oc.len()) };
        for g in &plan.groups[usize::from(first_dense)..] {
            if keep.is_none() && is_dense_identity(g) {
                identity_rows(x, cin, wk(g.offsets[0]), cout, lo, rows, t, a, c, |r0, prod| {
                    for (r, p) in prod.chunks_exact(cout).enumerate() {
                        add_row(&mut oc[(r0 + r) * cout..(r0 + r + 1) * cout], p);
                    }
                });
                continue;
            }
            for &k in &g.offsets {
                let (ins, outs) = starts.pairs(map, k, ci);
                let (ins, outs) = match keep {
                    // The kept rows' pairs, in the map's order (as `KernelMap::for_outputs` keeps them).
                    Some(kf) => kept_pairs(ins, outs, kf, ki, ko),
                    None => (ins, outs),
                };
                add_pair_rows(ins, outs, x, cin, wk(k), cout, lo as u32, oc, fused_kernel, a, c);
            }
        }
        epi.apply(oc, cout, lo);
    };
    // SAFETY: `fill` writes each chunk in full first (identity products or zeros).
    unsafe { filled_in_parallel(n_out * cout, task_rows * cout, Scratch::default, fill) }
}

/// Output rows per task of an output-tiled conv: [`OUTPUT_TILE_ROWS`], or for a voxel-pruned
/// conv enough rows that a task still computes about that many (up to 8 times as many rows):
/// each offset's share of a task then stays as tall as unpruned, so the weights loaded per
/// share serve as many rows. Rows are independent, so the bits do not depend on it.
pub(crate) fn kept_tile_rows(keep: Option<&[bool]>) -> usize {
    let Some(keep) = keep else { return OUTPUT_TILE_ROWS };
    let kept = keep.iter().filter(|&&k| k).count().max(1);
    let scale = (keep.len() as f64 / kept as f64).clamp(1.0, 8.0);
    (OUTPUT_TILE_ROWS as f64 * scale) as usize
}

/// Per-task buffers of the output-tiled execution: GEMM operands, and the kept pairs of one
/// offset in one tile (voxel-pruned convs).
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    c: Vec<f32>,
    ins: Vec<u32>,
    outs: Vec<u32>,
}

/// The pairs of `ins`/`outs` whose output row `keep` marks, in their order, in `ki`/`ko`
/// (grown as needed, never shrunk). Written without a branch: which rows a voxel-pruned conv
/// keeps is as good as random, and a branch per pair mispredicts half the time.
pub(crate) fn kept_pairs<'a>(
    ins: &[u32],
    outs: &[u32],
    keep: &[bool],
    ki: &'a mut Vec<u32>,
    ko: &'a mut Vec<u32>,
) -> (&'a [u32], &'a [u32]) {
    if ki.len() < ins.len() {
        ki.resize(ins.len(), 0);
        ko.resize(ins.len(), 0);
    }
    let mut j = 0;
    for (&i, &o) in ins.iter().zip(outs) {
        ki[j] = i;
        ko[j] = o;
        j += usize::from(keep[o as usize]);
    }
    (&ki[..j], &ko[..j])
}

/// Where each task's pairs begin in every offset's pair list, for tasks of `rows` output rows
/// (a map's pairs ascend by output row within an offset). Found once per conv, walking each
/// list forward from the previous task's start, instead of two binary searches per task and
/// offset over the whole list (3–5% of a large-map conv in a one-thread profile; end to end
/// the difference is within noise, BENCHMARKS.md).
pub(crate) struct TileStarts {
    tasks: usize,
    /// `starts[k * (tasks + 1) + t]`: offset `k`'s first pair with output row ≥ `t · rows`.
    starts: Vec<u32>,
}

impl TileStarts {
    pub(crate) fn new(map: &KernelMap, rows: usize) -> Self {
        let tasks = map.n_out().div_ceil(rows.max(1));
        let mut starts = vec![0u32; map.volume() * (tasks + 1)];
        for (k, st) in starts.chunks_exact_mut(tasks + 1).enumerate() {
            let (_, outs) = map.pairs(k);
            let mut at = 0usize;
            for (t, s) in st.iter_mut().enumerate() {
                let bound = (t * rows).min(map.n_out()) as u32;
                // Galloping from the last start: tasks hold similar numbers of pairs.
                let mut step = 1;
                while at + step < outs.len() && outs[at + step] < bound {
                    step *= 2;
                }
                let end = (at + step).min(outs.len());
                at += outs[at..end].partition_point(|&q| q < bound);
                *s = at as u32;
            }
        }
        Self { tasks, starts }
    }

    /// Where in offset `k`'s pair list the pairs of task `task` lie.
    pub(crate) fn range(&self, k: usize, task: usize) -> std::ops::Range<usize> {
        let at = k * (self.tasks + 1) + task;
        self.starts[at] as usize..self.starts[at + 1] as usize
    }

    /// Offset `k`'s pairs whose output row falls in task `task`.
    pub(crate) fn pairs<'m>(&self, map: &'m KernelMap, k: usize, task: usize) -> (&'m [u32], &'m [u32]) {
        let (ins, outs) = map.pairs(k);
        let r = self.range(k, task);
        (&ins[r.clone()], &outs[r])
    }
}

/// The identity offset's products for output rows `lo..lo + rows`, in chunks of `t` rows
/// (the tail padded with zero rows) exactly as [`identity`] computes them; `emit(r0, products)`
/// receives each chunk's real rows, `r0` relative to `lo`.
#[allow(clippy::too_many_arguments)]
fn identity_rows(
    x: &[f32],
    cin: usize,
    wk: &[f32],
    cout: usize,
    lo: usize,
    rows: usize,
    t: usize,
    a: &mut Vec<f32>,
    c: &mut Vec<f32>,
    mut emit: impl FnMut(usize, &[f32]),
) {
    grow(a, t * cin);
    grow(c, t * cout);
    let (a, c) = (&mut a[..t * cin], &mut c[..t * cout]);
    for r0 in (0..rows).step_by(t) {
        let r = t.min(rows - r0);
        let xs = &x[(lo + r0) * cin..(lo + r0 + r) * cin];
        let lhs: &[f32] = if r == t {
            xs
        } else {
            a[..r * cin].copy_from_slice(xs);
            a[r * cin..].fill(0.0);
            a
        };
        gemm_tile(t, cin, cout, lhs, wk, c);
        emit(r0, &c[..r * cout]);
    }
}

/// Add the products of one offset's pairs `ins`/`outs` (outputs in `lo..`) into the output
/// rows held in `oc`: the fused kernel where it applies, else gather, `gemm` and add.
#[allow(clippy::too_many_arguments)]
fn add_pair_rows(
    ins: &[u32],
    outs: &[u32],
    x: &[f32],
    cin: usize,
    wk: &[f32],
    cout: usize,
    lo: u32,
    oc: &mut [f32],
    fused_kernel: bool,
    a: &mut Vec<f32>,
    c: &mut Vec<f32>,
) {
    let m = ins.len();
    if m == 0 {
        return;
    }
    if fused_kernel && gather_gemm_scatter_add(x, cin, wk, cout, ins, outs, lo, oc) {
        return;
    }
    // Rows padded to a multiple of 16 (never 1: the GEMM crate's m = 1 path sums in another
    // order, and every path must give the same bits per row).
    let mp = m.div_ceil(16) * 16;
    grow(a, mp * cin);
    grow(c, mp * cout);
    gather(x, cin, ins, &mut a[..mp * cin]);
    gemm_tile(mp, cin, cout, &a[..mp * cin], wk, &mut c[..mp * cout]);
    for (r, &q) in outs.iter().enumerate() {
        let q = (q - lo) as usize;
        add_row(&mut oc[q * cout..(q + 1) * cout], &c[r * cout..(r + 1) * cout]);
    }
}

/// Gradients of `out = conv(x; W) + b` for an upstream gradient `dy = dL/d out` (`[N_out, Cout]`):
/// `dx` runs the transposed map with `W[k]ᵀ` (same pairs, no new search); `dW[k]` sums
/// `x[in]ᵀ · dy[out]` over the pairs of offset k; `db` sums `dy` over rows.
///
/// Deterministic: `dx` is a forward conv (see the module note); each `dW[k]` adds its tiles in
/// pair order; `db` adds fixed row blocks in order.
pub struct ConvGrads {
    /// `dL/dx`, `[N_in, Cin]` (when asked for).
    pub dx: Option<Vec<f32>>,
    /// `dL/dW`, `[K, Cin, Cout]`.
    pub dw: Vec<f32>,
    /// `dL/db`, `[Cout]`.
    pub db: Vec<f32>,
}

/// See [`ConvGrads`]. `tmap` must be `map.transposed()`; `dx_plan` is the plan of the input
/// gradient, a conv over `tmap`.
#[allow(clippy::too_many_arguments)]
pub fn conv_backward(
    map: &KernelMap,
    tmap: &KernelMap,
    dx_plan: &Plan,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    dy: &[f32],
    need_dx: bool,
) -> Result<ConvGrads> {
    map.check_operands(x, cin, w, cout, None)?;
    if dy.len() != map.n_out() * cout {
        return Err(Error::tensor("grad", format!("expected [{}, {cout}], got {} values", map.n_out(), dy.len())));
    }
    let kv = map.volume();
    let dx = if need_dx {
        let mut wt = vec![0f32; kv * cout * cin];
        for k in 0..kv {
            for i in 0..cin {
                for o in 0..cout {
                    wt[(k * cout + o) * cin + i] = w[(k * cin + i) * cout + o];
                }
            }
        }
        Some(conv_forward(tmap, dx_plan, dy, cout, &wt, cin, None)?)
    } else {
        None
    };
    // dW_k = Σ x[in]ᵀ · dy[out] over offset k's pairs, in fixed chunks of pairs (so small
    // kernels, e.g. 1×1 shortcuts, still use every thread), partial sums added in chunk order:
    // the same bits for any thread count.
    const CHUNK: usize = 16_384;
    let t = tile_rows(cin, cout);
    let tasks: Vec<(usize, usize)> =
        (0..kv).flat_map(|k| (0..map.size(k)).step_by(CHUNK).map(move |start| (k, start))).collect();
    let partials: Vec<(usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(k, start)| {
            let (ins, outs) = map.pairs(k);
            let end = (start + CHUNK).min(ins.len());
            let mut acc = vec![0f32; cin * cout];
            if map.identity() == Some(k) {
                // Pairs (r, r) for every row: the rows are contiguous, no gather needed.
                gemm_at_b_acc(
                    end - start,
                    cin,
                    cout,
                    &x[start * cin..end * cin],
                    &dy[start * cout..end * cout],
                    &mut acc,
                );
                return (k, acc);
            }
            let mut a = vec![0f32; t * cin];
            let mut b = vec![0f32; t * cout];
            for (ic, oc) in ins[start..end].chunks(t).zip(outs[start..end].chunks(t)) {
                gather(x, cin, ic, &mut a);
                gather(dy, cout, oc, &mut b);
                // acc += aᵀ · b (zero padding rows add nothing).
                gemm_at_b_acc(t, cin, cout, &a, &b, &mut acc);
            }
            (k, acc)
        })
        .collect();
    let mut dw = vec![0f32; kv * cin * cout];
    for (k, acc) in partials {
        add_row(&mut dw[k * cin * cout..(k + 1) * cin * cout], &acc);
    }
    const BLOCK: usize = 4096;
    let partial: Vec<Vec<f32>> = dy
        .par_chunks(BLOCK * cout.max(1))
        .map(|blk| {
            let mut s = vec![0f32; cout];
            for row in blk.chunks_exact(cout.max(1)) {
                add_row(&mut s, row);
            }
            s
        })
        .collect();
    let mut db = vec![0f32; cout];
    for p in &partial {
        add_row(&mut db, p);
    }
    Ok(ConvGrads { dx, dw, db })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bench::pseudo_random;
    use crate::{CoordSet, KernelSpec, MapBuilder};

    /// Each task's pairs are exactly those a binary search for its row range finds, for task
    /// sizes from one row to more than the map, on submanifold and downsampling maps (offsets
    /// with no pairs, tasks with none, and a last task shorter than the rest included).
    #[test]
    fn tile_starts_match_a_binary_search_per_task() {
        let r = pseudo_random(3 * 4000, 7, 20.0);
        let mut coords: Vec<[i32; 4]> = r.chunks_exact(3).map(|c| [0, c[0] as i32, c[1] as i32, c[2] as i32]).collect();
        coords.sort_unstable();
        coords.dedup();
        let set = Arc::new(CoordSet::new(coords, 1).expect("coords"));
        for spec in [KernelSpec::new(3, 1, 1), KernelSpec::new(2, 2, 1), KernelSpec::new(5, 1, 2)] {
            let map = crate::cpu::build_map(MapBuilder::Sort, &set, spec.expect("spec")).expect("map");
            for rows in [1usize, 7, 64, 1000, map.n_out(), map.n_out() + 5] {
                let starts = TileStarts::new(&map, rows);
                for task in 0..map.n_out().div_ceil(rows) {
                    let (lo, hi) = ((task * rows) as u32, ((task + 1) * rows).min(map.n_out()) as u32);
                    for k in 0..map.volume() {
                        let (ins, outs) = map.pairs(k);
                        let (s, e) = (outs.partition_point(|&q| q < lo), outs.partition_point(|&q| q < hi));
                        assert_eq!(
                            starts.pairs(&map, k, task),
                            (&ins[s..e], &outs[s..e]),
                            "rows {rows} task {task} k {k}"
                        );
                    }
                }
            }
        }
    }
}
