//! Kernel maps: kernel offsets in TorchSparse order and the `(input row, output row)` pairs per offset.
//!
//! One [`KernelMap`] type serves every builder (hash, merge-sort; CPU now, GPU later) and every
//! use: forward convolution, transposed convolution (the transposed map of the matching
//! downsampling conv) and the backward pass (which runs the transposed map).

use std::sync::Arc;

use crate::coords;
use crate::error::{Error, Result};
use crate::tensor::CoordSet;

/// Geometry of a cubic sparse convolution kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// Kernel size per axis (the kernel volume is `size³`).
    pub size: u32,
    /// Convolution stride (1 = submanifold).
    pub stride: u32,
    /// Dilation.
    pub dilation: u32,
}

impl KernelSpec {
    /// A kernel spec after validation.
    pub fn new(size: u32, stride: u32, dilation: u32) -> Result<Self> {
        if size == 0 || size > 15 {
            return Err(Error::invalid("kernel spec", format!("kernel size must be in 1..=15, got {size}")));
        }
        if stride == 0 || stride > 1 << 10 {
            return Err(Error::invalid("kernel spec", format!("stride must be in 1..=1024, got {stride}")));
        }
        if dilation == 0 || dilation > 1 << 10 {
            return Err(Error::invalid("kernel spec", format!("dilation must be in 1..=1024, got {dilation}")));
        }
        Ok(Self { size, stride, dilation })
    }

    /// Kernel volume `K = size³`.
    pub fn volume(&self) -> usize {
        (self.size as usize).pow(3)
    }
}

/// Per-axis offsets of a kernel of size `k`, in kernel units: `-(k-1)/2 ..= (k-1)/2` for odd k,
/// `-(k/2-1) ..= k/2` for even k (TorchSparse convention).
pub fn axis_offsets(k: u32) -> std::ops::RangeInclusive<i32> {
    let k = k as i32;
    if k % 2 == 1 {
        -(k - 1) / 2..=(k - 1) / 2
    } else {
        -(k / 2 - 1)..=k / 2
    }
}

/// Kernel offsets `[dx, dy, dz]` in TorchSparse order, multiplied by `step`
/// (tensor stride × dilation).
///
/// Odd kernel sizes run z outermost and x fastest; even sizes run x outermost and
/// z fastest. Weights `[K, Cin, Cout]` from TorchSparse/SPVNAS then load unchanged.
pub fn kernel_offsets(k: u32, step: i32) -> Vec<[i32; 3]> {
    let r = axis_offsets(k);
    let mut out = Vec::with_capacity((k as usize).pow(3));
    for a in r.clone() {
        for b in r.clone() {
            for c in r.clone() {
                if k % 2 == 1 {
                    out.push([c * step, b * step, a * step]);
                } else {
                    out.push([a * step, b * step, c * step]);
                }
            }
        }
    }
    out
}

/// What a kernel map connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapKind {
    /// Stride 1: outputs are the input coordinates.
    Submanifold,
    /// Strided: outputs are `S·floor(c/S)`, S = input tensor stride × conv stride.
    Down,
    /// Transposed (upsampling): the transposed map of the matching downsampling conv.
    Up,
    /// Stride 1 with outputs a subset of the input rows (a voxel-pruned submanifold conv:
    /// inputs stay all voxels, only the kept ones are outputs). Its centre offset is not the
    /// identity, but it keeps the centre-first accumulation order of [`MapKind::Submanifold`].
    Subset,
}

/// Which CPU algorithm builds the kernel map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MapBuilder {
    /// Coordinate hashing (hashbrown), parallel queries. The faster builder on the GPU.
    Hash,
    /// PointAcc-style merge-sort: one sort, then one linear merge per offset. The default: the
    /// faster builder on the CPU (about 2x on the real scan's maps, BENCHMARKS.md).
    #[default]
    Sort,
}

impl std::str::FromStr for MapBuilder {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hash" => Ok(MapBuilder::Hash),
            "sort" => Ok(MapBuilder::Sort),
            _ => Err(Error::invalid("kernel-map builder", format!("expected `hash` or `sort`, got `{s}`"))),
        }
    }
}

/// Where a map's per-offset counts and pairs wait when a backend built them (a GPU buffer):
/// each is fetched once, on first use. A backend that needs neither (the output-stationary GPU
/// conv works from its own device tables) never waits for them.
pub trait MapSource: Send + Sync {
    /// `starts` (K + 1 values; offset `k` owns pairs `starts[k]..starts[k + 1]`).
    fn starts(&self) -> Result<Vec<usize>>;
    /// `(in_idx, out_idx)` of all `total` pairs in the canonical layout.
    fn pairs(&self, total: usize) -> Result<(Vec<u32>, Vec<u32>)>;
}

#[derive(Clone)]
struct PairStore {
    starts: std::sync::OnceLock<Vec<usize>>,
    pairs: std::sync::OnceLock<(Vec<u32>, Vec<u32>)>,
    source: Option<Arc<dyn MapSource>>,
}

impl std::fmt::Debug for PairStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pairs.get() {
            Some(p) => write!(f, "{} pairs", p.0.len()),
            None => write!(f, "pairs not fetched yet"),
        }
    }
}

// A failed fetch means the device was lost: nothing sensible can continue.
fn fetched<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("fetching a kernel map from the device: {e}"))
}

impl PairStore {
    fn ready(starts: Vec<usize>, in_idx: Vec<u32>, out_idx: Vec<u32>) -> Self {
        let (s, p) = (std::sync::OnceLock::new(), std::sync::OnceLock::new());
        let _ = s.set(starts);
        let _ = p.set((in_idx, out_idx));
        Self { starts: s, pairs: p, source: None }
    }

    fn lazy(source: Arc<dyn MapSource>) -> Self {
        Self { starts: std::sync::OnceLock::new(), pairs: std::sync::OnceLock::new(), source: Some(source) }
    }

    /// Fetch the counts and pairs from the device now, reporting a failure.
    fn try_fetch(&self) -> Result<()> {
        let Some(src) = &self.source else { return Ok(()) };
        if self.starts.get().is_none() {
            let s = src.starts()?;
            let _ = self.starts.set(s);
        }
        if self.pairs.get().is_none() {
            let p = src.pairs(self.starts().last().copied().unwrap_or(0))?;
            let _ = self.pairs.set(p);
        }
        Ok(())
    }

    fn starts(&self) -> &[usize] {
        self.starts.get_or_init(|| match &self.source {
            Some(s) => fetched(s.starts()),
            None => vec![0],
        })
    }

    fn pairs(&self) -> &(Vec<u32>, Vec<u32>) {
        self.pairs.get_or_init(|| match &self.source {
            Some(s) => fetched(s.pairs(self.starts().last().copied().unwrap_or(0))),
            None => (Vec::new(), Vec::new()),
        })
    }
}

/// The `(input row, output row)` pairs of every kernel offset.
///
/// Canonical form: within each offset, pairs are sorted by output row; each output row
/// (and each input row) appears at most once per offset. Output at `q` sums
/// `W[k]ᵀ · input(in_idx)` over the pairs of every offset `k` whose `out_idx` is `q`.
#[derive(Debug, Clone)]
pub struct KernelMap {
    /// What this map connects.
    kind: MapKind,
    /// Kernel geometry.
    spec: KernelSpec,
    /// Offsets in input-grid units (for `Up`: the offsets of the matching downsampling conv).
    offsets: Vec<[i32; 3]>,
    /// Input coordinates.
    in_coords: Arc<CoordSet>,
    /// Output coordinates (shared with the input for submanifold maps).
    out_coords: Arc<CoordSet>,
    /// Per-offset counts and the pairs, possibly still on a device (see [`MapSource`]).
    pairs: PairStore,
    /// Offset whose map is the identity on all rows (the centre of a submanifold conv).
    identity: Option<usize>,
    /// The centre offset of a submanifold or subset map: accumulated first into every row.
    centre: Option<usize>,
    /// Index of the offset `-δ` for each offset `δ`, where present (submanifold only).
    mirror: Vec<Option<usize>>,
    /// Offsets the map was built for, when built for a subset (offset-pruned convs): the
    /// others have no pairs, and a conv whose weights use them must not run on this map.
    kept: Option<Vec<bool>>,
}

impl KernelMap {
    /// What this map connects.
    pub fn kind(&self) -> MapKind {
        self.kind
    }

    /// Kernel geometry.
    pub fn spec(&self) -> KernelSpec {
        self.spec
    }

    /// Offsets in input-grid units (for `Up`: the offsets of the matching downsampling conv).
    pub fn offsets(&self) -> &[[i32; 3]] {
        &self.offsets
    }

    /// Input coordinates.
    pub fn in_coords(&self) -> &Arc<CoordSet> {
        &self.in_coords
    }

    /// Replace the input coordinates by the same set held elsewhere (a transposed map takes
    /// the caller's `Arc` so later layers find it by pointer); the rows must not change.
    pub(crate) fn share_in_coords(&mut self, c: Arc<CoordSet>) {
        debug_assert_eq!(c.len(), self.in_coords.len());
        self.in_coords = c;
    }

    /// Output coordinates (shared with the input for submanifold maps).
    pub fn out_coords(&self) -> &Arc<CoordSet> {
        &self.out_coords
    }

    /// Offset whose map is the identity on all rows (the centre of a submanifold conv).
    pub fn identity(&self) -> Option<usize> {
        self.identity
    }

    /// Index of the offset `-δ` for each offset `δ`, where present (submanifold only).
    pub fn mirror(&self) -> &[Option<usize>] {
        &self.mirror
    }

    /// Check conv operand shapes against the map (every backend runs this first).
    pub fn check_operands(&self, x: &[f32], cin: usize, w: &[f32], cout: usize, bias: Option<&[f32]>) -> Result<()> {
        let kv = self.volume();
        if x.len() != self.n_in() * cin {
            return Err(Error::tensor(
                "feats",
                format!("expected [{}, {cin}] for the kernel map's inputs, got {} values", self.n_in(), x.len()),
            ));
        }
        if w.len() != kv * cin * cout {
            return Err(Error::tensor(
                "kernel",
                format!("expected [{kv}, {cin}, {cout}] ({} values), got {} values", kv * cin * cout, w.len()),
            ));
        }
        if let Some(b) = bias {
            if b.len() != cout {
                return Err(Error::tensor("bias", format!("expected [{cout}], got [{}]", b.len())));
            }
        }
        Ok(())
    }

    /// The offsets this map holds pairs for, when it was built for a subset of them
    /// ([`KernelMap::keeping`]); `None`: all of them.
    pub fn kept_offsets(&self) -> Option<&[bool]> {
        self.kept.as_deref()
    }

    /// Whether offset `k` was built (not dropped by [`KernelMap::keeping`]).
    pub fn keeps(&self, k: usize) -> bool {
        self.kept.as_ref().is_none_or(|m| m.get(k).copied().unwrap_or(false))
    }

    /// Check that a conv whose all-zero offsets are `zero` may run on this map: every offset
    /// the map dropped must be all zero in the weights.
    pub fn check_kept(&self, zero: &[bool]) -> Result<()> {
        if let Some(k) = (0..self.volume()).find(|&k| !self.keeps(k) && !zero.get(k).copied().unwrap_or(false)) {
            return Err(Error::invalid(
                "conv",
                format!("the kernel map was built without offset {k}, but the weights of that offset are not zero"),
            ));
        }
        Ok(())
    }

    /// Check a mask of offsets to keep against `volume` offsets.
    pub(crate) fn check_keep(keep: &[bool], volume: usize) -> Result<()> {
        if keep.len() != volume {
            return Err(Error::invalid(
                "kept offsets",
                format!("{} flags for a kernel of {volume} offsets", keep.len()),
            ));
        }
        Ok(())
    }

    /// This map restricted to the offsets `keep` marks (the others' pairs dropped), for convs
    /// whose weights are zero at every other offset: they then skip those pairs entirely.
    /// A builder that knows `keep` in advance skips the dropped offsets' queries instead
    /// (`cpu::build_map_keeping`); this is the host-side form for maps already built.
    pub fn keeping(&self, keep: &[bool]) -> Result<KernelMap> {
        Self::check_keep(keep, self.volume())?;
        let kv = self.volume();
        let per: Vec<(Vec<u32>, Vec<u32>)> = (0..kv)
            .map(|k| {
                let (i, o) = if keep[k] { self.pairs(k) } else { (&[][..], &[][..]) };
                (i.to_vec(), o.to_vec())
            })
            .collect();
        let mut m = Self::from_pairs(
            self.kind,
            self.spec,
            self.offsets.clone(),
            self.in_coords.clone(),
            self.out_coords.clone(),
            per,
        );
        m.kept = Self::kept_mask(keep);
        Ok(m)
    }

    /// This downsampling map with only the output sites `rows` (ascending, distinct),
    /// renumbered `0..rows.len()` in that order, onto `out_coords` (those sites' coordinates):
    /// the map of a voxel-pruned downsampling conv. Every input's pairs into a kept site stay.
    /// One linear pass; each offset's output rows stay ascending (canonical order).
    pub fn restrict_outputs(&self, rows: &[u32], out_coords: Arc<CoordSet>) -> Result<KernelMap> {
        use rayon::prelude::*;
        if self.kind != MapKind::Down {
            return Err(Error::invalid("voxel pruning", "only a downsampling map drops output sites"));
        }
        let kind = MapKind::Down;
        let n = self.n_out();
        if out_coords.len() != rows.len() {
            return Err(Error::invalid(
                "voxel pruning",
                format!("{} kept rows but {} output coordinates", rows.len(), out_coords.len()),
            ));
        }
        let mut new = vec![u32::MAX; n];
        let mut prev: Option<u32> = None;
        for (j, &r) in rows.iter().enumerate() {
            if r as usize >= n || prev.is_some_and(|p| p >= r) {
                return Err(Error::invalid(
                    "voxel pruning",
                    format!("kept rows must be ascending, distinct and below {n} (row {r})"),
                ));
            }
            prev = Some(r);
            new[r as usize] = j as u32;
        }
        self.fetch()?;
        let per: Vec<(Vec<u32>, Vec<u32>)> = (0..self.volume())
            .into_par_iter()
            .map(|k| {
                let (ins, outs) = self.pairs(k);
                let mut i2 = Vec::with_capacity(ins.len().min(rows.len()));
                let mut o2 = Vec::with_capacity(ins.len().min(rows.len()));
                for (&i, &o) in ins.iter().zip(outs) {
                    let q = new[o as usize];
                    if q != u32::MAX {
                        i2.push(i);
                        o2.push(q);
                    }
                }
                (i2, o2)
            })
            .collect();
        let mut m = Self::from_pairs(kind, self.spec, self.offsets.clone(), self.in_coords.clone(), out_coords, per);
        m.kept = self.kept.clone();
        Ok(m)
    }

    /// This submanifold map with the pairs of the output rows `keep` marks only, rows not
    /// renumbered (a [`MapKind::Subset`] map on the same coordinates): the map of a
    /// voxel-pruned submanifold conv, whose other outputs are never gathered, multiplied or
    /// scattered. Counts, then one parallel pass writing the pairs in place.
    pub fn for_outputs(&self, keep: &[bool]) -> Result<KernelMap> {
        use rayon::prelude::*;
        if !matches!(self.kind, MapKind::Submanifold | MapKind::Subset) {
            return Err(Error::invalid("voxel pruning", "only a submanifold map keeps its rows"));
        }
        if keep.len() != self.n_out() {
            return Err(Error::invalid(
                "voxel pruning",
                format!("{} flags for {} output rows", keep.len(), self.n_out()),
            ));
        }
        self.fetch()?;
        let kv = self.volume();
        let counts: Vec<usize> =
            (0..kv).into_par_iter().map(|k| self.pairs(k).1.iter().filter(|&&o| keep[o as usize]).count()).collect();
        let mut starts = Vec::with_capacity(kv + 1);
        starts.push(0usize);
        for c in &counts {
            starts.push(starts[starts.len() - 1] + c);
        }
        let total = starts[kv];
        let mut in_idx = vec![0u32; total];
        let mut out_idx = vec![0u32; total];
        // Split the flat arrays at the offsets' starts, one disjoint part per offset.
        let mut parts = Vec::with_capacity(kv);
        let (mut ri, mut ro) = (&mut in_idx[..], &mut out_idx[..]);
        for c in &counts {
            let (a, rest_i) = std::mem::take(&mut ri).split_at_mut(*c);
            let (b, rest_o) = std::mem::take(&mut ro).split_at_mut(*c);
            parts.push((a, b));
            (ri, ro) = (rest_i, rest_o);
        }
        parts.into_par_iter().enumerate().for_each(|(k, (pi, po))| {
            let (ins, outs) = self.pairs(k);
            let mut j = 0;
            for (&i, &o) in ins.iter().zip(outs) {
                if keep[o as usize] {
                    pi[j] = i;
                    po[j] = o;
                    j += 1;
                }
            }
        });
        let mut m = Self::from_flat(
            MapKind::Subset,
            self.spec,
            self.offsets.clone(),
            self.in_coords.clone(),
            self.out_coords.clone(),
            starts,
            in_idx,
            out_idx,
        );
        m.kept = self.kept.clone();
        Ok(m)
    }

    /// [`KernelMap::for_outputs`] for the output rows `rows` (each below `n_out`).
    pub fn for_output_rows(&self, rows: &[u32]) -> Result<KernelMap> {
        let mut keep = vec![false; self.n_out()];
        for &r in rows {
            *keep
                .get_mut(r as usize)
                .ok_or_else(|| Error::invalid("voxel pruning", format!("kept row {r} is out of range")))? = true;
        }
        self.for_outputs(&keep)
    }

    /// `Some(keep)` unless it keeps everything.
    pub(crate) fn kept_mask(keep: &[bool]) -> Option<Vec<bool>> {
        (!keep.iter().all(|&k| k)).then(|| keep.to_vec())
    }

    /// Record that the map was built for the offsets `keep` only (builders that skipped the rest).
    pub(crate) fn with_kept(mut self, keep: Option<&[bool]>) -> Self {
        self.kept = keep.and_then(Self::kept_mask);
        self
    }

    /// Number of kernel offsets `K`.
    pub fn volume(&self) -> usize {
        self.offsets.len()
    }
    /// Number of input rows.
    pub fn n_in(&self) -> usize {
        self.in_coords.len()
    }
    /// Number of output rows.
    pub fn n_out(&self) -> usize {
        self.out_coords.len()
    }
    /// Bring a map built on a GPU to host memory now, with a failed copy (a lost device) as an
    /// error; afterwards [`KernelMap::pairs`], [`KernelMap::starts`] and the rest cannot fail.
    /// Maps built on the CPU are always on the host.
    pub fn fetch(&self) -> Result<()> {
        self.pairs.try_fetch()
    }
    /// Pairs of offset `k`: `(in_idx, out_idx)` slices (a GPU map is fetched first, panicking
    /// if that fails: call [`KernelMap::fetch`] to get the error instead).
    pub fn pairs(&self, k: usize) -> (&[u32], &[u32]) {
        let st = self.pairs.starts();
        let r = st[k]..st[k + 1];
        let (i, o) = self.pairs.pairs();
        (&i[r.clone()], &o[r])
    }
    /// Input row of every pair, offset by offset.
    pub fn in_idx(&self) -> &[u32] {
        &self.pairs.pairs().0
    }
    /// Output row of every pair, offset by offset.
    pub fn out_idx(&self) -> &[u32] {
        &self.pairs.pairs().1
    }
    /// Offset `k` owns pairs `starts()[k]..starts()[k + 1]`.
    pub fn starts(&self) -> &[usize] {
        self.pairs.starts()
    }
    /// Number of pairs of offset `k`.
    pub fn size(&self, k: usize) -> usize {
        let st = self.pairs.starts();
        st[k + 1] - st[k]
    }
    /// Total pairs over all offsets.
    pub fn total_pairs(&self) -> usize {
        self.pairs.starts().last().copied().unwrap_or(0)
    }

    /// The fixed order in which offsets are accumulated into each output row:
    /// the identity offset first, then each offset followed by its mirror.
    ///
    /// Every grouping of offsets is a sequence of contiguous runs of this order, so
    /// every grouping adds the same terms in the same order: results are bit-identical
    /// whatever grouping the tuner picks.
    pub fn canonical_order(&self) -> Vec<usize> {
        let k = self.volume();
        let mut placed = vec![false; k];
        let mut order = Vec::with_capacity(k);
        if let Some(c) = self.centre {
            placed[c] = true;
            order.push(c);
        }
        for i in 0..k {
            if placed[i] {
                continue;
            }
            placed[i] = true;
            order.push(i);
            if let Some(m) = self.mirror[i] {
                if !placed[m] {
                    placed[m] = true;
                    order.push(m);
                }
            }
        }
        order
    }

    /// Build the canonical map from per-offset `(input rows, output rows)` lists, sorting any
    /// offset whose pairs are not already in output-row order.
    pub(crate) fn from_pairs(
        kind: MapKind,
        spec: KernelSpec,
        offsets: Vec<[i32; 3]>,
        in_coords: Arc<CoordSet>,
        out_coords: Arc<CoordSet>,
        mut per: Vec<(Vec<u32>, Vec<u32>)>,
    ) -> Self {
        use rayon::prelude::*;
        let kv = offsets.len();
        debug_assert_eq!(per.len(), kv);
        per.par_iter_mut().for_each(|(ins, outs)| {
            if !outs.is_sorted() {
                let mut v: Vec<(u32, u32)> = outs.iter().copied().zip(ins.iter().copied()).collect();
                v.sort_unstable();
                (*outs, *ins) = v.into_iter().unzip();
            }
        });
        let mut starts = Vec::with_capacity(kv + 1);
        starts.push(0);
        for (ins, _) in &per {
            starts.push(starts.last().copied().unwrap_or(0) + ins.len());
        }
        let mut in_idx = Vec::with_capacity(starts[kv]);
        let mut out_idx = Vec::with_capacity(starts[kv]);
        for (ins, outs) in per {
            in_idx.extend_from_slice(&ins);
            out_idx.extend_from_slice(&outs);
        }
        Self::from_flat(kind, spec, offsets, in_coords, out_coords, starts, in_idx, out_idx)
    }

    /// A map from pairs already in the canonical layout: offset `k` owns
    /// `starts[k]..starts[k + 1]`, output rows ascending within each offset.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_flat(
        kind: MapKind,
        spec: KernelSpec,
        offsets: Vec<[i32; 3]>,
        in_coords: Arc<CoordSet>,
        out_coords: Arc<CoordSet>,
        starts: Vec<usize>,
        in_idx: Vec<u32>,
        out_idx: Vec<u32>,
    ) -> Self {
        debug_assert_eq!(starts.len(), offsets.len() + 1);
        Self::with_store(kind, spec, offsets, in_coords, out_coords, PairStore::ready(starts, in_idx, out_idx))
    }

    /// A map whose counts and pairs stay where a backend built them until first needed.
    pub(crate) fn with_source(
        kind: MapKind,
        spec: KernelSpec,
        offsets: Vec<[i32; 3]>,
        in_coords: Arc<CoordSet>,
        out_coords: Arc<CoordSet>,
        source: Arc<dyn MapSource>,
    ) -> Self {
        Self::with_store(kind, spec, offsets, in_coords, out_coords, PairStore::lazy(source))
    }

    fn with_store(
        kind: MapKind,
        spec: KernelSpec,
        offsets: Vec<[i32; 3]>,
        in_coords: Arc<CoordSet>,
        out_coords: Arc<CoordSet>,
        pairs: PairStore,
    ) -> Self {
        let centre = match kind {
            MapKind::Submanifold | MapKind::Subset => offsets.iter().position(|d| *d == [0, 0, 0]),
            _ => None,
        };
        let identity = if kind == MapKind::Submanifold { centre } else { None };
        let mirror = match kind {
            MapKind::Submanifold | MapKind::Subset => {
                offsets.iter().map(|d| offsets.iter().position(|e| *e == [-d[0], -d[1], -d[2]])).collect()
            }
            _ => vec![None; offsets.len()],
        };
        KernelMap { kind, spec, offsets, in_coords, out_coords, pairs, identity, centre, mirror, kept: None }
    }

    /// Whether the pairs are in host memory (not waiting on a device).
    pub fn pairs_fetched(&self) -> bool {
        self.pairs.pairs.get().is_some()
    }

    /// The transposed map: inputs and outputs swapped, each offset re-sorted by its new output row.
    ///
    /// The transposed map of a downsampling map is the upsampling map (kind `Up`); the
    /// backward pass of any conv runs the transposed map of its forward map.
    pub fn transposed(&self) -> KernelMap {
        let (in_idx, out_idx) = self.transposed_pairs();
        self.transposed_shell(PairStore::ready(self.starts().to_vec(), in_idx, out_idx))
    }

    /// [`KernelMap::transposed`] computed only when its pairs are first needed (a GPU conv on
    /// the transposed map needs just the counts, which equal this map's).
    pub fn transposed_lazy(self: &Arc<Self>) -> KernelMap {
        if self.pairs_fetched() {
            return self.transposed();
        }
        self.transposed_shell(PairStore::lazy(Arc::new(Transposed(self.clone()))))
    }

    fn transposed_pairs(&self) -> (Vec<u32>, Vec<u32>) {
        use rayon::prelude::*;
        let kv = self.volume();
        let per: Vec<(Vec<u32>, Vec<u32>)> = (0..kv)
            .into_par_iter()
            .map(|k| {
                let (ins, outs) = self.pairs(k);
                let mut v: Vec<(u32, u32)> = outs.iter().copied().zip(ins.iter().copied()).collect();
                // New output = old input; each appears at most once per offset.
                v.sort_unstable_by_key(|&(_, o)| o);
                v.into_iter().unzip()
            })
            .collect();
        let mut in_idx = Vec::with_capacity(self.total_pairs());
        let mut out_idx = Vec::with_capacity(self.total_pairs());
        for (i, o) in per {
            in_idx.extend_from_slice(&i);
            out_idx.extend_from_slice(&o);
        }
        (in_idx, out_idx)
    }

    fn transposed_shell(&self, pairs: PairStore) -> KernelMap {
        KernelMap {
            kind: match self.kind {
                MapKind::Down => MapKind::Up,
                MapKind::Up => MapKind::Down,
                MapKind::Submanifold => MapKind::Submanifold,
                MapKind::Subset => MapKind::Subset,
            },
            spec: self.spec,
            offsets: self.offsets.clone(),
            in_coords: self.out_coords.clone(),
            out_coords: self.in_coords.clone(),
            pairs,
            identity: self.identity,
            centre: self.centre,
            mirror: self.mirror.clone(),
            kept: self.kept.clone(),
        }
    }
}

/// The pairs of a map's transpose, computed from the map on first use.
struct Transposed(Arc<KernelMap>);

impl MapSource for Transposed {
    fn starts(&self) -> Result<Vec<usize>> {
        Ok(self.0.starts().to_vec())
    }

    fn pairs(&self, _total: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok(self.0.transposed_pairs())
    }
}

/// Empty the pairs of every offset `keep` drops (the identity's, and a mirror's whose partner
/// was queried for a kept offset).
pub(crate) fn drop_offsets(per: &mut [(Vec<u32>, Vec<u32>)], keep: Option<&[bool]>) {
    if let Some(keep) = keep {
        for (p, &k) in per.iter_mut().zip(keep) {
            if !k {
                *p = (Vec::new(), Vec::new());
            }
        }
    }
}

/// Offsets (input-grid units) of a conv with this spec on coordinates at `tensor_stride`,
/// validated against the packed-key range.
pub fn scaled_offsets(spec: &KernelSpec, tensor_stride: i32) -> Result<Vec<[i32; 3]>> {
    let step = (tensor_stride as i64) * (spec.dilation as i64);
    let reach = step * (spec.size as i64 / 2 + 1);
    if reach >= coords::COORD_LIMIT as i64 {
        return Err(Error::invalid(
            "kernel offsets",
            format!(
                "kernel size {} x tensor stride {tensor_stride} x dilation {} reaches beyond the coordinate range",
                spec.size, spec.dilation
            ),
        ));
    }
    let offs = kernel_offsets(spec.size, step as i32);
    for d in &offs {
        coords::check_offset(*d)?;
    }
    Ok(offs)
}

/// Output coordinates of a downsampling conv: unique `S·floor(c/S)` in packed-key order
/// (S = input tensor stride × conv stride). Returns the sorted packed keys.
pub(crate) fn downsample_keys(input: &CoordSet, spec: &KernelSpec) -> Result<(Vec<u64>, i32)> {
    let s = output_stride(input, spec)?;
    let mut keys = input.coords().iter().map(|&c| parent_key(c, s)).collect::<Result<Vec<u64>>>()?;
    radsort::sort(&mut keys);
    keys.dedup();
    Ok((keys, s))
}

/// Tensor stride of a conv's output: input tensor stride × conv stride, checked against the key range.
pub(crate) fn output_stride(input: &CoordSet, spec: &KernelSpec) -> Result<i32> {
    let s = input.stride() as i64 * spec.stride as i64;
    if s >= coords::COORD_LIMIT as i64 {
        return Err(Error::invalid("downsampling", format!("output tensor stride {s} is too large")));
    }
    Ok(s as i32)
}

/// Packed key of the downsampled coordinate `S·floor(c/S)` (floor division: negatives round down).
#[inline]
pub(crate) fn parent_key(c: [i32; 4], s: i32) -> Result<u64> {
    let q = [c[0], coords::floor_div(c[1], s) * s, coords::floor_div(c[2], s) * s, coords::floor_div(c[3], s) * s];
    coords::check(q)?;
    Ok(coords::pack(q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchsparse_offset_order() {
        let o = kernel_offsets(3, 1);
        assert_eq!(o.len(), 27);
        assert_eq!(o[0], [-1, -1, -1]);
        assert_eq!(o[1], [0, -1, -1]); // x fastest for odd kernels
        assert_eq!(o[3], [-1, 0, -1]);
        assert_eq!(o[9], [-1, -1, 0]);
        assert_eq!(o[13], [0, 0, 0]);
        let e = kernel_offsets(2, 2);
        assert_eq!(e, vec![[0, 0, 0], [0, 0, 2], [0, 2, 0], [0, 2, 2], [2, 0, 0], [2, 0, 2], [2, 2, 0], [2, 2, 2]]); // z fastest for even kernels
        assert_eq!(axis_offsets(4), -1..=2);
        assert_eq!(axis_offsets(5), -2..=2);
        assert_eq!(kernel_offsets(1, 4), vec![[0, 0, 0]]);
    }
}
