//! Latency lookup table (NetAdapt, Yang et al., ECCV 2018): each conv's measured time on the
//! target for every width pair on the pruning grid, so a search can price a candidate network
//! without running it. Measured on one scan's real coordinates (its kernel maps, its tuned
//! plans), keyed by device and thread count. A conv timed alone is not exactly a conv inside
//! the network (caches, the fused residual, buffers), and a run has work that is no conv
//! (reading and voxelizing the scan, kernel maps, concats, the classifier), so the sum of the
//! entries is calibrated once: end-to-end time = `fixed + scale · Σ entries`, fitted to the
//! measured unpruned network and its narrowest version on the grid.
//!
//! Widths off the grid are priced by bilinear interpolation between the nearest measured ones.
//!
//! Finer cuts are measured per conv at its own widths ([`LatencyTable::measure_cuts`]): kept
//! offset counts (the offsets with the largest L1 of the model's own kernel, since which offsets
//! go decides how many pairs are skipped) and sparse formats at given sparsities (the model's
//! kernel magnitude-pruned, run by whichever CPU kernel times faster, as in the network).
//! Counts and sparsities between measured ones are interpolated linearly.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::groups;
use super::importance::Criterion;
use super::plan::ConvCut;
use super::{offset, prune_channels_to, ChannelTarget};
use crate::device::{ConvWeight, Device, Engine};
use crate::error::{Error, Result};
use crate::kmap::KernelSpec;
use crate::nn::arch::{ArchKind, ConvDesc, NetDesc};
use crate::nn::checkpoint::{Checkpoint, KEPT_OFFSETS, SPARSE_FORMAT};
use crate::pipeline::{self, Model};
use crate::sparse_weights::Format;
use crate::tensor::{CoordSet, SparseTensor};

/// One conv shape on one kernel map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerKey {
    /// Tensor stride of the coordinates the map is built on.
    pub map_stride: i32,
    /// Kernel size.
    pub size: u32,
    /// Conv stride.
    pub stride: u32,
    /// Transposed (upsampling) conv.
    pub transposed: bool,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
}

impl LayerKey {
    fn of(c: &ConvDesc, map_stride: i32) -> Self {
        Self {
            map_stride,
            size: c.spec.size,
            stride: c.spec.stride,
            transposed: c.transposed,
            cin: c.cin,
            cout: c.cout,
        }
    }

    fn with(self, cin: usize, cout: usize) -> Self {
        Self { cin, cout, ..self }
    }

    fn shape(self) -> (i32, u32, u32, bool) {
        (self.map_stride, self.size, self.stride, self.transposed)
    }
}

/// Measured conv times on one device, thread count and scan.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyTable {
    /// `cpu` or `gpu`.
    pub device: String,
    /// Worker threads the times were measured with.
    pub threads: usize,
    /// Voxels of the scan measured on.
    pub voxels: usize,
    /// Calibration: seconds of an end-to-end run that do not scale with the convs.
    pub fixed: f64,
    /// Calibration: end-to-end seconds per second of summed entries.
    pub scale: f64,
    /// Median seconds per conv shape.
    pub entries: BTreeMap<LayerKey, f64>,
    /// Median seconds of convs with a finer cut, at the widths `(cin, cout)` they were
    /// measured at: `(kernel name, cin, cout, cut, seconds)`.
    pub cuts: Vec<(String, usize, usize, ConvCut, f64)>,
}

/// Multiples of `step` up to `width`, and `width` itself.
fn grid(width: usize, step: usize) -> Vec<usize> {
    let mut g: Vec<usize> = (1..=width / step.max(1)).map(|i| i * step).collect();
    if g.last() != Some(&width) {
        g.push(width);
    }
    g
}

fn device_name(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Gpu(_) => "gpu",
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Deterministic values in [-0.5, 0.5) (no RNG dependency for timing inputs).
fn filler(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Times of convs on the coordinate sets of one scan, each measured in place.
struct Timer<'a> {
    e: &'a Engine,
    coords: BTreeMap<i32, Arc<CoordSet>>,
    reps: usize,
}

impl<'a> Timer<'a> {
    /// The coordinate sets of every stage of `desc` on `scan`, and its voxel count.
    fn new(e: &'a Engine, desc: &NetDesc, scan: &Path, reps: usize) -> Result<(Self, usize)> {
        let prepared = pipeline::prepare_file(scan, None, pipeline::VoxelizeMode::Mean)?;
        let mut coords = BTreeMap::from([(1, prepared.voxels.coord_set().clone())]);
        let mut cur = prepared.voxels.coord_set().clone();
        for st in &desc.stages {
            cur = e.kernel_map(&cur, st.resample.spec)?.out_coords().clone();
            coords.insert(cur.stride(), cur.clone());
        }
        Ok((Self { e, coords, reps }, prepared.voxels.len()))
    }

    fn seconds(&self, k: LayerKey) -> Result<f64> {
        let vol = (k.size as usize).pow(3);
        let w = ConvWeight::new(
            filler(vol * k.cin * k.cout, 2).iter().map(|v| v * 0.1).collect(),
            vol,
            k.cin,
            k.cout,
            Some(vec![0.0; k.cout]),
        )?;
        self.seconds_with(k, &w)
    }

    /// Median seconds of conv `k` with the weights `w` (for cut kernels).
    fn seconds_with(&self, k: LayerKey, w: &ConvWeight) -> Result<f64> {
        let spec = KernelSpec::new(k.size, k.stride, 1)?;
        let at = |s: i32| {
            self.coords
                .get(&s)
                .cloned()
                .ok_or_else(|| Error::invalid("latency table", format!("no coordinates at tensor stride {s}")))
        };
        let (input, target) = if k.transposed {
            (at(k.map_stride * k.stride as i32)?, Some(at(k.map_stride)?))
        } else {
            (at(k.map_stride)?, None)
        };
        let x = SparseTensor::new(input.clone(), filler(input.len() * k.cin, 1), k.cin)?;
        let map = match &target {
            Some(t) => self.e.transposed_map(&input, t, spec)?,
            None => self.e.kernel_map(&input, spec)?,
        };
        let mut times = Vec::with_capacity(self.reps);
        // The first run tunes the layer's plan (as the network's first scan does).
        for i in 0..=self.reps {
            self.e.start_trace();
            std::hint::black_box(self.e.conv_fused(&map, &x, w, None, true)?);
            let t = self.e.take_trace().first().map_or(0.0, |l| l.seconds);
            if i > 0 {
                times.push(t);
            }
        }
        Ok(median(&mut times))
    }
}

/// The finer cuts a pruned checkpoint carries: offsets kept per conv and sparse formats (at
/// the kernel's fraction of zeros).
pub fn checkpoint_cuts(ck: &Checkpoint, desc: &NetDesc) -> Result<Vec<(String, ConvCut)>> {
    let mut cuts = Vec::new();
    for c in desc.convs() {
        if let Some(list) = ck.metadata().get(&format!("{KEPT_OFFSETS}{}", c.kernel)) {
            let kept = list.split(',').filter(|x| !x.trim().is_empty()).count();
            cuts.push((c.kernel.clone(), ConvCut::Offsets { kept, of: c.spec.volume() }));
        } else if let Some(f) = ck.metadata().get(&format!("{SPARSE_FORMAT}{}", c.kernel)) {
            let f = Format::parse(f)?;
            let t = ck
                .tensors()
                .get(&c.kernel)
                .ok_or_else(|| Error::tensor(c.kernel.as_str(), "missing from the model"))?;
            let zeros = t.data.iter().filter(|&&v| v == 0.0).count() as f64 / t.data.len().max(1) as f64;
            cuts.push((c.kernel.clone(), ConvCut::Sparse(f, zeros)));
        }
    }
    Ok(cuts)
}

impl LatencyTable {
    /// Measure every conv of the network in `ck` at every width pair on the `step` grid (each
    /// width a multiple of `step` up to the conv's own, plus its own), on the scan `scan`, with
    /// `reps` timed runs per shape, then calibrate against `reps` end-to-end runs of the
    /// network and of its narrowest version on the grid. `progress(done, total)` is called
    /// as entries finish.
    pub fn measure(
        e: &Engine,
        ck: &Checkpoint,
        kind: ArchKind,
        scan: &Path,
        step: usize,
        reps: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        if step == 0 || reps == 0 {
            return Err(Error::invalid("latency table", "the width step and the repetitions must be at least 1"));
        }
        let classes =
            ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
        let desc = &NetDesc::from_checkpoint(kind, ck, classes)?;
        let model = Model::from_desc(ck, desc)?;
        let (timer, voxels) = Timer::new(e, desc, scan, reps)?;
        let mut wanted: Vec<LayerKey> = Vec::new();
        for (c, (s, _)) in desc.convs().into_iter().zip(desc.conv_maps()) {
            let k = LayerKey::of(c, s);
            // The network input and the logits keep their widths.
            let cins = if desc.stem[0].kernel == c.kernel { vec![c.cin] } else { grid(c.cin, step) };
            for &ci in &cins {
                for co in grid(c.cout, step) {
                    wanted.push(k.with(ci, co));
                }
            }
        }
        wanted.sort();
        wanted.dedup();
        let mut entries = BTreeMap::new();
        for (i, k) in wanted.iter().enumerate() {
            entries.insert(*k, timer.seconds(*k)?);
            progress(i + 1, wanted.len());
        }
        let mut table = Self {
            device: device_name(e.device()).into(),
            threads: rayon::current_num_threads(),
            voxels,
            fixed: 0.0,
            scale: 1.0,
            entries,
            cuts: Vec::new(),
        };
        // The narrowest network on the grid: every prunable group at its smallest grid width.
        let gs = groups::groups(desc)?;
        let narrow: Vec<usize> = gs.iter().map(|g| if g.prunable { step.min(g.width) } else { g.width }).collect();
        let small = prune_channels_to(ck, kind, Criterion::L1, ChannelTarget::Widths(&narrow), &[], 0)?;
        let small_model = Model::from_desc(&small.checkpoint(), &small.after)?;
        let run = |m: &Model| -> Result<f64> {
            let mut t = Vec::with_capacity(reps);
            for i in 0..=reps {
                let t0 = Instant::now();
                let p = pipeline::prepare_file(scan, None, pipeline::VoxelizeMode::Mean)?;
                let seg = pipeline::segment(e, m, &p, &mut pipeline::Timings::default())?;
                std::hint::black_box(&seg.point_labels);
                if i > 0 {
                    t.push(t0.elapsed().as_secs_f64());
                }
            }
            Ok(median(&mut t))
        };
        let (tb, tn) = (run(&model)?, run(&small_model)?);
        let (sb, sn) = (table.convs(desc)?.iter().sum::<f64>(), table.convs(&small.after)?.iter().sum::<f64>());
        let scale = (tb - tn) / (sb - sn);
        (table.fixed, table.scale) = if sb > sn && scale > 0.0 && tb - scale * sb >= 0.0 {
            (tb - scale * sb, scale)
        } else {
            ((tb - sb).max(0.0), 1.0)
        };
        Ok(table)
    }

    /// Measure finer cuts of every conv of the network in `ck` at its own widths, on `scan`
    /// (the scan the table was measured on): `offset_ratios` of the offsets removed (convs of
    /// more than one offset; the smallest by L1 first), and each sparse format at each of its
    /// sparsities. Replaces any cuts measured before.
    #[allow(clippy::too_many_arguments)]
    pub fn measure_cuts(
        &mut self,
        e: &Engine,
        ck: &Checkpoint,
        kind: ArchKind,
        scan: &Path,
        offset_ratios: &[f64],
        sparse: &[(Format, Vec<f64>)],
        reps: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<()> {
        self.check_target(e)?;
        let classes =
            ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
        let desc = &NetDesc::from_checkpoint(kind, ck, classes)?;
        let (timer, voxels) = Timer::new(e, desc, scan, reps.max(1))?;
        if voxels != self.voxels {
            return Err(Error::invalid(
                "latency table",
                format!("measured on a scan of {} voxels, the cuts' scan has {voxels}", self.voxels),
            ));
        }
        let mut wanted: Vec<(usize, ConvCut)> = Vec::new();
        let convs = desc.convs();
        for (i, c) in convs.iter().enumerate() {
            let vol = c.spec.volume();
            if vol > 1 {
                let mut kept: Vec<usize> =
                    offset_ratios.iter().map(|r| (vol - ((vol as f64) * r).round() as usize).max(1)).collect();
                kept.sort_unstable();
                kept.dedup();
                wanted
                    .extend(kept.into_iter().filter(|&k| k < vol).map(|k| (i, ConvCut::Offsets { kept: k, of: vol })));
            }
            for (f, ss) in sparse {
                let fits = match f {
                    Format::Block => c.cout.is_multiple_of(crate::sparse_weights::BLOCK),
                    Format::NM(_, m) => c.cin.is_multiple_of(*m as usize),
                    Format::Element => true,
                };
                if fits {
                    wanted.extend(ss.iter().map(|&s| (i, ConvCut::Sparse(*f, s))));
                }
            }
        }
        let maps = desc.conv_maps();
        let mut cuts = Vec::with_capacity(wanted.len());
        for (n, (i, cut)) in wanted.iter().enumerate() {
            let c = convs[*i];
            let k = LayerKey::of(c, maps[*i].0);
            let t = ck
                .tensors()
                .get(&c.kernel)
                .ok_or_else(|| Error::tensor(c.kernel.as_str(), "missing from the model"))?;
            let mut kernel = t.data.clone();
            let vol = c.spec.volume();
            let w = match *cut {
                ConvCut::Offsets { kept, .. } => {
                    let keep = offset::largest(t, kept);
                    let per = c.cin * c.cout;
                    for o in (0..vol).filter(|o| keep.binary_search(o).is_err()) {
                        kernel[o * per..(o + 1) * per].fill(0.0);
                    }
                    ConvWeight::new(kernel, vol, c.cin, c.cout, Some(vec![0.0; c.cout]))?
                }
                ConvCut::Sparse(f, sp) => {
                    crate::sparse_weights::prune_kernel(&mut kernel, c.cin, c.cout, f, sp);
                    ConvWeight::new(kernel, vol, c.cin, c.cout, Some(vec![0.0; c.cout]))?.with_format(f)?
                }
            };
            cuts.push((c.kernel.clone(), c.cin, c.cout, *cut, timer.seconds_with(k, &w)?));
            progress(n + 1, wanted.len());
        }
        self.cuts = cuts;
        Ok(())
    }

    /// Predicted seconds of conv `c` (on the map of tensor stride `map_stride`) with `cut`:
    /// the measured cut entries of that conv interpolated at the cut, scaled by the dense
    /// table's ratio between the conv's widths and those the cuts were measured at.
    fn cut_seconds(&self, c: &ConvDesc, map_stride: i32, cut: ConvCut) -> Result<f64> {
        let mine: Vec<&(String, usize, usize, ConvCut, f64)> = self
            .cuts
            .iter()
            .filter(|e| {
                e.0 == c.kernel
                    && match (e.3, cut) {
                        (ConvCut::Offsets { .. }, ConvCut::Offsets { .. }) => true,
                        (ConvCut::Sparse(a, _), ConvCut::Sparse(b, _)) => a == b,
                        _ => false,
                    }
            })
            .collect();
        let (x, what) = match cut {
            ConvCut::Offsets { kept, .. } => (kept as f64, "offset counts".to_string()),
            ConvCut::Sparse(f, s) => (s, format!("{} sparsities", f.name())),
        };
        let at = |e: &ConvCut| match *e {
            ConvCut::Offsets { kept, .. } => kept as f64,
            ConvCut::Sparse(_, s) => s,
        };
        let k = LayerKey::of(c, map_stride);
        let (cin, cout) = mine.first().map(|e| (e.1, e.2)).ok_or_else(|| {
            Error::invalid(
                "latency table",
                format!("no {what} measured for `{}`: measure the table with --offsets / --sparse", c.kernel),
            )
        })?;
        // The dense conv at the measured widths is the end point "nothing cut".
        let full = self.conv(k.with(cin, cout))?;
        let mut pts: Vec<(f64, f64)> = mine.iter().map(|e| (at(&e.3), e.4)).collect();
        pts.push(match cut {
            ConvCut::Offsets { of, .. } => (of as f64, full),
            ConvCut::Sparse(..) => (0.0, full),
        });
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let lo = pts.iter().rev().find(|p| p.0 <= x).copied();
        let hi = pts.iter().find(|p| p.0 >= x).copied();
        let t = match (lo, hi) {
            (Some(a), Some(b)) if b.0 > a.0 => a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0),
            (Some(a), _) | (None, Some(a)) => a.1,
            (None, None) => full,
        };
        let scale = if (c.cin, c.cout) == (cin, cout) { 1.0 } else { self.conv(k)? / full };
        Ok(t * scale)
    }

    /// Predicted end-to-end seconds of `desc` with the per-conv `cuts` (kernel name, cut).
    pub fn predict_cuts(&self, desc: &NetDesc, cuts: &[(String, ConvCut)]) -> Result<f64> {
        let mut sum = 0.0;
        for (c, (s, _)) in desc.convs().into_iter().zip(desc.conv_maps()) {
            sum += match cuts.iter().find(|(n, _)| n == &c.kernel) {
                Some((_, cut)) => self.cut_seconds(c, s, *cut)?,
                None => self.conv(LayerKey::of(c, s))?,
            };
        }
        Ok(self.fixed + self.scale * sum)
    }

    /// Predicted end-to-end seconds of the network in `ck` (described by `desc`): its widths,
    /// its offset-pruned convs (`kept_offsets.*` metadata) and its sparse-format convs
    /// (`format.*`, at the kernel's own fraction of zeros).
    pub fn predict_checkpoint(&self, ck: &Checkpoint, desc: &NetDesc) -> Result<f64> {
        self.predict_cuts(desc, &checkpoint_cuts(ck, desc)?)
    }

    /// Check that the table was measured where it is used.
    pub fn check_target(&self, e: &Engine) -> Result<()> {
        let (d, t) = (device_name(e.device()), rayon::current_num_threads());
        if self.device != d || self.threads != t {
            return Err(Error::invalid(
                "latency table",
                format!("measured on {} with {} threads, but this run is on {d} with {t}", self.device, self.threads),
            ));
        }
        Ok(())
    }

    /// Predicted seconds of one conv shape: measured, or interpolated between the nearest
    /// measured widths of the same conv on the same map.
    pub fn conv(&self, k: LayerKey) -> Result<f64> {
        if let Some(&t) = self.entries.get(&k) {
            return Ok(t);
        }
        let same: Vec<(&LayerKey, &f64)> = self.entries.iter().filter(|(e, _)| e.shape() == k.shape()).collect();
        let axis = |f: fn(&LayerKey) -> usize, v: usize| -> Option<(usize, usize)> {
            let mut vals: Vec<usize> = same.iter().map(|(e, _)| f(e)).collect();
            vals.sort_unstable();
            vals.dedup();
            let lo = vals.iter().rev().find(|&&x| x <= v).copied()?;
            let hi = vals.iter().find(|&&x| x >= v).copied()?;
            Some((lo, hi))
        };
        let missing = || {
            Error::invalid(
                "latency table",
                format!(
                    "no entry near a {}x{} k{} s{} {}conv on the stride-{} map: measure the table for this model",
                    k.cin,
                    k.cout,
                    k.size,
                    k.stride,
                    if k.transposed { "transposed " } else { "" },
                    k.map_stride
                ),
            )
        };
        let ((i0, i1), (o0, o1)) =
            (axis(|e| e.cin, k.cin).ok_or_else(missing)?, axis(|e| e.cout, k.cout).ok_or_else(missing)?);
        let get = |ci: usize, co: usize| self.entries.get(&k.with(ci, co)).copied().ok_or_else(missing);
        let frac = |v: usize, a: usize, b: usize| if b > a { (v - a) as f64 / (b - a) as f64 } else { 0.0 };
        let (fi, fo) = (frac(k.cin, i0, i1), frac(k.cout, o0, o1));
        let lo = get(i0, o0)? * (1.0 - fo) + get(i0, o1)? * fo;
        let hi = get(i1, o0)? * (1.0 - fo) + get(i1, o1)? * fo;
        Ok(lo * (1.0 - fi) + hi * fi)
    }

    /// Predicted seconds of every conv of `desc`, in [`NetDesc::convs`] order.
    pub fn convs(&self, desc: &NetDesc) -> Result<Vec<f64>> {
        desc.convs().into_iter().zip(desc.conv_maps()).map(|(c, (s, _))| self.conv(LayerKey::of(c, s))).collect()
    }

    /// Predicted end-to-end seconds of `desc` on the table's scan.
    pub fn predict(&self, desc: &NetDesc) -> Result<f64> {
        Ok(self.fixed + self.scale * self.convs(desc)?.iter().sum::<f64>())
    }

    /// Predicted end-to-end seconds of `desc` with its convs reshaped to `shapes` (`(cin, cout)`
    /// per conv, [`NetDesc::convs`] order): candidate widths priced without building them.
    pub fn predict_shapes(&self, desc: &NetDesc, shapes: &[(usize, usize)]) -> Result<f64> {
        let convs = desc.convs();
        if shapes.len() != convs.len() {
            return Err(Error::invalid("latency table", format!("{} shapes for {} convs", shapes.len(), convs.len())));
        }
        let mut sum = 0.0;
        for ((c, (s, _)), &(cin, cout)) in convs.into_iter().zip(desc.conv_maps()).zip(shapes) {
            sum += self.conv(LayerKey::of(c, s).with(cin, cout))?;
        }
        Ok(self.fixed + self.scale * sum)
    }

    /// The table as CSV with a commented header.
    pub fn to_csv(&self) -> String {
        let mut s = format!(
            "# sparseconv latency table\n# device {}\n# threads {}\n# voxels {}\n# fixed_ms {:.4}\n# scale {:.6}\nmap_stride,kernel,stride,transposed,cin,cout,ms\n",
            self.device,
            self.threads,
            self.voxels,
            self.fixed * 1e3,
            self.scale
        );
        for (k, t) in &self.entries {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{:.4}",
                k.map_stride,
                k.size,
                k.stride,
                u8::from(k.transposed),
                k.cin,
                k.cout,
                t * 1e3
            );
        }
        if !self.cuts.is_empty() {
            s.push_str("conv,cin,cout,cut,ms\n");
            for (name, cin, cout, cut, t) in &self.cuts {
                let _ = writeln!(s, "{name},{cin},{cout},{},{:.4}", cut.to_text(), t * 1e3);
            }
        }
        s
    }

    /// Write the table.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_csv()).map_err(|e| Error::io(path, e))
    }

    /// Read a table written by [`LatencyTable::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|m| Error::format(path, m))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut header: BTreeMap<&str, &str> = BTreeMap::new();
        let mut entries = BTreeMap::new();
        let mut saw_columns = false;
        let mut in_cuts = false;
        let mut cuts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if let Some(h) = line.strip_prefix("# ") {
                if let Some((k, v)) = h.split_once(' ') {
                    header.insert(k, v.trim());
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            if saw_columns && line.trim() == "conv,cin,cout,cut,ms" {
                in_cuts = true;
                continue;
            }
            if in_cuts {
                let f: Vec<&str> = line.split(',').collect();
                let bad = || format!("line {}: expected `conv,cin,cout,cut,ms`, got `{line}`", i + 1);
                if f.len() != 5 {
                    return Err(bad());
                }
                let (cin, cout): (usize, usize) =
                    (f[1].trim().parse().map_err(|_| bad())?, f[2].trim().parse().map_err(|_| bad())?);
                let cut = ConvCut::parse(&f[3].split_whitespace().collect::<Vec<_>>())
                    .map_err(|e| format!("line {}: {e}", i + 1))?;
                let ms: f64 = f[4].trim().parse().map_err(|_| bad())?;
                if !(ms.is_finite() && ms >= 0.0) {
                    return Err(format!("line {}: time {ms} ms", i + 1));
                }
                cuts.push((f[0].trim().to_string(), cin, cout, cut, ms / 1e3));
                continue;
            }
            if !saw_columns {
                if line.trim() != "map_stride,kernel,stride,transposed,cin,cout,ms" {
                    return Err(format!("line {}: expected the column header, got `{line}`", i + 1));
                }
                saw_columns = true;
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            let bad = || format!("line {}: expected 7 numbers, got `{line}`", i + 1);
            if f.len() != 7 {
                return Err(bad());
            }
            let n = |j: usize| f[j].trim().parse::<usize>().map_err(|_| bad());
            let ms: f64 = f[6].trim().parse().map_err(|_| bad())?;
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(format!("line {}: time {ms} ms", i + 1));
            }
            let (size, stride) = (n(1)?, n(2)?);
            if size == 0 || stride == 0 || size > 9 || stride > 9 {
                return Err(format!("line {}: kernel {size} stride {stride}", i + 1));
            }
            let key = LayerKey {
                map_stride: i32::try_from(n(0)?).map_err(|_| bad())?,
                size: size as u32,
                stride: stride as u32,
                transposed: n(3)? == 1,
                cin: n(4)?,
                cout: n(5)?,
            };
            entries.insert(key, ms / 1e3);
        }
        let get = |k: &str| header.get(k).copied().ok_or_else(|| format!("header line `# {k} ...` missing"));
        let device = get("device")?.to_string();
        if device != "cpu" && device != "gpu" {
            return Err(format!("device `{device}`: expected cpu or gpu"));
        }
        let threads = get("threads")?.parse().map_err(|_| "threads: not a number".to_string())?;
        let voxels = get("voxels")?.parse().map_err(|_| "voxels: not a number".to_string())?;
        let ms = |k: &str| -> std::result::Result<f64, String> {
            let v: f64 = get(k)?.parse().map_err(|_| format!("{k}: not a number"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v / 1e3)
            } else {
                Err(format!("{k}: {v}"))
            }
        };
        if entries.is_empty() {
            return Err("no entries".into());
        }
        let scale: f64 = get("scale")?.parse().map_err(|_| "scale: not a number".to_string())?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!("scale: {scale}"));
        }
        Ok(Self { device, threads, voxels, fixed: ms("fixed_ms")?, scale, entries, cuts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_and_interpolation() {
        assert_eq!(grid(48, 16), vec![16, 32, 48]);
        assert_eq!(grid(24, 16), vec![16, 24]);
        let k = LayerKey { map_stride: 1, size: 3, stride: 1, transposed: false, cin: 16, cout: 16 };
        let mut entries = BTreeMap::new();
        for (ci, co, ms) in [(16, 16, 1.0), (16, 32, 2.0), (32, 16, 3.0), (32, 32, 4.0)] {
            entries.insert(k.with(ci, co), ms);
        }
        let mut t = LatencyTable {
            device: "cpu".into(),
            threads: 2,
            voxels: 10,
            fixed: 0.5,
            scale: 1.0,
            entries,
            cuts: Vec::new(),
        };
        assert_eq!(t.conv(k.with(24, 24)).unwrap(), 2.5);
        assert_eq!(t.conv(k.with(16, 32)).unwrap(), 2.0);
        assert!(t.conv(k.with(64, 16)).is_err(), "outside the grid");
        t.cuts.push(("a.kernel".into(), 16, 16, ConvCut::Offsets { kept: 7, of: 27 }, 0.4e-3));
        t.cuts.push(("a.kernel".into(), 16, 16, ConvCut::Sparse(Format::Element, 0.9), 0.3e-3));
        let back = LatencyTable::parse(&t.to_csv()).unwrap();
        assert_eq!(back.entries.len(), 4);
        assert_eq!(back.cuts.len(), 2);
        assert_eq!(back.cuts[1].3, ConvCut::Sparse(Format::Element, 0.9));
        assert!((back.fixed - 0.5).abs() < 1e-6);
        assert!(LatencyTable::parse("map_stride,kernel,stride,transposed,cin,cout,ms\n1,3,1,0,16,16,x\n").is_err());
    }
}
