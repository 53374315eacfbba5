//! The segmentation job: scan → model input features → voxels → network → labels per point,
//! with per-stage timings.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::coords;
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;
use crate::io::tensors::{is_safetensors, read_voxels};
use crate::io::{read_points, PointFormat};
use crate::nn::arch::{ArchKind, NetDesc, BASE_CHANNELS};
use crate::nn::checkpoint::Checkpoint;
use crate::nn::minkunet::MinkUNet;
use crate::nn::points::PointTensor;
use crate::nn::spvcnn::Spvcnn;
use crate::tensor::{CoordSet, SparseTensor};
use crate::voxel::{voxelize, PointCloud};

/// SemanticKITTI voxel size of the SPVNAS models, metres.
pub const VOXEL_SIZE: f32 = 0.05;

/// How points become voxels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VoxelizeMode {
    /// `floor(xyz / voxel)`, features the mean over the voxel's points.
    #[default]
    Mean,
    /// SPVNAS preprocessing: `round(xyz / voxel)` shifted so the minimum is 0, features of the
    /// first point of each voxel.
    Spvnas,
}

impl std::str::FromStr for VoxelizeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Self::Mean),
            "spvnas" => Ok(Self::Spvnas),
            _ => Err(Error::invalid("--voxelize", format!("expected `mean` or `spvnas`, got `{s}`"))),
        }
    }
}

/// A loaded segmentation network.
#[derive(Debug, Clone)]
pub enum Model {
    /// MinkUNet.
    MinkUNet(MinkUNet),
    /// SPVCNN; as in SPVNAS, its points are the input voxels (one per voxel, at the voxel's
    /// integer coordinate, with the voxel's features).
    Spvcnn(Spvcnn),
}

impl Model {
    /// Load weights; `arch` and `cr` come from the flags, else the file's metadata, else the
    /// tensor shapes. A flag that contradicts the metadata is an error.
    pub fn load(path: &Path, arch: Option<&str>, cr: Option<f32>) -> Result<(Model, f32)> {
        Self::from_checkpoint(&Checkpoint::load(path)?, arch, cr)
    }

    /// [`Model::load`] from an already-read checkpoint.
    pub fn from_checkpoint(ck: &Checkpoint, arch: Option<&str>, cr: Option<f32>) -> Result<(Model, f32)> {
        let path = ck.path();
        let meta = ck.metadata().clone();
        let meta_arch = meta.get("arch").cloned();
        let arch = match (arch, meta_arch.as_deref()) {
            (Some(a), Some(m)) if a != m => {
                return Err(Error::format(path, format!("holds a `{m}` model but --arch {a} was given")));
            }
            (Some(a), _) => a.to_string(),
            (None, Some(m)) => m.to_string(),
            (None, None) => "minkunet".to_string(),
        };
        let kind = ArchKind::parse(&arch)?;
        let meta_cr = match meta.get("cr") {
            Some(v) => Some(
                v.parse::<f32>().map_err(|_| Error::format(path, format!("metadata `cr` is not a number: `{v}`")))?,
            ),
            None => None,
        };
        if let (Some(a), Some(m)) = (cr, meta_cr) {
            if (a - m).abs() > 1e-6 {
                return Err(Error::format(path, format!("holds a cr = {m} model but --cr {a} was given")));
            }
        }
        let classes = match meta.get("classes") {
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| Error::format(path, format!("metadata `classes` is not an integer: `{v}`")))?,
            None => NUM_CLASSES,
        };
        if classes != NUM_CLASSES {
            return Err(Error::format(
                path,
                format!("model predicts {classes} classes; SemanticKITTI segmentation needs {NUM_CLASSES}"),
            ));
        }
        if let Some(v) = meta.get("voxel_size") {
            if v.parse::<f32>().ok().is_none_or(|v| (v - VOXEL_SIZE).abs() > 1e-6) {
                return Err(Error::format(path, format!("model was trained at voxel size {v}, expected {VOXEL_SIZE}")));
            }
        }
        if ck.is_synthetic() {
            let cr = cr.unwrap_or(0.5);
            return Ok((Model::from_desc(ck, &NetDesc::uniform(kind, cr, classes)?)?, cr));
        }
        // Widths come from the tensors; a pruned network is any set of widths that chains.
        let desc = NetDesc::from_checkpoint(kind, ck, classes)?;
        let uniform = desc.uniform_cr();
        if let (Some(a), None) = (cr, meta_cr) {
            if uniform.is_none_or(|u| (u - a).abs() > 1e-6) {
                return Err(Error::format(
                    path,
                    format!(
                        "holds a network with widths {} (`stem.0.kernel` has {} output channels), not the uniform cr = {a} network --cr {a} asks for",
                        desc.widths_summary(),
                        desc.stem[0].cout
                    ),
                ));
            }
        }
        // The width factor reported: the file's, else the uniform network's, else the stem's.
        let cr = meta_cr.or(uniform).unwrap_or(desc.stem[0].cout as f32 / BASE_CHANNELS[0] as f32);
        Ok((Model::from_desc(ck, &desc)?, cr))
    }

    /// The network `desc` from a checkpoint (any per-layer widths).
    pub fn from_desc(ck: &Checkpoint, desc: &NetDesc) -> Result<Model> {
        Ok(match desc.kind {
            ArchKind::MinkUNet => Model::MinkUNet(MinkUNet::from_desc(ck, desc)?),
            ArchKind::Spvcnn => Model::Spvcnn(Spvcnn::from_desc(ck, desc)?),
        })
    }

    /// Load architecture `arch`: with the checkpoint's own widths, or the uniform network of
    /// `cr` when the checkpoint is synthetic.
    pub fn load_arch(arch: &str, ck: &Checkpoint, cr: f32, classes: usize) -> Result<Model> {
        Self::from_desc(ck, &NetDesc::for_checkpoint(ArchKind::parse(arch)?, ck, cr, classes)?)
    }

    /// The description the network was built from.
    pub fn desc(&self) -> &NetDesc {
        match self {
            Model::MinkUNet(m) => &m.desc,
            Model::Spvcnn(m) => &m.body.desc,
        }
    }

    /// Prune voxels as `plan` says (see [`crate::voxel_prune`]). SPVCNN's point branch reads
    /// every level's voxels, so its downsampling convs cannot be pruned.
    pub fn set_voxel_plan(&mut self, plan: &crate::voxel_prune::VoxelPlan) -> Result<()> {
        match self {
            Model::MinkUNet(m) => m.set_voxel_plan(plan),
            Model::Spvcnn(m) => {
                let downs: Vec<&str> = m.body.desc.stages.iter().map(|s| s.resample.kernel.as_str()).collect();
                if let Some(d) = plan.ratios.iter().find(|(n, &r)| r > 0.0 && downs.contains(&n.as_str())) {
                    return Err(Error::invalid(
                        "voxel plan",
                        format!("names `{}`: SPVCNN's point branch needs every voxel of each level", d.0),
                    ));
                }
                m.body.set_voxel_plan(plan)
            }
        }
    }

    /// Architecture name as in the weights' metadata.
    pub fn arch(&self) -> &'static str {
        match self {
            Model::MinkUNet(_) => "minkunet",
            Model::Spvcnn(_) => "spvcnn",
        }
    }

    /// Logits `[N, 19]` for voxels with 4 input features.
    pub fn forward(&self, e: &Engine, x: &SparseTensor) -> Result<Vec<f32>> {
        match self {
            Model::MinkUNet(m) => m.forward(e, x),
            Model::Spvcnn(m) => {
                let coords = x.coords().iter().map(|c| [c[1] as f32, c[2] as f32, c[3] as f32]).collect();
                let batch = x.coords().iter().map(|c| c[0]).collect();
                let z = PointTensor::new(coords, batch, x.try_feats()?.to_vec(), x.channels())?;
                m.forward(e, &z)
            }
        }
    }
}

/// Per-point model input `[N, 4]`: x, y, z, remission (nuScenes intensity / 255; 0 where the
/// format has none). A 4-column scan of any other format already is the input and comes back
/// as it is, without a copy.
pub fn model_input(cloud: PointCloud, format: PointFormat) -> Result<PointCloud> {
    if cloud.dims == 4 && format != PointFormat::NuScenes {
        return Ok(cloud);
    }
    let mut out = Vec::with_capacity(cloud.len() * 4);
    for i in 0..cloud.len() {
        let p = cloud.point(i);
        let r = match (format, p.len()) {
            (PointFormat::NuScenes, n) if n >= 4 => p[3] / 255.0,
            (_, n) if n >= 4 => p[3],
            _ => 0.0,
        };
        out.extend_from_slice(&[p[0], p[1], p[2], r]);
    }
    PointCloud::new(out, 4)
}

/// Voxels for the network plus the map back to points.
pub struct Prepared {
    /// Model input.
    pub voxels: SparseTensor,
    /// Voxel row of every point (`None` when the input was already voxelized).
    pub inverse: Option<Vec<u32>>,
    /// Number of input points.
    pub points: usize,
}

/// Voxelize points for the network.
pub fn prepare_points(cloud: &PointCloud, mode: VoxelizeMode) -> Result<Prepared> {
    if cloud.is_empty() {
        return Err(Error::invalid("segment", "the scan holds no points"));
    }
    match mode {
        VoxelizeMode::Mean => {
            let v = voxelize(cloud, VOXEL_SIZE)?;
            Ok(Prepared { voxels: v.tensor, inverse: Some(v.inverse), points: cloud.len() })
        }
        VoxelizeMode::Spvnas => {
            let mut c: Vec<[i32; 3]> = Vec::with_capacity(cloud.len());
            for i in 0..cloud.len() {
                let p = cloud.point(i);
                let r = |v: f32| (v / VOXEL_SIZE).round();
                let q = [r(p[0]), r(p[1]), r(p[2])];
                if q.iter().any(|v| v.abs() >= coords::COORD_LIMIT as f32) {
                    return Err(Error::invalid("voxelize", format!("point {i} is too far from the origin")));
                }
                c.push([q[0] as i32, q[1] as i32, q[2] as i32]);
            }
            let mut lo = [i32::MAX; 3];
            for q in &c {
                for a in 0..3 {
                    lo[a] = lo[a].min(q[a]);
                }
            }
            let mut keyed: Vec<(u64, u32)> = c
                .iter()
                .enumerate()
                .map(|(i, q)| (coords::pack([0, q[0] - lo[0], q[1] - lo[1], q[2] - lo[2]]), i as u32))
                .collect();
            // Out-of-range after the shift is impossible: the span is below 2 * COORD_LIMIT
            // only if the scan fits; check to be sure.
            for q in &c {
                coords::check([0, q[0] - lo[0], q[1] - lo[1], q[2] - lo[2]])?;
            }
            radsort::sort_by_key(&mut keyed, |e| e.0);
            let (mut vc, mut vf) = (Vec::new(), Vec::new());
            let mut inverse = vec![0u32; cloud.len()];
            let mut i = 0;
            while i < keyed.len() {
                let key = keyed[i].0;
                let first = keyed[i].1 as usize;
                vc.push(coords::unpack(key));
                vf.extend_from_slice(cloud.point(first));
                while i < keyed.len() && keyed[i].0 == key {
                    inverse[keyed[i].1 as usize] = (vc.len() - 1) as u32;
                    i += 1;
                }
            }
            let set = Arc::new(CoordSet::new(vc, 1)?);
            Ok(Prepared { voxels: SparseTensor::new(set, vf, 4)?, inverse: Some(inverse), points: cloud.len() })
        }
    }
}

/// Several scans as one batch (scan `i` gets batch index `i`), voxelized as [`prepare_points`]
/// does (`mean`); `points` counts the points of all of them, `inverse` runs over them in order.
pub fn prepare_batch(clouds: &[PointCloud]) -> Result<Prepared> {
    if clouds.is_empty() || clouds.iter().any(|c| c.is_empty()) {
        return Err(Error::invalid("segment", "a batch needs scans with points"));
    }
    let v = crate::voxel::voxelize_batch(clouds, VOXEL_SIZE)?;
    Ok(Prepared { voxels: v.tensor, inverse: Some(v.inverse), points: clouds.iter().map(|c| c.len()).sum() })
}

/// Read a scan (or already-voxelized `coords`/`feats` safetensors) into network input.
pub fn prepare_file(path: &Path, format: Option<PointFormat>, mode: VoxelizeMode) -> Result<Prepared> {
    if is_safetensors(path) {
        let voxels = read_voxels(path)?;
        if voxels.channels() != 4 {
            return Err(Error::format(path, format!("tensor `feats` has {} channels, expected 4", voxels.channels())));
        }
        if voxels.is_empty() {
            return Err(Error::format(path, "the input holds no voxels"));
        }
        let points = voxels.len();
        return Ok(Prepared { voxels, inverse: None, points });
    }
    let format = match format {
        Some(f) => f,
        None => PointFormat::detect(path)?,
    };
    let cloud = read_points(path, Some(format))?;
    if cloud.is_empty() {
        return Err(Error::format(path, "the scan holds no points"));
    }
    prepare_points(&model_input(cloud, format)?, mode).map_err(|e| e.in_file(path))
}

/// The points of a scan file (x, y, z, ...), or `None` for voxelized safetensors input.
pub fn points_of(path: &Path, format: Option<PointFormat>) -> Result<Option<PointCloud>> {
    if is_safetensors(path) {
        return Ok(None);
    }
    read_points(path, format).map(Some)
}

/// Wall-clock seconds per stage of one scan.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Reading the scan file, voxelization and feature preparation (what a scan costs before
    /// the network; `segment` and `bench` time it from the file).
    pub voxelize: f64,
    /// Kernel-map builds inside the network.
    pub kernel_maps: f64,
    /// Voxel pruning's own work inside the network (scoring, selecting, restricting maps,
    /// filling pruned rows); zero without voxel pruning.
    pub voxel_prune: f64,
    /// Network forward minus kernel maps and voxel pruning (convs, BN-folded biases, ReLU, adds,
    /// concat, classifier).
    pub conv: f64,
    /// Argmax and mapping back to points.
    pub other: f64,
}

impl Timings {
    /// Sum of the stages.
    pub fn total(&self) -> f64 {
        self.voxelize + self.kernel_maps + self.voxel_prune + self.conv + self.other
    }
}

/// Network output for one scan.
pub struct Segmentation {
    /// Logits `[V, 19]` per voxel; logit j is training id j + 1.
    pub logits: Vec<f32>,
    /// Training id (1..=19) per voxel.
    pub voxel_labels: Vec<u32>,
    /// Training id per input point (per voxel for voxelized input).
    pub point_labels: Vec<u32>,
}

/// Training ids (1..=19) per voxel from logits `[V, 19]` (argmax, ties to the lower id), and
/// per input point through the voxelization's inverse map (per voxel for voxelized input).
pub fn labels(logits: &[f32], p: &Prepared) -> (Vec<u32>, Vec<u32>) {
    let voxel_labels: Vec<u32> = logits
        .chunks_exact(NUM_CLASSES)
        .map(|row| {
            let mut best = 0;
            for j in 1..row.len() {
                if row[j] > row[best] {
                    best = j;
                }
            }
            best as u32 + 1
        })
        .collect();
    let point_labels = match &p.inverse {
        Some(inv) => inv.iter().map(|&v| voxel_labels[v as usize]).collect(),
        None => voxel_labels.clone(),
    };
    (voxel_labels, point_labels)
}

/// Run the network on prepared voxels. The engine's map cache is cleared first (a new scan).
pub fn segment(e: &Engine, model: &Model, p: &Prepared, timings: &mut Timings) -> Result<Segmentation> {
    e.clear_cache();
    e.take_map_seconds();
    e.take_prune_seconds();
    let t0 = Instant::now();
    let logits = model.forward(e, &p.voxels)?;
    let fwd = t0.elapsed().as_secs_f64();
    let maps = e.take_map_seconds();
    let prune = e.take_prune_seconds();
    timings.kernel_maps = maps;
    timings.voxel_prune = prune;
    timings.conv = (fwd - maps - prune).max(0.0);
    let t1 = Instant::now();
    let (voxel_labels, point_labels) = labels(&logits, p);
    timings.other = t1.elapsed().as_secs_f64();
    Ok(Segmentation { logits, voxel_labels, point_labels })
}
