//! bf16 convolution on the CPU: features and weights rounded to bf16, products summed in f32
//! by the `AVX512_BF16` dot-product instruction (`vdpbf16ps`), which does two multiply-adds per
//! f32 lane where an f32 FMA does one. Opt-in (`--precision bf16`); training stays f32.
//!
//! Layout. `vdpbf16ps` multiplies the bf16 pairs of two registers lane by lane and adds both
//! products into the f32 lane. So a feature row is stored as `⌈Cin/2⌉` words, each holding the
//! channels `(2p, 2p+1)` (low half first, zero-padded for odd `Cin`), and one offset's weight
//! `[Cin, Cout]` as `[⌈Cin/2⌉, Cout₁₆]` words holding `(W[2p][j], W[2p+1][j])`, `Cout₁₆` being
//! `Cout` rounded up to 16 with zero columns. A row's word is broadcast, multiplied with 16
//! columns of weight words at a time, and the last vector of an odd width is stored under a
//! mask: every width runs this kernel, the narrow and odd ones left by channel pruning included.
//!
//! Execution is output-tiled, as the f32 output-tiled plan: each task owns a run of output rows,
//! zeroes them, adds the products of every kept offset in the map's canonical order, then
//! applies the epilogue (bias, residual, ReLU) while the rows are in cache.
//!
//! Bits: each product row is a chain of `vdpbf16ps` over the channel pairs in order, starting
//! from zero, then one f32 add into the output row; offsets add in one fixed order; no row is
//! written by two tasks. So the result is the same for every thread count. (The instruction
//! rounds once per pair of products; the reference in the tests bounds it against f64.)
//!
//! AMX (`TDPBF16PS`) would be the next step on Intel CPUs that have it; it is detected and
//! reported ([`amx_present`]) but not implemented: the machines this was built on (AMD EPYC)
//! have no AMX to test it on.

use super::conv::Epilogue;
use crate::error::{Error, Result};
use crate::kmap::KernelMap;

/// Whether the bf16 kernel runs on this CPU (x86-64 with AVX-512F and AVX512_BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU reports AMX tiles with bf16 (CPUID leaf 7: AMX-TILE and AMX-BF16). Read from
/// CPUID directly: the standard library's detection of AMX is not stable.
pub fn amx_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max < 7 {
            return false;
        }
        // Leaf 7 exists (checked just above).
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One line on what this CPU offers for `--precision bf16`.
pub fn describe() -> String {
    let amx = if amx_present() { "AMX present (not used: no AMX kernel yet)" } else { "no AMX" };
    if available() {
        format!("bf16: AVX512_BF16 kernel; {amx}")
    } else {
        format!("bf16: this CPU has no AVX512_BF16, running f32; {amx}")
    }
}

/// `v` rounded to the nearest bf16 (ties to even; NaN stays NaN), as its bits. The same
/// rounding as `half::bf16::from_f32` (a test checks), written without branches so that the
/// packing loops vectorize: it runs over every layer's input.
#[inline(always)]
pub fn bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// `v` rounded to bf16 and back: what the kernel multiplies.
pub fn round(v: f32) -> f32 {
    f32::from_bits(u32::from(bits(v)) << 16)
}

/// Two bf16 values in one word, `lo` in the low half (the element `vdpbf16ps` takes first).
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bits(lo)) | (u32::from(bits(hi)) << 16)
}

/// A conv kernel `[K, Cin, Cout]` laid out for the bf16 kernel (see the module note).
#[derive(Debug, Clone)]
pub struct Bf16Kernel {
    volume: usize,
    cin: usize,
    cout: usize,
    /// Channel pairs, `⌈Cin/2⌉`.
    kp: usize,
    /// `Cout` rounded up to 16.
    cpad: usize,
    words: Vec<u32>,
}

impl Bf16Kernel {
    /// Round and lay out `w` (`[volume, cin, cout]`, row-major).
    pub fn new(w: &[f32], volume: usize, cin: usize, cout: usize) -> Result<Self> {
        if w.len() != volume * cin * cout {
            return Err(Error::tensor(
                "kernel",
                format!("expected [{volume}, {cin}, {cout}] = {} values, got {}", volume * cin * cout, w.len()),
            ));
        }
        let kp = cin.div_ceil(2);
        let cpad = cout.div_ceil(16) * 16;
        let mut words = vec![0u32; volume * kp * cpad];
        for k in 0..volume {
            let wk = &w[k * cin * cout..(k + 1) * cin * cout];
            for p in 0..kp {
                let row = &mut words[(k * kp + p) * cpad..(k * kp + p + 1) * cpad];
                for (j, word) in row.iter_mut().enumerate().take(cout) {
                    let lo = wk[2 * p * cout + j];
                    let hi = if 2 * p + 1 < cin { wk[(2 * p + 1) * cout + j] } else { 0.0 };
                    *word = pair(lo, hi);
                }
            }
        }
        Ok(Self { volume, cin, cout, kp, cpad, words })
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    fn offset(&self, k: usize) -> &[u32] {
        &self.words[k * self.kp * self.cpad..(k + 1) * self.kp * self.cpad]
    }
}

/// Rows of `x` (`[n, cin]`) as bf16 channel pairs, `[n, ⌈cin/2⌉]` words.
pub fn pack_features(x: &[f32], cin: usize) -> Vec<u32> {
    const ROWS: usize = 4096;
    let kp = cin.div_ceil(2);
    let n = x.len() / cin.max(1);
    if kp == 0 {
        return vec![0; 0];
    }
    let fill = |_: &mut (), ci: usize, oc: &mut [std::mem::MaybeUninit<u32>]| {
        let xs = &x[ci * ROWS * cin..(ci * ROWS + oc.len() / kp) * cin];
        if cin.is_multiple_of(2) {
            // Even widths: the pairs are consecutive values, one straight pass.
            for (word, v) in oc.iter_mut().zip(xs.chunks_exact(2)) {
                word.write(pair(v[0], v[1]));
            }
        } else {
            for (row, xr) in oc.chunks_exact_mut(kp).zip(xs.chunks_exact(cin)) {
                for (p, word) in row.iter_mut().enumerate() {
                    let hi = if 2 * p + 1 < cin { xr[2 * p + 1] } else { 0.0 };
                    word.write(pair(xr[2 * p], hi));
                }
            }
        }
    };
    // SAFETY: `fill` writes every word of its chunk (even: `oc.len()` pairs of `xs`, which holds
    // exactly twice as many values; odd: every word of every row).
    unsafe { super::conv::filled_in_parallel(n * kp, ROWS * kp, || (), fill) }
}

/// `out[q] = Σ_k W[k]ᵀ · x[in(k, q)]`, then the epilogue, with `x` and `W` rounded to bf16 and
/// f32 sums. Offsets `skip` marks (pruned, all-zero weights) are not run. Errors where the
/// operands do not fit the map, or where this CPU has no AVX512_BF16 ([`available`]).
pub fn conv_forward(
    map: &KernelMap,
    x: &[f32],
    cin: usize,
    w: &Bf16Kernel,
    skip: Option<&[bool]>,
    epi: Epilogue<'_>,
) -> Result<Vec<f32>> {
    if !available() {
        return Err(Error::invalid("bf16 conv", "this CPU has no AVX512_BF16"));
    }
    let cout = w.cout;
    if w.cin != cin || w.volume != map.volume() {
        return Err(Error::tensor(
            "kernel",
            format!(
                "bf16 kernel is [{}, {}, {}] but the conv has volume {} and {cin} input channels",
                w.volume,
                w.cin,
                w.cout,
                map.volume()
            ),
        ));
    }
    if x.len() != map.n_in() * cin {
        return Err(Error::tensor(
            "feats",
            format!("expected [{}, {cin}] for the kernel map's inputs, got {} values", map.n_in(), x.len()),
        ));
    }
    epi.check(map.n_out(), cout)?;
    let n_out = map.n_out();
    if cout == 0 || n_out == 0 {
        return Ok(vec![0f32; n_out * cout]);
    }
    let order: Vec<usize> = map
        .canonical_order()
        .into_iter()
        .filter(|&k| map.size(k) > 0 && !skip.and_then(|s| s.get(k).copied()).unwrap_or(false))
        .collect();
    let xb = pack_features(x, cin);
    let tile = super::conv::kept_tile_rows(epi.pruned.map(|p| p.keep));
    let starts = super::conv::TileStarts::new(map, tile);
    // A submanifold map's identity offset pairs every output row with itself: its products
    // are stored as the first term (no zeroing, no read of the output).
    // Voxel-pruned convs run the identity like any offset, on the kept rows only.
    let keep = epi.pruned.map(|p| p.keep);
    let dense_identity =
        keep.is_none() && order.first().is_some_and(|&k| Some(k) == map.identity() && map.size(k) == n_out);
    let fill = |(ki, ko): &mut (Vec<u32>, Vec<u32>), ci: usize, oc: &mut [std::mem::MaybeUninit<f32>]| {
        let lo = (ci * tile) as u32;
        let hi = lo + (oc.len() / cout) as u32;
        let rest = if dense_identity {
            let k = order[0];
            let (ins, outs) = map.pairs(k);
            let (s, e) = (lo as usize, hi as usize);
            // SAFETY: the identity's pairs `lo..hi` are the rows `lo..hi` (`(i, i)` for every
            // output row), so the store writes every value of `oc`.
            unsafe {
                gather_dot_scatter(&xb, w, k, &ins[s..e], &outs[s..e], lo, oc.as_mut_ptr().cast(), oc.len(), true)
            };
            &order[1..]
        } else {
            // Zeroed here, in cache, rather than as a zeroed allocation (a memset pass over
            // the whole output, and page clearing where its pages are fresh).
            for v in oc.iter_mut() {
                v.write(0.0);
            }
            &order[..]
        };
        // SAFETY: every element was written just above; same layout.
        let oc = unsafe { std::slice::from_raw_parts_mut(oc.as_mut_ptr().cast::<f32>(), oc.len()) };
        // A task with no kept row only gets the fill (written by the epilogue).
        let none_kept = keep.is_some_and(|kf| !kf[lo as usize..hi as usize].contains(&true));
        for &k in rest.iter().filter(|_| !none_kept) {
            let (ins, outs) = starts.pairs(map, k, ci);
            let (ins, outs) = match keep {
                Some(kf) => super::conv::kept_pairs(ins, outs, kf, ki, ko),
                None => (ins, outs),
            };
            if !ins.is_empty() {
                // SAFETY: `oc` is this task's, initialized.
                unsafe { gather_dot_scatter(&xb, w, k, ins, outs, lo, oc.as_mut_ptr(), oc.len(), false) };
            }
        }
        epi.apply(oc, cout, lo as usize);
    };
    // SAFETY: `fill` writes each chunk in full before anything else (identity products or zeros).
    Ok(unsafe { super::conv::filled_in_parallel(n_out * cout, tile * cout, Default::default, fill) })
}

/// `out[outs[i] - base] += x[ins[i]] · W[k]` for every pair (`store`: `=` instead of `+=`),
/// `x` packed ([`pack_features`]), `out` of `len` values in rows of `w.cout`.
///
/// Panics if an index is out of range (maps are built by this crate; this is an invariant),
/// or if the CPU lacks AVX512_BF16 (checked by the caller).
///
/// # Safety
/// `out` must be valid for writes of `len` values, and for reads where `store` is false.
#[allow(clippy::too_many_arguments)]
unsafe fn gather_dot_scatter(
    x: &[u32],
    w: &Bf16Kernel,
    k: usize,
    ins: &[u32],
    outs: &[u32],
    base: u32,
    out: *mut f32,
    len: usize,
    store: bool,
) {
    assert!(available(), "bf16 kernel without AVX512_BF16");
    assert_eq!(ins.len(), outs.len(), "pair arrays differ in length");
    let n_in = x.len() / w.kp.max(1);
    let rows = len / w.cout.max(1);
    // Bounds as a max and a min-max over the indices (these vectorize; per-pair checks with
    // an early exit cost 2% of the conv).
    assert!(ins.iter().fold(0, |m, &i| m.max(i)) < n_in as u32 || ins.is_empty(), "input index out of range");
    let (lo, hi) = outs.iter().fold((u32::MAX, 0), |(l, h), &o| (l.min(o), h.max(o)));
    assert!(outs.is_empty() || (lo >= base && ((hi - base) as usize) < rows), "output index out of range");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F and AVX512_BF16 are present (asserted); every index was checked above;
    // `out` holds `rows * cout` values (the caller's contract); the weights hold `kp * cpad` words.
    unsafe {
        avx512::run(x, w.kp, w.offset(k), w.cpad, w.cout, ins, outs, base, out, store)
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F and AVX512_BF16 available; `x` rows of `kp` words; `w` of `kp * cpad` words;
    /// indices in range; `out` rows of `cout` values, exclusively the caller's.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn run(
        x: &[u32],
        kp: usize,
        w: &[u32],
        cpad: usize,
        cout: usize,
        ins: &[u32],
        outs: &[u32],
        base: u32,
        out: *mut f32,
        store: bool,
    ) {
        let nv = cpad / 16;
        let mut col = 0;
        // As the f32 kernel: up to four column vectors, rows per block so that the
        // accumulators (≤ 24 zmm) and the weight vectors fit the 32 registers.
        while col < nv {
            let left = nv - col;
            // SAFETY: forwarded from the caller; chunks stay inside `cpad`.
            unsafe {
                match left {
                    1 => chunk::<1, 16>(x, kp, w, cpad, cout, col * 16, ins, outs, base, out, store),
                    2 => chunk::<2, 12>(x, kp, w, cpad, cout, col * 16, ins, outs, base, out, store),
                    3 => chunk::<3, 8>(x, kp, w, cpad, cout, col * 16, ins, outs, base, out, store),
                    _ => chunk::<4, 6>(x, kp, w, cpad, cout, col * 16, ins, outs, base, out, store),
                }
            }
            col += left.min(4);
        }
    }

    /// Columns `[c0, c0 + 16·NV)` of every pair, `MR` pairs per register block, added into
    /// (or with `store`, written to) the output rows; the columns at and past `cout` are
    /// computed (zero weights) but never stored.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn chunk<const NV: usize, const MR: usize>(
        x: &[u32],
        kp: usize,
        w: &[u32],
        cpad: usize,
        cout: usize,
        c0: usize,
        ins: &[u32],
        outs: &[u32],
        base: u32,
        op: *mut f32,
        store: bool,
    ) {
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        // Store masks per vector: all lanes, or those below `cout` on the last one.
        let mut masks = [0xffffu16; NV];
        for (j, m) in masks.iter_mut().enumerate() {
            let c = c0 + 16 * j;
            if c + 16 > cout {
                *m = if c >= cout { 0 } else { ((1u32 << (cout - c)) - 1) as u16 };
            }
        }
        let n = ins.len();
        let mut s = 0;
        while s < n {
            let m = (n - s).min(MR);
            // SAFETY: the caller checked every input index; rows hold `kp` words.
            let rows: [*const u32; MR] = unsafe { crate::cpu::fused::block_rows(xp, kp, &ins[s..s + m]) };
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            for p in 0..kp {
                let mut b = [_mm512_setzero_si512(); NV];
                for (j, bj) in b.iter_mut().enumerate() {
                    // SAFETY: p < kp and c0 + 16·(j + 1) ≤ cpad.
                    *bj = unsafe { _mm512_loadu_si512(wp.add(p * cpad + c0 + 16 * j).cast()) };
                }
                for r in 0..MR {
                    // SAFETY: row r holds kp words.
                    let a = _mm512_set1_epi32(unsafe { *rows[r].add(p) } as i32);
                    for j in 0..NV {
                        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], bh(a), bh(b[j]));
                    }
                }
            }
            for r in 0..m {
                let o = (outs[s + r] - base) as usize;
                for j in 0..NV {
                    // SAFETY: the caller checked every output row; masked lanes stay inside `cout`.
                    unsafe {
                        let p = op.add(o * cout + c0 + 16 * j);
                        let v = match (store, masks[j]) {
                            (true, _) => acc[r][j],
                            (false, 0xffff) => _mm512_add_ps(_mm512_loadu_ps(p), acc[r][j]),
                            (false, m) => _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), acc[r][j]),
                        };
                        if masks[j] == 0xffff {
                            _mm512_storeu_ps(p, v);
                        } else if masks[j] != 0 {
                            _mm512_mask_storeu_ps(p, masks[j], v);
                        }
                    }
                }
            }
            s += m;
        }
    }

    /// The same 512 bits seen as 32 bf16 values.
    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are plain 512-bit vectors; every bit pattern is valid for both.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round(-2.5), -2.5);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::MAX), f32::INFINITY);
    }

    #[test]
    fn rounding_matches_the_half_crate() {
        let mut state = 0x9e37_79b9_u32;
        let specials = [0.0f32, -0.0, 1e-40, -1e-40, f32::MIN_POSITIVE, f32::MAX, f32::INFINITY, f32::NEG_INFINITY];
        for i in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let v = if i < specials.len() { specials[i] } else { f32::from_bits(state) };
            if v.is_nan() {
                assert!(round(v).is_nan());
                continue;
            }
            assert_eq!(bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
        }
    }

    #[test]
    fn layout_pairs_channels_and_pads() {
        // cin 3, cout 2: pairs (0,1) and (2,pad); 16 columns per pair row.
        let w: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let k = Bf16Kernel::new(&w, 1, 3, 2).unwrap();
        assert_eq!((k.kp, k.cpad, k.words.len()), (2, 16, 32));
        assert_eq!(k.words[0], pair(0.0, 2.0));
        assert_eq!(k.words[1], pair(1.0, 3.0));
        assert_eq!(k.words[16], pair(4.0, 0.0));
        assert!(k.words[2..16].iter().all(|&v| v == 0));
        assert!(Bf16Kernel::new(&w, 1, 2, 2).is_err());
        let x = pack_features(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3);
        assert_eq!(x, vec![pair(1.0, 2.0), pair(3.0, 0.0), pair(4.0, 5.0), pair(6.0, 0.0)]);
    }
}
