//! Training-mode MinkUNet and SPVCNN: BatchNorm kept as a layer (batch statistics, running
//! averages updated), every activation kept on a tape for one whole-network backward pass.
//! Parameters live in one [`Params`] store under their TorchSparse / SPVNAS names, so a
//! checkpoint written from it loads straight into the inference model (which folds BatchNorm).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ops::{batchnorm_backward, batchnorm_train_fused, linear_backward, relu_backward, BnCache, BN_MOMENTUM};
use crate::device::{ConvWeight, Engine};
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::kmap::{KernelMap, KernelSpec};
use crate::nn::arch::{ArchKind, BlockDesc, ConvDesc, LinearDesc, NetDesc, StageDesc, IN_CHANNELS, POINT_MEETINGS};
use crate::nn::checkpoint::Checkpoint;
use crate::nn::points::{
    average_backward, point_to_voxel_at, point_voxels, voxel_to_point, voxel_to_point_backward, PointTensor,
};
use crate::tensor::{CoordSet, SparseTensor};
use crate::voxel_prune::{importance, kept_rows, Fill, VoxelLayer, VoxelPlan};

/// What a parameter tensor is, for optimizer options and penalties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Conv kernel `[K, Cin, Cout]` (or `[Cin, Cout]`).
    Kernel,
    /// BatchNorm scale γ.
    BnScale,
    /// BatchNorm shift β.
    BnShift,
    /// BatchNorm running mean / variance: updated by the forward pass, not by the optimizer.
    RunningStat,
    /// Linear weight `[out, in]`.
    LinearWeight,
    /// Linear bias.
    LinearBias,
}

/// Named parameter tensors in a fixed order (the order the network asks for them).
#[derive(Debug, Clone, Default)]
pub struct Params {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    roles: Vec<Role>,
    /// Values, parallel to [`Params::names`].
    pub values: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

impl Params {
    fn take(&mut self, ck: &Checkpoint, name: &str, shape: &[usize], role: Role) -> Result<usize> {
        let v = ck.take(name, shape)?;
        self.index.insert(name.to_string(), self.names.len());
        self.names.push(name.to_string());
        self.shapes.push(shape.to_vec());
        self.roles.push(role);
        self.values.push(v);
        Ok(self.names.len() - 1)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// No tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Name of tensor `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Shape of tensor `i`.
    pub fn shape(&self, i: usize) -> &[usize] {
        &self.shapes[i]
    }

    /// Role of tensor `i`.
    pub fn role(&self, i: usize) -> Role {
        self.roles[i]
    }

    /// Index of the tensor called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Whether the optimizer updates tensor `i`.
    pub fn trainable(&self, i: usize) -> bool {
        self.roles[i] != Role::RunningStat
    }

    /// Total number of values in trainable tensors.
    pub fn trainable_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.trainable(i)).map(|i| self.values[i].len()).sum()
    }

    /// All tensors by name, for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor<f32>> {
        (0..self.len())
            .map(|i| (self.names[i].clone(), Tensor { shape: self.shapes[i].clone(), data: self.values[i].clone() }))
            .collect()
    }

    /// Zero gradients, one per tensor (empty for running statistics).
    pub fn zero_grads(&self) -> Vec<Vec<f32>> {
        (0..self.len()).map(|i| if self.trainable(i) { vec![0.0; self.values[i].len()] } else { Vec::new() }).collect()
    }
}

/// Rows `rows` of `x` (`[n, c]`), compacted.
fn gather_rows(x: &[f32], c: usize, rows: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * c);
    for &q in rows {
        out.extend_from_slice(&x[q as usize * c..(q as usize + 1) * c]);
    }
    out
}

/// Write compacted rows back at `rows` of `dst` (`[n, c]`).
fn scatter_rows(dst: &mut [f32], c: usize, rows: &[u32], src: &[f32]) {
    for (j, &q) in rows.iter().enumerate() {
        dst[q as usize * c..(q as usize + 1) * c].copy_from_slice(&src[j * c..(j + 1) * c]);
    }
}

fn add_into(acc: &mut [f32], v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// Conv (no bias, as in TorchSparse) + BatchNorm + optional residual add + optional ReLU.
#[derive(Debug, Clone)]
struct ConvBn {
    kernel: usize,
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
    spec: KernelSpec,
    transposed: bool,
    cin: usize,
    cout: usize,
    relu: bool,
    /// Voxel pruning of this conv (see [`crate::voxel_prune`]); the selection is not
    /// differentiated (plain fine-tuning: the kept set is a constant of each step).
    voxel: Option<VoxelLayer>,
}

/// A voxel-pruned submanifold conv's rows: which were computed and what the others got.
struct VoxelTape {
    /// Computed rows, ascending.
    rows: Vec<u32>,
    /// The fill the pruned rows got (resolved for the widths).
    fill: Fill,
    /// The whole output (its pruned rows give the fill's ReLU mask).
    out: Arc<SparseTensor>,
}

struct ConvBnTape {
    x: Arc<SparseTensor>,
    map: Arc<KernelMap>,
    bn: BnCache,
    /// Output after ReLU (for the ReLU backward).
    y: Option<Arc<SparseTensor>>,
    /// Whether a residual was added before the ReLU.
    residual: bool,
    /// Set when only some rows were computed (the BatchNorm cache and `y` are then those
    /// rows', compacted).
    voxel: Option<VoxelTape>,
}

impl ConvBn {
    fn load(p: &mut Params, ck: &Checkpoint, d: &ConvDesc) -> Result<Self> {
        let (bn, cout) = (&d.bn, d.cout);
        Ok(Self {
            kernel: p.take(ck, &d.kernel, &d.kernel_shape(), Role::Kernel)?,
            gamma: p.take(ck, &format!("{bn}.weight"), &[cout], Role::BnScale)?,
            beta: p.take(ck, &format!("{bn}.bias"), &[cout], Role::BnShift)?,
            mean: p.take(ck, &format!("{bn}.running_mean"), &[cout], Role::RunningStat)?,
            var: p.take(ck, &format!("{bn}.running_var"), &[cout], Role::RunningStat)?,
            spec: d.spec,
            transposed: d.transposed,
            cin: d.cin,
            cout,
            relu: d.relu,
            voxel: None,
        })
    }

    fn weight(&self, p: &Params) -> Result<ConvWeight> {
        ConvWeight::new(p.values[self.kernel].clone(), self.spec.volume(), self.cin, self.cout, None)
    }

    fn forward(
        &self,
        p: &mut Params,
        e: &Engine,
        x: &Arc<SparseTensor>,
        target: Option<&Arc<CoordSet>>,
        residual: Option<&SparseTensor>,
    ) -> Result<(Arc<SparseTensor>, ConvBnTape)> {
        let voxel = self.voxel.filter(|_| !self.transposed);
        let rows = match voxel {
            Some(v) => {
                let coords = x.coords();
                Some(kept_rows(&importance(x.feats(), x.channels(), v.score), |i| coords[i][0], v.ratio)?)
            }
            None => None,
        };
        let map = match (self.transposed, target, &rows) {
            (true, Some(t), _) => e.transposed_map(x.coord_set(), t, self.spec)?,
            (true, None, _) => return Err(Error::invalid("transposed conv", "no target coordinates given")),
            (false, _, Some(r)) if self.spec.stride > 1 => e.pruned_down_map(x.coord_set(), self.spec, None, r)?,
            (false, _, Some(r)) => Arc::new(e.kernel_map(x.coord_set(), self.spec)?.for_output_rows(r)?),
            (false, _, None) => e.kernel_map(x.coord_set(), self.spec)?,
        };
        let z = e.conv_with_map(&map, x, &self.weight(p)?)?;
        // A pruned submanifold conv: BatchNorm sees the computed rows only.
        let sub_rows = rows.filter(|_| self.spec.stride == 1);
        let (zf, res) = match &sub_rows {
            Some(r) => (gather_rows(z.feats(), self.cout, r), residual.map(|x| gather_rows(x.feats(), self.cout, r))),
            None => (z.into_feats(), None),
        };
        let (gamma, beta) = (p.values[self.gamma].clone(), p.values[self.beta].clone());
        let mut mean = std::mem::take(&mut p.values[self.mean]);
        let mut var = std::mem::take(&mut p.values[self.var]);
        let bn = batchnorm_train_fused(
            zf,
            self.cout,
            &gamma,
            &beta,
            &mut mean,
            &mut var,
            res.as_deref().or(residual.map(|r| r.feats())),
            self.relu,
        );
        p.values[self.mean] = mean;
        p.values[self.var] = var;
        let (y, bn) = bn?;
        let Some(r) = sub_rows else {
            let y = Arc::new(SparseTensor::new(map.out_coords().clone(), y, self.cout)?);
            let tape = ConvBnTape {
                x: x.clone(),
                map,
                bn,
                y: self.relu.then(|| y.clone()),
                residual: residual.is_some(),
                voxel: None,
            };
            return Ok((y, tape));
        };
        let fill = voxel.map_or(Fill::Zero, |v| v.fill.resolve(self.cin, self.cout));
        let c = self.cout;
        // Computed rows from the BatchNorm; the others: the input, the activated residual, or 0.
        let mut full = match (fill, residual) {
            (Fill::Input, _) => x.feats().to_vec(),
            (Fill::Zero, Some(res)) => res.feats().iter().map(|&v| if self.relu { v.max(0.0) } else { v }).collect(),
            (Fill::Zero, None) => vec![0f32; x.len() * c],
        };
        for (j, &q) in r.iter().enumerate() {
            full[q as usize * c..(q as usize + 1) * c].copy_from_slice(&y[j * c..(j + 1) * c]);
        }
        // The computed rows' output (for the ReLU backward), on their own coordinates.
        let kept = CoordSet::new_unchecked(r.iter().map(|&q| x.coords()[q as usize]).collect(), x.stride());
        let yk = Arc::new(SparseTensor::new(Arc::new(kept), y, c)?);
        let out = Arc::new(SparseTensor::new(map.out_coords().clone(), full, c)?);
        let tape = ConvBnTape {
            x: x.clone(),
            map,
            bn,
            y: self.relu.then_some(yk),
            residual: residual.is_some(),
            voxel: Some(VoxelTape { rows: r, fill, out: out.clone() }),
        };
        Ok((out, tape))
    }

    /// Returns the input gradient (when asked) and the gradient at the residual (pre-ReLU sum;
    /// empty when no residual was added).
    fn backward(
        &self,
        p: &Params,
        g: &mut [Vec<f32>],
        e: &Engine,
        t: &ConvBnTape,
        dy: Vec<f32>,
        need_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        // A voxel-pruned conv: the computed rows' gradient goes through the BatchNorm; the
        // pruned rows' goes to what filled them (the input, or the residual through the ReLU).
        let full_dy = dy;
        let dy = match &t.voxel {
            Some(v) => gather_rows(&full_dy, self.cout, &v.rows),
            None => full_dy.clone(),
        };
        // The gradient at the residual (pre-ReLU sum) is materialized only where a residual
        // was added; elsewhere the ReLU mask is applied inside the BatchNorm backward.
        let (d, dz, dgamma, dbeta) = match (&t.y, t.residual) {
            (Some(y), true) => {
                let d = relu_backward(y.feats(), &dy);
                let (dz, dg, db) = batchnorm_backward(&d, self.cout, &p.values[self.gamma], &t.bn, None);
                (d, dz, dg, db)
            }
            (Some(y), false) => {
                let (dz, dg, db) = batchnorm_backward(&dy, self.cout, &p.values[self.gamma], &t.bn, Some(y.feats()));
                (Vec::new(), dz, dg, db)
            }
            (None, _) => {
                let (dz, dg, db) = batchnorm_backward(&dy, self.cout, &p.values[self.gamma], &t.bn, None);
                (dy, dz, dg, db)
            }
        };
        add_into(&mut g[self.gamma], &dgamma);
        add_into(&mut g[self.beta], &dbeta);
        let Some(v) = &t.voxel else {
            let grads = e.conv_backward(&t.map, &t.x, &self.weight(p)?, &dz, need_dx)?;
            add_into(&mut g[self.kernel], &grads.dw);
            return Ok((grads.dx, d));
        };
        let c = self.cout;
        let n = t.x.len();
        // The conv's output gradient: the computed rows' (the map has no pairs at the others).
        let mut dz_full = vec![0f32; n * c];
        scatter_rows(&mut dz_full, c, &v.rows, &dz);
        let grads = e.conv_backward(&t.map, &t.x, &self.weight(p)?, &dz_full, need_dx || v.fill == Fill::Input)?;
        add_into(&mut g[self.kernel], &grads.dw);
        let mut computed = vec![false; n];
        v.rows.iter().for_each(|&q| computed[q as usize] = true);
        let mut dx = grads.dx;
        if let (Fill::Input, Some(dx)) = (v.fill, dx.as_mut()) {
            for q in (0..n).filter(|&q| !computed[q]) {
                add_into(&mut dx[q * c..(q + 1) * c], &full_dy[q * c..(q + 1) * c]);
            }
        }
        // The residual's gradient: through the BatchNorm path at computed rows; through the
        // ReLU of the fill at pruned rows (zero fill), none otherwise.
        let dres = if t.residual {
            let mut dres = vec![0f32; n * c];
            scatter_rows(&mut dres, c, &v.rows, &d);
            if v.fill == Fill::Zero {
                let y = v.out.feats();
                for q in (0..n).filter(|&q| !computed[q]) {
                    for i in q * c..(q + 1) * c {
                        dres[i] = if self.relu && y[i] <= 0.0 { 0.0 } else { full_dy[i] };
                    }
                }
            }
            dres
        } else {
            Vec::new()
        };
        Ok((dx, dres))
    }
}

/// TorchSparse `ResidualBlock` in training mode.
#[derive(Debug, Clone)]
struct Block {
    c1: ConvBn,
    c2: ConvBn,
    shortcut: Option<ConvBn>,
}

struct BlockTape {
    c1: ConvBnTape,
    c2: ConvBnTape,
    shortcut: Option<ConvBnTape>,
}

impl Block {
    fn load(p: &mut Params, ck: &Checkpoint, d: &BlockDesc) -> Result<Self> {
        Ok(Self {
            c1: ConvBn::load(p, ck, &d.c1)?,
            c2: ConvBn::load(p, ck, &d.c2)?,
            shortcut: d.shortcut.as_ref().map(|s| ConvBn::load(p, ck, s)).transpose()?,
        })
    }

    fn forward(&self, p: &mut Params, e: &Engine, x: &Arc<SparseTensor>) -> Result<(Arc<SparseTensor>, BlockTape)> {
        let (h, c1) = self.c1.forward(p, e, x, None, None)?;
        let (sc, shortcut) = match &self.shortcut {
            Some(s) => {
                let (y, t) = s.forward(p, e, x, None, None)?;
                (y, Some(t))
            }
            None => (x.clone(), None),
        };
        let (y, c2) = self.c2.forward(p, e, &h, None, Some(&sc))?;
        Ok((y, BlockTape { c1, c2, shortcut }))
    }

    fn backward(&self, p: &Params, g: &mut [Vec<f32>], e: &Engine, t: &BlockTape, dy: Vec<f32>) -> Result<Vec<f32>> {
        let (dh, dres) = self.c2.backward(p, g, e, &t.c2, dy, true)?;
        let dh = dh.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
        let (dx1, _) = self.c1.backward(p, g, e, &t.c1, dh, true)?;
        let mut dx = dx1.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
        match (&self.shortcut, &t.shortcut) {
            (Some(s), Some(st)) => {
                let (d, _) = s.backward(p, g, e, st, dres, true)?;
                add_into(&mut dx, &d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?);
            }
            _ => add_into(&mut dx, &dres),
        }
        Ok(dx)
    }
}

/// A strided conv (down) or transposed conv (up) followed by two residual blocks.
#[derive(Debug, Clone)]
struct Stage {
    resample: ConvBn,
    blocks: [Block; 2],
}

struct StageTape {
    resample: ConvBnTape,
    blocks: Vec<BlockTape>,
    /// Channels of the upsampled part of the concat (up stages).
    up_channels: usize,
}

impl Stage {
    /// The two residual blocks after the resampling conv.
    fn blocks_forward(
        &self,
        p: &mut Params,
        e: &Engine,
        mut y: Arc<SparseTensor>,
    ) -> Result<(Arc<SparseTensor>, Vec<BlockTape>)> {
        let mut tapes = Vec::new();
        for b in &self.blocks {
            let (z, bt) = b.forward(p, e, &y)?;
            y = z;
            tapes.push(bt);
        }
        Ok((y, tapes))
    }

    /// Gradient at the blocks' input.
    fn blocks_backward(
        &self,
        p: &Params,
        g: &mut [Vec<f32>],
        e: &Engine,
        tapes: &[BlockTape],
        mut dh: Vec<f32>,
    ) -> Result<Vec<f32>> {
        for (b, bt) in self.blocks.iter().zip(tapes).rev() {
            dh = b.backward(p, g, e, bt, dh)?;
        }
        Ok(dh)
    }
}

/// One point MLP of SPVCNN (`point_transforms.i`): Linear, BatchNorm1d (training mode), ReLU.
#[derive(Debug, Clone)]
struct PointMlp {
    w: usize,
    b: usize,
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
    cin: usize,
    cout: usize,
}

struct PointMlpTape {
    x: Vec<f32>,
    bn: BnCache,
    y: Vec<f32>,
}

impl PointMlp {
    fn load(p: &mut Params, ck: &Checkpoint, d: &LinearDesc) -> Result<Self> {
        let (l, cin, cout) = (&d.prefix, d.cin, d.cout);
        let n = d.bn.as_deref().ok_or_else(|| Error::invalid("SPVCNN", "a point transform without BatchNorm"))?;
        Ok(Self {
            w: p.take(ck, &format!("{l}.weight"), &[cout, cin], Role::LinearWeight)?,
            b: p.take(ck, &format!("{l}.bias"), &[cout], Role::LinearBias)?,
            gamma: p.take(ck, &format!("{n}.weight"), &[cout], Role::BnScale)?,
            beta: p.take(ck, &format!("{n}.bias"), &[cout], Role::BnShift)?,
            mean: p.take(ck, &format!("{n}.running_mean"), &[cout], Role::RunningStat)?,
            var: p.take(ck, &format!("{n}.running_var"), &[cout], Role::RunningStat)?,
            cin,
            cout,
        })
    }

    fn forward(&self, p: &mut Params, e: &Engine, x: &[f32]) -> Result<(Vec<f32>, PointMlpTape)> {
        let z = e.linear(x, self.cin, &p.values[self.w], &p.values[self.b], self.cout)?;
        let (gamma, beta) = (p.values[self.gamma].clone(), p.values[self.beta].clone());
        let mut mean = std::mem::take(&mut p.values[self.mean]);
        let mut var = std::mem::take(&mut p.values[self.var]);
        let r = batchnorm_train_fused(z, self.cout, &gamma, &beta, &mut mean, &mut var, None, true);
        p.values[self.mean] = mean;
        p.values[self.var] = var;
        let (y, bn) = r?;
        Ok((y.clone(), PointMlpTape { x: x.to_vec(), bn, y }))
    }

    /// Adds the parameter gradients into `g`; returns the gradient at the input.
    fn backward(&self, p: &Params, g: &mut [Vec<f32>], t: &PointMlpTape, dy: &[f32]) -> Vec<f32> {
        let (dz, dgamma, dbeta) = batchnorm_backward(dy, self.cout, &p.values[self.gamma], &t.bn, Some(&t.y));
        add_into(&mut g[self.gamma], &dgamma);
        add_into(&mut g[self.beta], &dbeta);
        let (dx, dw, db) = linear_backward(&t.x, self.cin, &p.values[self.w], self.cout, &dz);
        add_into(&mut g[self.w], &dw);
        add_into(&mut g[self.b], &db);
        dx
    }
}

/// Input of the classifier: voxel features (MinkUNet) or point features (SPVCNN).
enum HeadIn {
    Voxels(Arc<SparseTensor>),
    Points(Vec<f32>),
}

impl HeadIn {
    fn feats(&self) -> &[f32] {
        match self {
            HeadIn::Voxels(t) => t.feats(),
            HeadIn::Points(f) => f,
        }
    }
}

/// One meeting of SPVCNN's branches: points take the voxels `src` interpolated at them plus
/// their MLP of the previous point features; then (except the last) they are averaged into
/// `src`'s voxels for the next up stage.
struct PointUpdateTape {
    src: Arc<SparseTensor>,
    mlp: PointMlpTape,
    /// Voxel of `src` each point averages into (the first two updates).
    to_voxels: Option<Vec<Option<u32>>>,
}

/// What SPVCNN's point branch keeps for the backward pass.
struct PointTape {
    /// Point coordinates (features unused).
    z: PointTensor,
    /// The stem output the points first read, and the voxel each point averages into.
    stem_out: Arc<SparseTensor>,
    first_voxels: Vec<Option<u32>>,
    updates: Vec<PointUpdateTape>,
}

/// Everything the backward pass needs from one forward pass.
pub struct Tape {
    stem: Vec<ConvBnTape>,
    stages: Vec<StageTape>,
    ups: Vec<StageTape>,
    head_in: HeadIn,
    points: Option<PointTape>,
}

/// MinkUNet or SPVCNN (the SPVNAS SemanticKITTI architectures) with BatchNorm as layers, for
/// training.
#[derive(Debug, Clone)]
pub struct TrainNet {
    /// Parameters and BatchNorm statistics under TorchSparse names.
    pub params: Params,
    /// The description it was built from (widths, shortcuts, tensor names).
    pub desc: NetDesc,
    /// Output classes.
    pub num_classes: usize,
    stem: [ConvBn; 2],
    stages: Vec<Stage>,
    ups: Vec<Stage>,
    head_w: usize,
    head_b: usize,
    head_in: usize,
    /// SPVCNN's `point_transforms.{0,1,2}`; `None` for MinkUNet.
    points: Option<Vec<PointMlp>>,
}

impl TrainNet {
    /// MinkUNet from a checkpoint (a saved model, or [`Checkpoint::fresh`] for a new one),
    /// rejecting tensors the architecture does not have.
    pub fn load(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        Self::load_arch("minkunet", ck, cr, num_classes)
    }

    /// `minkunet` or `spvcnn` from a checkpoint, rejecting tensors the architecture does not
    /// have: with the checkpoint's own widths, or the uniform network of `cr` when the
    /// checkpoint is synthetic ([`Checkpoint::fresh`]).
    pub fn load_arch(arch: &str, ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        Self::from_desc(ck, &NetDesc::for_checkpoint(ArchKind::parse(arch)?, ck, cr, num_classes)?)
    }

    /// The network `desc` (any per-layer widths) from a checkpoint.
    pub fn from_desc(ck: &Checkpoint, desc: &NetDesc) -> Result<Self> {
        desc.dataflow()?;
        let mut p = Params::default();
        let stem = [ConvBn::load(&mut p, ck, &desc.stem[0])?, ConvBn::load(&mut p, ck, &desc.stem[1])?];
        let stage = |p: &mut Params, st: &StageDesc| -> Result<Stage> {
            Ok(Stage {
                resample: ConvBn::load(p, ck, &st.resample)?,
                blocks: [Block::load(p, ck, &st.blocks[0])?, Block::load(p, ck, &st.blocks[1])?],
            })
        };
        let stages = desc.stages.iter().map(|st| stage(&mut p, st)).collect::<Result<Vec<_>>>()?;
        let ups = desc.ups.iter().map(|st| stage(&mut p, st)).collect::<Result<Vec<_>>>()?;
        let (c, classes) = (&desc.classifier, desc.num_classes);
        let head_w = p.take(ck, &format!("{}.weight", c.prefix), &[classes, c.cin], Role::LinearWeight)?;
        let head_b = p.take(ck, &format!("{}.bias", c.prefix), &[classes], Role::LinearBias)?;
        let points = match desc.kind {
            ArchKind::Spvcnn => {
                Some(desc.point_transforms.iter().map(|l| PointMlp::load(&mut p, ck, l)).collect::<Result<Vec<_>>>()?)
            }
            ArchKind::MinkUNet => None,
        };
        ck.finish()?;
        Ok(Self {
            params: p,
            desc: desc.clone(),
            num_classes: classes,
            stem,
            stages,
            ups,
            head_w,
            head_b,
            head_in: c.cin,
            points,
        })
    }

    /// Train with voxel pruning as `plan` says (the same plan the inference network takes:
    /// [`crate::pipeline::Model::set_voxel_plan`] checks it against the description).
    pub fn set_voxel_plan(&mut self, plan: &VoxelPlan) -> Result<()> {
        let names: Vec<String> = self.desc.convs().iter().map(|c| c.kernel.clone()).collect();
        if let Some(n) = plan.ratios.keys().find(|n| !names.contains(n)) {
            return Err(Error::invalid("voxel plan", format!("names conv `{n}`, which this {} lacks", self.arch())));
        }
        let mut convs: Vec<&mut ConvBn> = self.stem.iter_mut().collect();
        for st in self.stages.iter_mut().chain(self.ups.iter_mut()) {
            convs.push(&mut st.resample);
            for b in st.blocks.iter_mut() {
                convs.push(&mut b.c1);
                convs.extend(b.shortcut.as_mut());
                convs.push(&mut b.c2);
            }
        }
        for (c, name) in convs.into_iter().zip(&names) {
            c.voxel = plan.layer(name);
        }
        Ok(())
    }

    /// `minkunet` or `spvcnn`.
    pub fn arch(&self) -> &'static str {
        if self.points.is_some() {
            "spvcnn"
        } else {
            "minkunet"
        }
    }

    /// Down stage `i`: strided conv, two residual blocks.
    fn stage_forward(
        &self,
        i: usize,
        p: &mut Params,
        e: &Engine,
        h: &Arc<SparseTensor>,
    ) -> Result<(Arc<SparseTensor>, StageTape)> {
        let st = &self.stages[i];
        let (y, rt) = st.resample.forward(p, e, h, None, None)?;
        let (y, blocks) = st.blocks_forward(p, e, y)?;
        Ok((y, StageTape { resample: rt, blocks, up_channels: 0 }))
    }

    /// Gradient at the input of down stage `i`.
    fn stage_backward(
        &self,
        i: usize,
        p: &Params,
        g: &mut [Vec<f32>],
        e: &Engine,
        t: &StageTape,
        dh: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let st = &self.stages[i];
        let dh = st.blocks_backward(p, g, e, &t.blocks, dh)?;
        let (d, _) = st.resample.backward(p, g, e, &t.resample, dh, true)?;
        d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))
    }

    /// Up stage `i`: transposed conv onto the skip's coordinates, concat, two residual blocks.
    fn up_forward(
        &self,
        i: usize,
        p: &mut Params,
        e: &Engine,
        h: &Arc<SparseTensor>,
        skip: &Arc<SparseTensor>,
    ) -> Result<(Arc<SparseTensor>, StageTape)> {
        let st = &self.ups[i];
        let (u, rt) = st.resample.forward(p, e, h, Some(skip.coord_set()), None)?;
        let (y, blocks) = st.blocks_forward(p, e, Arc::new(e.concat(&u, skip)?))?;
        Ok((y, StageTape { resample: rt, blocks, up_channels: u.channels() }))
    }

    /// Gradients at the input and at the skip of up stage `i`.
    fn up_backward(
        &self,
        i: usize,
        p: &Params,
        g: &mut [Vec<f32>],
        e: &Engine,
        t: &StageTape,
        dh: Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let st = &self.ups[i];
        let dh = st.blocks_backward(p, g, e, &t.blocks, dh)?;
        let c = dh.len() / t.resample.map.n_out().max(1);
        let (mut du, mut ds) = (Vec::new(), Vec::new());
        for row in dh.chunks_exact(c.max(1)) {
            du.extend_from_slice(&row[..t.up_channels]);
            ds.extend_from_slice(&row[t.up_channels..]);
        }
        let (d, _) = st.resample.backward(p, g, e, &t.resample, du, true)?;
        Ok((d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?, ds))
    }

    /// Adaptive BatchNorm (Li et al., "EagleEye", ECCV 2020): every BatchNorm's running
    /// statistics replaced by the batch statistics the network's own activations have on
    /// `inputs` (one training-mode pass each, averaged over the inputs; later layers see
    /// batch-normalized inputs, as in training). A pruned network evaluated after this is judged
    /// on the channels it kept, not on statistics its lost channels shaped.
    pub fn recalibrate_bn(&mut self, e: &Engine, inputs: Vec<SparseTensor>) -> Result<()> {
        if inputs.is_empty() {
            return Err(Error::invalid("batchnorm recalibration", "no scans"));
        }
        let stats: Vec<usize> = (0..self.params.len()).filter(|&i| self.params.role(i) == Role::RunningStat).collect();
        let old: Vec<Vec<f32>> = stats.iter().map(|&i| self.params.values[i].clone()).collect();
        let mut sum: Vec<Vec<f64>> = old.iter().map(|v| vec![0.0; v.len()]).collect();
        let n = inputs.len() as f64;
        for x in inputs {
            self.forward(e, x)?;
            // One pass moved each statistic to (1 − m)·old + m·batch: solve for the batch's.
            for ((k, &i), o) in stats.iter().enumerate().zip(&old) {
                let v = &mut self.params.values[i];
                for ((a, &new), &prev) in sum[k].iter_mut().zip(v.iter()).zip(o) {
                    *a += (new as f64 - (1.0 - BN_MOMENTUM) * prev as f64) / BN_MOMENTUM;
                }
                v.copy_from_slice(o);
            }
        }
        for (k, &i) in stats.iter().enumerate() {
            for (v, &a) in self.params.values[i].iter_mut().zip(&sum[k]) {
                *v = (a / n) as f32;
            }
        }
        // A variance cannot be negative; rounding of a near-zero one can make it so.
        for &i in &stats {
            if self.params.name(i).ends_with("running_var") {
                self.params.values[i].iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        Ok(())
    }

    /// Training forward: logits `[N, classes]` in `x`'s row order, and the tape for
    /// [`TrainNet::backward`]. Updates the BatchNorm running statistics. SPVCNN's points are
    /// the voxels of `x` (as the inference pipeline feeds it).
    pub fn forward(&mut self, e: &Engine, x: SparseTensor) -> Result<(Vec<f32>, Tape)> {
        if x.channels() != IN_CHANNELS {
            return Err(Error::tensor(
                "feats",
                format!("{} takes {IN_CHANNELS} input features, got {}", self.arch(), x.channels()),
            ));
        }
        // The parameters are borrowed mutably by the layers (running statistics) while the
        // layer definitions are read: take them out for the pass.
        let mut p = std::mem::take(&mut self.params);
        let r = self.forward_with(&mut p, e, x);
        self.params = p;
        r
    }

    fn forward_with(&self, p: &mut Params, e: &Engine, x: SparseTensor) -> Result<(Vec<f32>, Tape)> {
        let z = match &self.points {
            Some(_) => {
                let coords = x.coords().iter().map(|c| [c[1] as f32, c[2] as f32, c[3] as f32]).collect();
                let batch = x.coords().iter().map(|c| c[0]).collect();
                Some(PointTensor::new(coords, batch, Vec::new(), 0)?)
            }
            None => None,
        };
        let x = Arc::new(x);
        let (h, t0) = self.stem[0].forward(p, e, &x, None, None)?;
        let (stem_out, t1) = self.stem[1].forward(p, e, &h, None, None)?;
        // SPVCNN: the points read the stem output, and their average starts the encoder.
        let mut zf = Vec::new();
        let (mut h, first_voxels) = match &z {
            Some(z) => {
                zf = voxel_to_point(&stem_out, z)?;
                let zc = z.with_feats(zf.clone(), stem_out.channels())?;
                let v = point_voxels(&stem_out, &zc)?;
                (Arc::new(point_to_voxel_at(&stem_out, &zc, &v)?), Some(v))
            }
            None => (stem_out.clone(), None),
        };
        let mut skips = vec![stem_out.clone()];
        let mut stage_tapes = Vec::new();
        for i in 0..self.stages.len() {
            let (y, t) = self.stage_forward(i, p, e, &h)?;
            stage_tapes.push(t);
            if i + 1 < self.stages.len() {
                skips.push(y.clone());
            }
            h = y;
        }
        let mut updates = Vec::new();
        let mut update =
            |p: &mut Params, h: &Arc<SparseTensor>, zf: &mut Vec<f32>, last: bool| -> Result<Arc<SparseTensor>> {
                let (Some(z), Some(mlps)) = (&z, &self.points) else { return Ok(h.clone()) };
                let (m, mt) = mlps[updates.len()].forward(p, e, zf)?;
                let mut f = voxel_to_point(h, z)?;
                add_into(&mut f, &m);
                *zf = f;
                let (out, to_voxels) = if last {
                    (h.clone(), None)
                } else {
                    let zc = z.with_feats(zf.clone(), h.channels())?;
                    let v = point_voxels(h, &zc)?;
                    (Arc::new(point_to_voxel_at(h, &zc, &v)?), Some(v))
                };
                updates.push(PointUpdateTape { src: h.clone(), mlp: mt, to_voxels });
                Ok(out)
            };
        let mut up_tapes = Vec::new();
        for i in 0..self.ups.len() {
            // SPVCNN's branches meet after the encoder and after up2 (and after up4, below).
            if POINT_MEETINGS.contains(&i) {
                h = update(p, &h, &mut zf, false)?;
            }
            let skip = skips.pop().ok_or_else(|| Error::invalid("MinkUNet", "unbalanced skips"))?;
            let (y, t) = self.up_forward(i, p, e, &h, &skip)?;
            up_tapes.push(t);
            h = y;
        }
        update(p, &h, &mut zf, true)?;
        let (head_in, points) = match (z, first_voxels) {
            (Some(z), Some(first_voxels)) => {
                (HeadIn::Points(zf), Some(PointTape { z, stem_out, first_voxels, updates }))
            }
            _ => (HeadIn::Voxels(h), None),
        };
        let logits =
            e.linear(head_in.feats(), self.head_in, &p.values[self.head_w], &p.values[self.head_b], self.num_classes)?;
        Ok((logits, Tape { stem: vec![t0, t1], stages: stage_tapes, ups: up_tapes, head_in, points }))
    }

    /// Gradients of every trainable tensor (parallel to [`Params::values`]; empty for running
    /// statistics) given the gradient of the loss at the logits.
    pub fn backward(&self, e: &Engine, tape: &Tape, dlogits: &[f32]) -> Result<Vec<Vec<f32>>> {
        let p = &self.params;
        let mut g = p.zero_grads();
        let x = tape.head_in.feats();
        let (dx, dw, db) = linear_backward(x, self.head_in, &p.values[self.head_w], self.num_classes, dlogits);
        g[self.head_w] = dw;
        g[self.head_b] = db;
        let missing = || Error::invalid("backward", "tape and network differ");
        // SPVCNN: the gradient at the current point features, walked back update by update.
        let mut dz = Vec::new();
        let point_step = |g: &mut [Vec<f32>], dz: &mut Vec<f32>, k: usize| -> Result<Vec<f32>> {
            let (Some(pt), Some(mlps)) = (&tape.points, &self.points) else { return Err(missing()) };
            let u = &pt.updates[k];
            let dsrc = voxel_to_point_backward(&u.src, &pt.z, dz)?;
            *dz = mlps[k].backward(p, g, &u.mlp, dz);
            Ok(dsrc)
        };
        let mut dh = match &tape.points {
            Some(_) => {
                dz = dx;
                point_step(&mut g, &mut dz, 2)?
            }
            None => dx,
        };
        // Gradients arriving at the skips from the up stages, deepest skip first.
        let mut dskips = Vec::new();
        for (i, t) in tape.ups.iter().enumerate().rev() {
            let (d, ds) = self.up_backward(i, p, &mut g, e, t, dh)?;
            dskips.push(ds);
            dh = d;
            if let (Some(pt), true) = (&tape.points, POINT_MEETINGS.contains(&i)) {
                // The up stage's input was the points averaged into `src`'s voxels.
                let k = POINT_MEETINGS.iter().position(|&m| m == i).ok_or_else(missing)?;
                let u = &pt.updates[k];
                let c = pt.updates[k].src.channels();
                add_into(&mut dz, &average_backward(u.to_voxels.as_ref().ok_or_else(missing)?, &dh, c));
                dh = point_step(&mut g, &mut dz, k)?;
            }
        }
        for (i, t) in tape.stages.iter().enumerate().rev() {
            dh = self.stage_backward(i, p, &mut g, e, t, dh)?;
            let ds = dskips.pop().ok_or_else(|| Error::invalid("backward", "unbalanced skips"))?;
            match (&tape.points, i) {
                // SPVCNN's first stage read the points' average; the skip was the stem output.
                (Some(pt), 0) => {
                    let c = pt.stem_out.channels();
                    add_into(&mut dz, &average_backward(&pt.first_voxels, &dh, c));
                    dh = voxel_to_point_backward(&pt.stem_out, &pt.z, &dz)?;
                    add_into(&mut dh, &ds);
                }
                // This stage's input was also the skip of the up stage that mirrors it.
                _ => add_into(&mut dh, &ds),
            }
        }
        let (d, _) = self.stem[1].backward(p, &mut g, e, &tape.stem[1], dh, true)?;
        let dh = d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
        self.stem[0].backward(p, &mut g, e, &tape.stem[0], dh, false)?;
        Ok(g)
    }
}
