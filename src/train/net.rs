//! Training-mode MinkUNet: BatchNorm kept as a layer (batch statistics, running averages
//! updated), every activation kept on a tape for one whole-network backward pass. Parameters
//! live in one [`Params`] store under their TorchSparse names, so a checkpoint written from it
//! loads straight into the inference model (which folds BatchNorm).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ops::{batchnorm_backward, batchnorm_train_fused, linear_backward, relu_backward, BnCache};
use crate::device::{ConvWeight, Engine};
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::kmap::{KernelMap, KernelSpec};
use crate::nn::checkpoint::Checkpoint;
use crate::nn::layers::kernel_shape;
use crate::nn::minkunet::{channels, IN_CHANNELS};
use crate::tensor::{CoordSet, SparseTensor};

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
}

struct ConvBnTape {
    x: Arc<SparseTensor>,
    map: Arc<KernelMap>,
    bn: BnCache,
    /// Output after ReLU (for the ReLU backward).
    y: Option<Arc<SparseTensor>>,
    /// Whether a residual was added before the ReLU.
    residual: bool,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn load(
        p: &mut Params,
        ck: &Checkpoint,
        conv: &str,
        bn: &str,
        spec: KernelSpec,
        cin: usize,
        cout: usize,
        transposed: bool,
        relu: bool,
    ) -> Result<Self> {
        Ok(Self {
            kernel: p.take(ck, conv, &kernel_shape(spec, cin, cout), Role::Kernel)?,
            gamma: p.take(ck, &format!("{bn}.weight"), &[cout], Role::BnScale)?,
            beta: p.take(ck, &format!("{bn}.bias"), &[cout], Role::BnShift)?,
            mean: p.take(ck, &format!("{bn}.running_mean"), &[cout], Role::RunningStat)?,
            var: p.take(ck, &format!("{bn}.running_var"), &[cout], Role::RunningStat)?,
            spec,
            transposed,
            cin,
            cout,
            relu,
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
        let map = match (self.transposed, target) {
            (true, Some(t)) => e.transposed_map(x.coord_set(), t, self.spec)?,
            (true, None) => return Err(Error::invalid("transposed conv", "no target coordinates given")),
            (false, _) => e.kernel_map(x.coord_set(), self.spec)?,
        };
        let z = e.conv_with_map(&map, x, &self.weight(p)?)?;
        let (gamma, beta) = (p.values[self.gamma].clone(), p.values[self.beta].clone());
        let mut mean = std::mem::take(&mut p.values[self.mean]);
        let mut var = std::mem::take(&mut p.values[self.var]);
        let bn = batchnorm_train_fused(
            z.into_feats(),
            self.cout,
            &gamma,
            &beta,
            &mut mean,
            &mut var,
            residual.map(|r| r.feats()),
            self.relu,
        );
        p.values[self.mean] = mean;
        p.values[self.var] = var;
        let (y, bn) = bn?;
        let y = Arc::new(SparseTensor::new(map.out_coords.clone(), y, self.cout)?);
        let tape = ConvBnTape { x: x.clone(), map, bn, y: self.relu.then(|| y.clone()), residual: residual.is_some() };
        Ok((y, tape))
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
        let grads = e.conv_backward(&t.map, &t.x, &self.weight(p)?, &dz, need_dx)?;
        add_into(&mut g[self.kernel], &grads.dw);
        Ok((grads.dx, d))
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
    fn load(p: &mut Params, ck: &Checkpoint, pre: &str, cin: usize, cout: usize) -> Result<Self> {
        let k3 = KernelSpec::new(3, 1, 1)?;
        let c1 =
            ConvBn::load(p, ck, &format!("{pre}.net.0.kernel"), &format!("{pre}.net.1"), k3, cin, cout, false, true)?;
        let c2 =
            ConvBn::load(p, ck, &format!("{pre}.net.3.kernel"), &format!("{pre}.net.4"), k3, cout, cout, false, true)?;
        let shortcut = if cin != cout {
            let k1 = KernelSpec::new(1, 1, 1)?;
            let (c, b) = (format!("{pre}.downsample.0.kernel"), format!("{pre}.downsample.1"));
            Some(ConvBn::load(p, ck, &c, &b, k1, cin, cout, false, false)?)
        } else {
            None
        };
        Ok(Self { c1, c2, shortcut })
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

/// Everything the backward pass needs from one forward pass.
pub struct Tape {
    stem: Vec<ConvBnTape>,
    stages: Vec<StageTape>,
    ups: Vec<StageTape>,
    head_in: Arc<SparseTensor>,
}

/// MinkUNet (the SPVNAS SemanticKITTI architecture) with BatchNorm as layers, for training.
#[derive(Debug, Clone)]
pub struct TrainNet {
    /// Parameters and BatchNorm statistics under TorchSparse names.
    pub params: Params,
    /// Width factor.
    pub cr: f32,
    /// Output classes.
    pub num_classes: usize,
    stem: [ConvBn; 2],
    stages: Vec<Stage>,
    ups: Vec<Stage>,
    head_w: usize,
    head_b: usize,
    head_in: usize,
}

impl TrainNet {
    /// Build from a checkpoint (a saved model, or [`Checkpoint::fresh`] for a new one),
    /// rejecting tensors the architecture does not have.
    pub fn load(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        let cs = channels(cr)?;
        let (k3, k2s2) = (KernelSpec::new(3, 1, 1)?, KernelSpec::new(2, 2, 1)?);
        let mut p = Params::default();
        let stem = [
            ConvBn::load(&mut p, ck, "stem.0.kernel", "stem.1", k3, IN_CHANNELS, cs[0], false, true)?,
            ConvBn::load(&mut p, ck, "stem.3.kernel", "stem.4", k3, cs[0], cs[0], false, true)?,
        ];
        let mut stages = Vec::new();
        for s in 0..4 {
            let (cin, cout, pre) = (cs[s], cs[s + 1], format!("stage{}", s + 1));
            let (c, b) = (format!("{pre}.0.net.0.kernel"), format!("{pre}.0.net.1"));
            stages.push(Stage {
                resample: ConvBn::load(&mut p, ck, &c, &b, k2s2, cin, cin, false, true)?,
                blocks: [
                    Block::load(&mut p, ck, &format!("{pre}.1"), cin, cout)?,
                    Block::load(&mut p, ck, &format!("{pre}.2"), cout, cout)?,
                ],
            });
        }
        let mut ups = Vec::new();
        for u in 0..4 {
            let (cin, cout, skip, pre) = (cs[4 + u], cs[5 + u], cs[3 - u], format!("up{}", u + 1));
            let (c, b) = (format!("{pre}.0.net.0.kernel"), format!("{pre}.0.net.1"));
            ups.push(Stage {
                resample: ConvBn::load(&mut p, ck, &c, &b, k2s2, cin, cout, true, true)?,
                blocks: [
                    Block::load(&mut p, ck, &format!("{pre}.1.0"), cout + skip, cout)?,
                    Block::load(&mut p, ck, &format!("{pre}.1.1"), cout, cout)?,
                ],
            });
        }
        let head_w = p.take(ck, "classifier.0.weight", &[num_classes, cs[8]], Role::LinearWeight)?;
        let head_b = p.take(ck, "classifier.0.bias", &[num_classes], Role::LinearBias)?;
        ck.finish()?;
        Ok(Self { params: p, cr, num_classes, stem, stages, ups, head_w, head_b, head_in: cs[8] })
    }

    /// Training forward: logits `[N, classes]` in `x`'s row order, and the tape for
    /// [`TrainNet::backward`]. Updates the BatchNorm running statistics.
    pub fn forward(&mut self, e: &Engine, x: SparseTensor) -> Result<(Vec<f32>, Tape)> {
        if x.channels() != IN_CHANNELS {
            return Err(Error::tensor(
                "feats",
                format!("MinkUNet takes {IN_CHANNELS} input features, got {}", x.channels()),
            ));
        }
        let p = &mut self.params;
        let x = Arc::new(x);
        let (h, t0) = self.stem[0].forward(p, e, &x, None, None)?;
        let (mut h, t1) = self.stem[1].forward(p, e, &h, None, None)?;
        let mut skips = Vec::new();
        let mut stage_tapes = Vec::new();
        for st in &self.stages {
            skips.push(h.clone());
            let (mut y, rt) = st.resample.forward(p, e, &h, None, None)?;
            let mut blocks = Vec::new();
            for b in &st.blocks {
                let (z, bt) = b.forward(p, e, &y)?;
                y = z;
                blocks.push(bt);
            }
            stage_tapes.push(StageTape { resample: rt, blocks, up_channels: 0 });
            h = y;
        }
        let mut up_tapes = Vec::new();
        for st in &self.ups {
            let skip = skips.pop().ok_or_else(|| Error::invalid("MinkUNet", "unbalanced skips"))?;
            let (u, rt) = st.resample.forward(p, e, &h, Some(skip.coord_set()), None)?;
            let mut y = Arc::new(e.concat(&u, &skip)?);
            let mut blocks = Vec::new();
            for b in &st.blocks {
                let (z, bt) = b.forward(p, e, &y)?;
                y = z;
                blocks.push(bt);
            }
            up_tapes.push(StageTape { resample: rt, blocks, up_channels: u.channels() });
            h = y;
        }
        let logits =
            e.linear(h.feats(), self.head_in, &p.values[self.head_w], &p.values[self.head_b], self.num_classes)?;
        Ok((logits, Tape { stem: vec![t0, t1], stages: stage_tapes, ups: up_tapes, head_in: h }))
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
        let mut dh = dx;
        // Gradients arriving at the skips from the up stages, in up order (deepest skip first).
        let mut dskips = Vec::new();
        for (st, t) in self.ups.iter().zip(&tape.ups).rev() {
            for (b, bt) in st.blocks.iter().zip(&t.blocks).rev() {
                dh = b.backward(p, &mut g, e, bt, dh)?;
            }
            let c = dh.len() / t.resample.map.n_out().max(1);
            let (mut du, mut ds) = (Vec::new(), Vec::new());
            for row in dh.chunks_exact(c.max(1)) {
                du.extend_from_slice(&row[..t.up_channels]);
                ds.extend_from_slice(&row[t.up_channels..]);
            }
            dskips.push(ds);
            let (d, _) = st.resample.backward(p, &mut g, e, &t.resample, du, true)?;
            dh = d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
        }
        for (st, t) in self.stages.iter().zip(&tape.stages).rev() {
            for (b, bt) in st.blocks.iter().zip(&t.blocks).rev() {
                dh = b.backward(p, &mut g, e, bt, dh)?;
            }
            let (d, _) = st.resample.backward(p, &mut g, e, &t.resample, dh, true)?;
            dh = d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
            // This stage's input was also the skip of the up stage that mirrors it.
            let ds = dskips.pop().ok_or_else(|| Error::invalid("backward", "unbalanced skips"))?;
            add_into(&mut dh, &ds);
        }
        let (d, _) = self.stem[1].backward(p, &mut g, e, &tape.stem[1], dh, true)?;
        let dh = d.ok_or_else(|| Error::invalid("backward", "missing input gradient"))?;
        self.stem[0].backward(p, &mut g, e, &tape.stem[0], dh, false)?;
        Ok(g)
    }
}
