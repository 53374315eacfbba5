//! Row-major f32 GEMM on top of the `gemm` crate (chosen by `benches/gemm_crates.rs`).

use gemm::Parallelism;

/// `c[m, n] = a[m, k] · b[k, n]`, row-major, single-threaded (callers parallelize over tiles).
///
/// Overwrites `c` (never reads it), so every call with the same `(m, k, n)` and operands
/// produces the same bits: the determinism of the grouped conv rests on that.
#[inline]
pub fn gemm_tile(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm_with(m, k, n, a, b, c, Parallelism::None);
}

/// [`gemm_tile`] into a raw destination of `m * n` f32 (possibly uninitialized: it is only written).
///
/// # Safety
/// `c` must be valid for writes of `m * n` f32.
pub unsafe fn gemm_tile_raw(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_raw(m, k, n, a, b, c, Parallelism::None) }
}

/// `c[k, n] += a[m, k]ᵀ · b[m, n]`, row-major, single-threaded (weight gradients).
pub fn gemm_at_b_acc(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= m * n && c.len() >= k * n, "gemm operand too small");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: checked above; aᵀ is read through swapped strides.
    unsafe {
        gemm::gemm(
            k,
            n,
            m,
            c.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `c = a · b` using `threads` rayon threads inside the GEMM (the dense reference in benchmarks).
pub fn gemm_parallel(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    gemm_with(m, k, n, a, b, c, par);
}

fn gemm_with(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], par: Parallelism) {
    assert!(c.len() >= m * n, "gemm operand too small");
    // SAFETY: `c` holds m * n writable elements.
    unsafe { gemm_raw(m, k, n, a, b, c.as_mut_ptr(), par) }
}

/// `c = a · b` into `m * n` writable elements at `c`.
///
/// # Safety
/// `c` must be valid for writes of `m * n` f32.
unsafe fn gemm_raw(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: *mut f32, par: Parallelism) {
    assert!(a.len() >= m * k && b.len() >= k * n, "gemm operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m * n {
            // SAFETY: the caller guarantees m * n writable elements.
            unsafe { c.add(i).write(0.0) };
        }
        return;
    }
    // SAFETY: operands checked above; the caller guarantees the destination.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let mut c = vec![f32::NAN; m * n];
        gemm_tile(m, k, n, &a, &b, &mut c);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
                assert_eq!(c[i * n + j], r, "({i},{j})"); // small integers: exact
            }
        }
    }
}
