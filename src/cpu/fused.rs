//! Fused gather–GEMM–scatter-add microkernel (AVX-512): input rows are read in place through
//! their indices and each product row is added straight into its output row, so the conv never
//! copies a gathered tile nor stages products in a buffer (the copies and the separate add pass
//! were a fifth of the CPU conv time on the real scan).
//!
//! Bits: each product element is `fma` over the input channels in order, starting from zero,
//! then one add into the output row. That is the order of the `gemm` crate's microkernel
//! followed by [`add_row`](super::conv) (a unit test checks it bit for bit), so plans that run
//! through this kernel and plans that run through `gemm` agree to the bit.

/// `out[o(i)] += x[ins[i]] · w` for every pair `i`, with `w` one offset's `[cin, cout]` weight
/// and `o(i) = outs[i] - base` a row of `out` (`[rows, cout]`). Returns `false`, touching
/// nothing, where the kernel does not apply (no AVX-512, or `cout` not a multiple of 16).
///
/// Panics if an index is out of range (maps are built by this crate; this is an invariant).
pub fn gather_gemm_scatter_add(
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    ins: &[u32],
    outs: &[u32],
    base: u32,
    out: &mut [f32],
) -> bool {
    let rows = out.len() / cout.max(1);
    // SAFETY: `out` is an exclusive slice of `rows * cout` values.
    unsafe { gather_gemm_scatter_add_raw(x, cin, w, cout, ins, outs, base, out.as_mut_ptr(), rows) }
}

/// [`gather_gemm_scatter_add`] into `rows * cout` values at `out`, for tasks that share one
/// output array and write disjoint rows of it.
///
/// # Safety
/// `out` must be valid for reads and writes of `rows * cout` f32, and no other thread may
/// access the rows `outs[i] - base` while this runs.
pub(crate) unsafe fn gather_gemm_scatter_add_raw(
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    ins: &[u32],
    outs: &[u32],
    base: u32,
    out: *mut f32,
    rows: usize,
) -> bool {
    if !available(cout) {
        return false;
    }
    assert_eq!(ins.len(), outs.len(), "pair arrays differ in length");
    assert!(w.len() >= cin * cout, "weight too small");
    let n_in = x.len() / cin.max(1);
    assert!(ins.iter().all(|&i| (i as usize) < n_in), "input index out of range");
    assert!(outs.iter().all(|&o| o >= base && ((o - base) as usize) < rows), "output index out of range");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (checked by `available`); every index was checked above;
    // the destination rows are the caller's.
    unsafe {
        avx512::run(x, cin, w, cout, ins, outs, base, out)
    };
    true
}

/// Whether [`gather_gemm_scatter_add`] runs for this output width on this CPU.
pub fn available(cout: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cout > 0 && cout.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cout;
        false
    }
}

/// Pointers to the input rows of one register block of pairs (`ins`, at most `MR` of them),
/// rows of `stride` values at `xp`. A short tail block repeats its first row in the unused
/// lanes: computed, never stored. Shared by the f32 and bf16 kernels.
///
/// # Safety
/// Every index in `ins` must be a row of the array at `xp`, and `ins` must not be empty.
#[inline(always)]
pub(crate) unsafe fn block_rows<T, const MR: usize>(xp: *const T, stride: usize, ins: &[u32]) -> [*const T; MR] {
    let mut rows = [xp; MR];
    for (r, row) in rows.iter_mut().enumerate() {
        let i = ins[if r < ins.len() { r } else { 0 }] as usize;
        // SAFETY: the caller's contract: `i` is a row of the array.
        *row = unsafe { xp.add(i * stride) };
    }
    rows
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be available; indices in range (see the caller); `cout % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(
        x: &[f32],
        cin: usize,
        w: &[f32],
        cout: usize,
        ins: &[u32],
        outs: &[u32],
        base: u32,
        out: *mut f32,
    ) {
        let nv = cout / 16;
        let mut col = 0;
        // Column chunks of up to four vectors; rows per block chosen so that rows × vectors
        // accumulators (≤ 24 zmm) plus the weight vectors fit the 32 registers.
        while col < nv {
            let left = nv - col;
            // SAFETY: forwarded from the caller; chunks stay inside `cout`.
            unsafe {
                match left {
                    1 => chunk::<1, 16>(x, cin, w, cout, col * 16, ins, outs, base, out),
                    2 => chunk::<2, 12>(x, cin, w, cout, col * 16, ins, outs, base, out),
                    3 => chunk::<3, 8>(x, cin, w, cout, col * 16, ins, outs, base, out),
                    _ => chunk::<4, 6>(x, cin, w, cout, col * 16, ins, outs, base, out),
                }
            }
            col += left.min(4);
        }
    }

    /// Columns `[c0, c0 + 16·NV)` of every pair, `MR` pairs per register block.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn chunk<const NV: usize, const MR: usize>(
        x: &[f32],
        cin: usize,
        w: &[f32],
        cout: usize,
        c0: usize,
        ins: &[u32],
        outs: &[u32],
        base: u32,
        op: *mut f32,
    ) {
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let n = ins.len();
        let mut s = 0;
        while s < n {
            let m = (n - s).min(MR);
            // SAFETY: the caller checked every input index; rows hold `cin` values.
            let rows: [*const f32; MR] = unsafe { super::block_rows(xp, cin, &ins[s..s + m]) };
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            for l in 0..cin {
                let mut b = [_mm512_setzero_ps(); NV];
                for (j, bj) in b.iter_mut().enumerate() {
                    // SAFETY: l < cin and c0 + 16·(j + 1) ≤ cout.
                    *bj = unsafe { _mm512_loadu_ps(wp.add(l * cout + c0 + 16 * j)) };
                }
                for r in 0..MR {
                    // SAFETY: row r holds cin values.
                    let a = _mm512_set1_ps(unsafe { *rows[r].add(l) });
                    for j in 0..NV {
                        acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
                    }
                }
            }
            for r in 0..m {
                let o = (outs[s + r] - base) as usize;
                for j in 0..NV {
                    // SAFETY: the caller checked every output row; columns stay inside `cout`.
                    unsafe {
                        let p = op.add(o * cout + c0 + 16 * j);
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc[r][j]));
                    }
                }
            }
            s += m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::pseudo_random;
    use crate::cpu::gemm::gemm_tile;

    /// Same bits as a `gemm` tile followed by row adds, for every chunk shape and tail length.
    #[test]
    fn matches_gemm_then_add_bit_for_bit() {
        for (cin, cout) in [(4, 16), (16, 32), (48, 48), (64, 64), (96, 64), (128, 96), (192, 128), (7, 80)] {
            if !available(cout) {
                eprintln!("SKIPPED: no AVX-512 on this CPU: the fused kernel is not used here");
                return;
            }
            let n_in = 50;
            let x = pseudo_random(n_in * cin, 1, 1.0);
            let w = pseudo_random(cin * cout, 2, 0.3);
            for m in [1usize, 5, 13, 31] {
                let ins: Vec<u32> = (0..m).map(|i| ((i * 17 + 3) % n_in) as u32).collect();
                let outs: Vec<u32> = (0..m).map(|i| (10 + 2 * i) as u32).collect();
                let init = pseudo_random(80 * cout, 3, 1.0);
                let mut got = init.clone();
                assert!(gather_gemm_scatter_add(&x, cin, &w, cout, &ins, &outs, 10, &mut got));
                let mp = m.div_ceil(16) * 16;
                let mut a = vec![0f32; mp * cin];
                for (r, &i) in ins.iter().enumerate() {
                    a[r * cin..(r + 1) * cin].copy_from_slice(&x[i as usize * cin..(i as usize + 1) * cin]);
                }
                let mut c = vec![0f32; mp * cout];
                gemm_tile(mp, cin, cout, &a, &w, &mut c);
                let mut want = init.clone();
                for (r, &o) in outs.iter().enumerate() {
                    let o = (o - 10) as usize;
                    for j in 0..cout {
                        want[o * cout + j] += c[r * cout + j];
                    }
                }
                assert!(
                    got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{cin}->{cout}, {m} pairs: bits differ from gemm + add"
                );
            }
        }
    }

    #[test]
    fn declines_widths_it_does_not_handle() {
        let mut out = vec![0f32; 19];
        assert!(!gather_gemm_scatter_add(&[1.0; 4], 4, &[0.0; 76], 19, &[0], &[0], 0, &mut out));
    }
}
