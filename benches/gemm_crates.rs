//! Which GEMM crate for the conv: `gemm`, `faer` and `matrixmultiply` on the shapes the engine
//! runs (single-threaded tiles of gathered rows; one large parallel GEMM).
//!
//! `cargo bench --features gemm-compare --bench gemm_crates`

use sparseconv::bench::{measure, pseudo_random};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Kernel = fn(usize, usize, usize, &[f32], &[f32], &mut [f32], usize);

fn with_gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    sparseconv::cpu::gemm::gemm_parallel(m, k, n, a, b, c, threads);
}

fn with_faer(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    use faer::{linalg::matmul::matmul, Accum, MatMut, MatRef, Par};
    let a = MatRef::from_row_major_slice(a, m, k);
    let b = MatRef::from_row_major_slice(b, k, n);
    let c = MatMut::from_row_major_slice_mut(c, m, n);
    let par = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
    matmul(c, Accum::Replace, a, b, 1.0f32, par);
}

fn with_matrixmultiply(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], _threads: usize) {
    // SAFETY: row-major operands of the stated shapes.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn main() {
    let threads = rayon::current_num_threads();
    let crates: [(&str, Kernel); 3] =
        [("gemm", with_gemm), ("faer", with_faer), ("matrixmultiply", with_matrixmultiply)];
    // (m, k, n, threads): conv tiles are single-threaded (the conv parallelizes over tiles).
    let shapes = [
        (512, 4, 32, 1),
        (512, 32, 32, 1),
        (512, 64, 64, 1),
        (256, 128, 128, 1),
        (256, 256, 256, 1),
        (346_221, 128, 128, threads),
    ];
    println!(
        "{:<26} {:>16} {:>16} {:>16}   (GFLOP/s, median)",
        "shape m x k x n (threads)", "gemm", "faer", "matrixmultiply"
    );
    for (m, k, n, t) in shapes {
        let a = pseudo_random(m * k, 1, 1.0);
        let b = pseudo_random(k * n, 2, 1.0);
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let mut cols = Vec::new();
        for (_, f) in crates {
            let s = measure(3, 20, 100_000, 0.5, || {
                f(m, k, n, &a, &b, &mut c, t);
                std::hint::black_box(&c);
            });
            cols.push(format!("{:>16.1}", s.gflops(flops)));
        }
        println!("{:<26} {}", format!("{m} x {k} x {n} ({t})"), cols.join(" "));
    }
    println!("(matrixmultiply runs single-threaded here: its `threading` feature is off)");
}
