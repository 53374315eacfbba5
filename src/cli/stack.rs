//! `sparseconv stack`: voxelize a scan and run an 8-layer stack of sparse convs over it, timing
//! every step.

use sparseconv::bench::{conv_flops, pseudo_random, Stats};
use sparseconv::io::PointFormat;
use sparseconv::voxel::voxelize;
use sparseconv::{ConvWeight, CoordSet, Engine, Error, KernelSpec, Result, SparseTensor};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One layer of the demo stack.
pub(crate) enum Layer {
    /// Submanifold or strided conv.
    Conv(u32, u32, usize, usize),
    /// Transposed k2 s2 conv back to the coordinates of an earlier layer's output.
    Up(usize, usize, usize),
}

pub(crate) fn cmd_stack(
    scan: &Path,
    format: Option<PointFormat>,
    voxel_size: f32,
    engine: Engine,
    repeat: usize,
) -> Result<()> {
    let cloud = sparseconv::io::read_points(scan, format)?;
    if cloud.is_empty() {
        return Err(Error::format(scan, "the scan holds no points"));
    }
    // x, y, z, and the fourth column (remission) when the format has one.
    let layers = [
        Layer::Conv(3, 1, 4, 32),
        Layer::Conv(3, 1, 32, 32),
        Layer::Conv(2, 2, 32, 64),
        Layer::Conv(3, 1, 64, 64),
        Layer::Conv(2, 2, 64, 128),
        Layer::Conv(3, 1, 128, 128),
        Layer::Up(128, 64, 3),
        Layer::Up(64, 32, 1),
    ];
    let weights: Vec<ConvWeight> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (vol, cin, cout) = match *l {
                Layer::Conv(k, _, ci, co) => ((k as usize).pow(3), ci, co),
                Layer::Up(ci, co, _) => (8, ci, co),
            };
            let scale = (2.0 / (vol * cin) as f32).sqrt();
            ConvWeight::new(pseudo_random(vol * cin * cout, 1000 + i as u64, scale), vol, cin, cout, None)
        })
        .collect::<Result<_>>()?;
    println!(
        "scan {}: {} points; {} threads; {} kernel maps; synthetic He-initialised weights (this measures the engine, it is not a trained model)",
        scan.display(),
        cloud.len(),
        rayon::current_num_threads(),
        engine_builder_name(&engine)
    );
    let mut per_layer: Vec<Vec<f64>> = vec![Vec::new(); layers.len()];
    let (mut t_vox, mut t_map, mut t_total) = (Vec::new(), Vec::new(), Vec::new());
    let mut summary = Vec::new();
    for run in 0..repeat.max(1) + 1 {
        engine.clear_cache();
        let t_start = Instant::now();
        let vox = voxelize(&cloud, voxel_size)?;
        let dims = vox.tensor.channels();
        // Pad to 4 input channels (remission 0 where the format has none), keep the first 4.
        let x0 = {
            let n = vox.tensor.len();
            let mut f = vec![0f32; n * 4];
            for i in 0..n {
                let src = &vox.tensor.feats()[i * dims..(i + 1) * dims];
                f[i * 4..i * 4 + dims.min(4)].copy_from_slice(&src[..dims.min(4)]);
            }
            SparseTensor::new(vox.tensor.coord_set().clone(), f, 4)?
        };
        let tv = t_start.elapsed().as_secs_f64();
        // Build every kernel map up front so the conv timings below are pure compute.
        let t_m = Instant::now();
        let mut coords_at: Vec<Arc<CoordSet>> = Vec::new();
        let mut cur = x0.coord_set().clone();
        for l in &layers {
            cur = match *l {
                Layer::Conv(k, s, _, _) => engine.kernel_map(&cur, KernelSpec::new(k, s, 1)?)?.out_coords().clone(),
                Layer::Up(_, _, target) => {
                    let t = coords_at[target].clone();
                    engine.transposed_map(&cur, &t, KernelSpec::new(2, 2, 1)?)?;
                    t
                }
            };
            coords_at.push(cur.clone());
        }
        let tm = t_m.elapsed().as_secs_f64();
        let mut x = x0;
        let mut outs: Vec<Arc<CoordSet>> = Vec::new();
        for (i, (l, w)) in layers.iter().zip(&weights).enumerate() {
            let t = Instant::now();
            let (mut y, map) = match *l {
                Layer::Conv(k, s, _, _) => {
                    let spec = KernelSpec::new(k, s, 1)?;
                    let map = engine.kernel_map(x.coord_set(), spec)?;
                    (engine.conv_with_map(&map, &x, w)?, map)
                }
                Layer::Up(_, _, target) => {
                    let spec = KernelSpec::new(2, 2, 1)?;
                    let map = engine.transposed_map(x.coord_set(), &outs[target], spec)?;
                    (engine.conv_with_map(&map, &x, w)?, map)
                }
            };
            {
                use rayon::prelude::*;
                y.feats_mut().par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
            }
            let dt = t.elapsed().as_secs_f64();
            if run > 0 {
                per_layer[i].push(dt);
            } else {
                summary.push((map.n_in(), map.n_out(), map.total_pairs(), w.cin, w.cout, map.kind(), map.spec()));
            }
            outs.push(y.coord_set().clone());
            x = y;
        }
        std::hint::black_box(&x);
        if run > 0 {
            t_vox.push(tv);
            t_map.push(tm);
            t_total.push(t_start.elapsed().as_secs_f64());
        }
    }
    println!("{:<4} {:<26} {:>16} {:>9} {:>10} {:>11}", "#", "layer", "voxels in->out", "pairs", "ms", "GFLOP/s");
    let mut conv_sum = 0.0;
    let mut flops_sum = 0.0;
    for (i, (n_in, n_out, pairs, cin, cout, kind, spec)) in summary.iter().enumerate() {
        let st = Stats::from_samples(per_layer[i].clone());
        let fl = conv_flops(*pairs, *cin, *cout);
        conv_sum += st.median;
        flops_sum += fl;
        println!(
            "{:<4} {:<26} {:>16} {:>9} {:>10.2} {:>11.1}",
            i + 1,
            format!("{kind:?} k{} s{} {cin}->{cout}", spec.size, spec.stride),
            format!("{n_in}->{n_out}"),
            pairs,
            st.median * 1e3,
            st.gflops(fl)
        );
    }
    let (v, m, t) = (Stats::from_samples(t_vox), Stats::from_samples(t_map), Stats::from_samples(t_total));
    println!(
        "voxelize {:.2} ms | kernel maps {:.2} ms | convs {:.2} ms ({:.1} GFLOP/s) | total {:.2} ms ± {:.2} (median of {}) = {:.1} scans/s",
        v.median * 1e3,
        m.median * 1e3,
        conv_sum * 1e3,
        flops_sum / conv_sum / 1e9,
        t.median * 1e3,
        t.mad * 1e3,
        t.runs,
        1.0 / t.median
    );
    Ok(())
}

pub(crate) fn engine_builder_name(e: &Engine) -> String {
    format!("{:?}", e.builder())
}
