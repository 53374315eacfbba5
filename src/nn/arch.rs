//! The one description of MinkUNet and SPVCNN: every conv and linear layer with its tensor
//! names, kernel geometry and per-layer widths, the residual blocks (with or without a shortcut
//! conv), the U-Net concats and SPVCNN's point branch. Inference (`nn::minkunet`,
//! `nn::spvcnn`), training (`train::net`) and pruning (`prune`) all read a [`NetDesc`].
//!
//! Widths come from a checkpoint's tensor shapes ([`NetDesc::from_checkpoint`]), so a network
//! with any per-layer widths (a pruned one) loads; [`NetDesc::uniform`] makes SPVNAS's uniform
//! network for a width factor `cr`. Whether a block has a shortcut conv is recorded by the
//! presence of its `downsample` tensors, never re-derived from widths: pruning a block's input
//! and output to the same width keeps its shortcut.
//!
//! [`NetDesc::dataflow`] walks the network in execution order as a graph of channel spaces
//! (a conv's or linear's output channels; residual and point/voxel adds merge two spaces; a
//! concat is a list of spaces). It checks every width on the way, and it is what pruning's
//! dependency groups are computed from (the DepGraph idea of Fang et al., CVPR 2023).

use super::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::kmap::KernelSpec;

/// Channel widths of the uniform network at `cr = 1`: stem, four down stages, four up stages.
pub const BASE_CHANNELS: [usize; 9] = [32, 32, 64, 128, 256, 256, 128, 96, 96];

/// Input features: x, y, z, remission.
pub const IN_CHANNELS: usize = 4;

/// Up stages before which SPVCNN's point branch meets the voxels (it meets them once more after
/// the last up stage, feeding the classifier).
pub const POINT_MEETINGS: [usize; 2] = [0, 2];

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    /// MinkUNet (voxel branch only).
    MinkUNet,
    /// SPVCNN (MinkUNet plus the point branch).
    Spvcnn,
}

impl ArchKind {
    /// `minkunet` or `spvcnn` (the metadata and CLI spelling).
    pub fn name(self) -> &'static str {
        match self {
            ArchKind::MinkUNet => "minkunet",
            ArchKind::Spvcnn => "spvcnn",
        }
    }

    /// Parse `minkunet` / `spvcnn`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "minkunet" => Ok(ArchKind::MinkUNet),
            "spvcnn" => Ok(ArchKind::Spvcnn),
            other => {
                Err(Error::invalid("--arch", format!("unknown architecture `{other}` (expected minkunet or spvcnn)")))
            }
        }
    }
}

/// Channel widths for width factor `cr` (`int(cr · c)` as in SPVNAS).
pub fn channels(cr: f32) -> Result<[usize; 9]> {
    if !(cr.is_finite() && cr > 0.0 && cr <= 8.0) {
        return Err(Error::invalid("--cr", format!("width factor must be in (0, 8], got {cr}")));
    }
    let mut cs = [0usize; 9];
    for (c, b) in cs.iter_mut().zip(BASE_CHANNELS) {
        *c = (cr as f64 * b as f64) as usize;
        if *c == 0 {
            return Err(Error::invalid("--cr", format!("width factor {cr} gives a layer with 0 channels")));
        }
    }
    Ok(cs)
}

/// A sparse conv followed by BatchNorm (TorchSparse `spnn.Conv3d` + `spnn.BatchNorm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvDesc {
    /// Kernel tensor name (`stem.0.kernel`).
    pub kernel: String,
    /// BatchNorm prefix (`stem.1`).
    pub bn: String,
    /// Kernel geometry.
    pub spec: KernelSpec,
    /// Transposed (upsampling) conv.
    pub transposed: bool,
    /// ReLU after the BatchNorm (after the residual add in a block's second conv).
    pub relu: bool,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
}

impl ConvDesc {
    /// Checkpoint shape of the kernel: `[K, Cin, Cout]`, or `[Cin, Cout]` for kernel size 1
    /// (TorchSparse stores 1×1 convs without the offset axis).
    pub fn kernel_shape(&self) -> Vec<usize> {
        if self.spec.size == 1 {
            vec![self.cin, self.cout]
        } else {
            vec![self.spec.volume(), self.cin, self.cout]
        }
    }

    /// Multiply-adds per kernel-map pair.
    pub fn macs_per_pair(&self) -> usize {
        self.cin * self.cout
    }
}

/// TorchSparse's `ResidualBlock`: conv-BN-ReLU, conv-BN, plus the input or a 1×1 conv-BN
/// shortcut, then ReLU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDesc {
    /// Module prefix (`stage1.1`).
    pub prefix: String,
    /// `net.0` + `net.1`.
    pub c1: ConvDesc,
    /// `net.3` + `net.4`.
    pub c2: ConvDesc,
    /// `downsample.0` + `downsample.1`, when the block has one.
    pub shortcut: Option<ConvDesc>,
}

/// A down stage (k2 s2 conv, two blocks) or an up stage (k2 s2 transposed conv, concat with
/// the skip, two blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDesc {
    /// The resampling conv (`stageN.0.net` / `upN.0.net`).
    pub resample: ConvDesc,
    /// The two residual blocks.
    pub blocks: [BlockDesc; 2],
}

/// `nn.Linear`, optionally followed by BatchNorm1d and ReLU (SPVCNN's point MLPs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearDesc {
    /// Module prefix (`classifier.0`): `{prefix}.weight [out, in]`, `{prefix}.bias [out]`.
    pub prefix: String,
    /// BatchNorm1d prefix, for the point MLPs (followed by ReLU).
    pub bn: Option<String>,
    /// Input features.
    pub cin: usize,
    /// Output features.
    pub cout: usize,
}

/// The whole network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDesc {
    /// MinkUNet or SPVCNN.
    pub kind: ArchKind,
    /// Input features per voxel.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// `stem.0`/`stem.1`, `stem.3`/`stem.4`.
    pub stem: [ConvDesc; 2],
    /// `stage1` … `stage4`.
    pub stages: Vec<StageDesc>,
    /// `up1` … `up4`.
    pub ups: Vec<StageDesc>,
    /// `classifier.0`.
    pub classifier: LinearDesc,
    /// SPVCNN's `point_transforms.{0,1,2}` (empty for MinkUNet).
    pub point_transforms: Vec<LinearDesc>,
}

fn conv(kernel: &str, bn: &str, spec: KernelSpec, transposed: bool, relu: bool, cin: usize, cout: usize) -> ConvDesc {
    ConvDesc { kernel: kernel.to_string(), bn: bn.to_string(), spec, transposed, relu, cin, cout }
}

fn block(prefix: &str, cin: usize, cout: usize, shortcut: bool) -> Result<BlockDesc> {
    let k3 = KernelSpec::new(3, 1, 1)?;
    let p = prefix;
    Ok(BlockDesc {
        prefix: p.to_string(),
        c1: conv(&format!("{p}.net.0.kernel"), &format!("{p}.net.1"), k3, false, true, cin, cout),
        c2: conv(&format!("{p}.net.3.kernel"), &format!("{p}.net.4"), k3, false, true, cout, cout),
        shortcut: shortcut
            .then(|| -> Result<ConvDesc> {
                let k1 = KernelSpec::new(1, 1, 1)?;
                Ok(conv(&format!("{p}.downsample.0.kernel"), &format!("{p}.downsample.1"), k1, false, false, cin, cout))
            })
            .transpose()?,
    })
}

impl NetDesc {
    /// SPVNAS's uniform network for width factor `cr` (a block has a shortcut conv where its
    /// input and output widths differ, as in SPVNAS).
    pub fn uniform(kind: ArchKind, cr: f32, num_classes: usize) -> Result<Self> {
        let cs = channels(cr)?;
        if num_classes == 0 {
            return Err(Error::invalid("classes", "a network needs at least one class"));
        }
        let (k3, k2s2) = (KernelSpec::new(3, 1, 1)?, KernelSpec::new(2, 2, 1)?);
        let stem = [
            conv("stem.0.kernel", "stem.1", k3, false, true, IN_CHANNELS, cs[0]),
            conv("stem.3.kernel", "stem.4", k3, false, true, cs[0], cs[0]),
        ];
        let mut stages = Vec::new();
        for s in 0..4 {
            let (cin, cout, p) = (cs[s], cs[s + 1], format!("stage{}", s + 1));
            stages.push(StageDesc {
                resample: conv(&format!("{p}.0.net.0.kernel"), &format!("{p}.0.net.1"), k2s2, false, true, cin, cin),
                blocks: [
                    block(&format!("{p}.1"), cin, cout, cin != cout)?,
                    block(&format!("{p}.2"), cout, cout, false)?,
                ],
            });
        }
        let mut ups = Vec::new();
        for u in 0..4 {
            let (cin, cout, skip, p) = (cs[4 + u], cs[5 + u], cs[3 - u], format!("up{}", u + 1));
            ups.push(StageDesc {
                resample: conv(&format!("{p}.0.net.0.kernel"), &format!("{p}.0.net.1"), k2s2, true, true, cin, cout),
                blocks: [
                    block(&format!("{p}.1.0"), cout + skip, cout, cout + skip != cout)?,
                    block(&format!("{p}.1.1"), cout, cout, false)?,
                ],
            });
        }
        let classifier = LinearDesc { prefix: "classifier.0".into(), bn: None, cin: cs[8], cout: num_classes };
        let point_transforms = match kind {
            ArchKind::MinkUNet => Vec::new(),
            ArchKind::Spvcnn => [(cs[0], cs[4]), (cs[4], cs[6]), (cs[6], cs[8])]
                .iter()
                .enumerate()
                .map(|(i, &(cin, cout))| LinearDesc {
                    prefix: format!("point_transforms.{i}.0"),
                    bn: Some(format!("point_transforms.{i}.1")),
                    cin,
                    cout,
                })
                .collect(),
        };
        let d = Self { kind, in_channels: IN_CHANNELS, num_classes, stem, stages, ups, classifier, point_transforms };
        d.dataflow()?;
        Ok(d)
    }

    /// The network a checkpoint holds: every width from its tensor shapes, a block's shortcut
    /// from the presence of its `downsample` kernel. The widths must chain (checked here, with
    /// a message naming the layer); the caller still loads the tensors by name and shape.
    pub fn from_checkpoint(kind: ArchKind, ck: &Checkpoint, num_classes: usize) -> Result<Self> {
        ck.check_kept_offsets()?;
        let mut d = Self::uniform(kind, 1.0, num_classes)?;
        let file = ck.path().to_path_buf();
        let shape_of = |name: &str, rank: usize| -> Result<Vec<usize>> {
            match ck.shape(name) {
                Some(s) if s.len() == rank && s.iter().all(|&v| v > 0) => Ok(s.to_vec()),
                Some(s) => Err(Error::format(&file, format!("tensor `{name}` has shape {s:?}, expected rank {rank}"))),
                None => Err(Error::format(&file, format!("missing tensor `{name}`"))),
            }
        };
        let set_conv = |c: &mut ConvDesc| -> Result<()> {
            let rank = if c.spec.size == 1 { 2 } else { 3 };
            let s = shape_of(&c.kernel, rank)?;
            if rank == 3 && s[0] != c.spec.volume() {
                return Err(Error::format(
                    &file,
                    format!("tensor `{}` has {} kernel offsets, expected {}", c.kernel, s[0], c.spec.volume()),
                ));
            }
            (c.cin, c.cout) = (s[rank - 2], s[rank - 1]);
            Ok(())
        };
        for c in &mut d.stem {
            set_conv(c)?;
        }
        for st in d.stages.iter_mut().chain(d.ups.iter_mut()) {
            set_conv(&mut st.resample)?;
            for b in &mut st.blocks {
                set_conv(&mut b.c1)?;
                set_conv(&mut b.c2)?;
                let mut sc = block(&b.prefix, 1, 1, true)?.shortcut;
                if let Some(s) = &mut sc {
                    if ck.shape(&s.kernel).is_some() {
                        set_conv(s)?;
                    } else {
                        sc = None;
                    }
                }
                b.shortcut = sc;
            }
        }
        for l in std::iter::once(&mut d.classifier).chain(d.point_transforms.iter_mut()) {
            let s = shape_of(&format!("{}.weight", l.prefix), 2)?;
            (l.cout, l.cin) = (s[0], s[1]);
        }
        if d.classifier.cout != num_classes {
            return Err(Error::format(
                &file,
                format!("the classifier predicts {} classes, expected {num_classes}", d.classifier.cout),
            ));
        }
        d.dataflow().map_err(|e| e.in_file(&file))?;
        Ok(d)
    }

    /// The network described by a checkpoint: real tensors give their own widths; a synthetic
    /// checkpoint ([`Checkpoint::random`], [`Checkpoint::fresh`]) gets the uniform network of `cr`.
    pub fn for_checkpoint(kind: ArchKind, ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        if ck.is_synthetic() {
            Self::uniform(kind, cr, num_classes)
        } else {
            Self::from_checkpoint(kind, ck, num_classes)
        }
    }

    /// Every conv in execution order (stem, each stage's resample then blocks as c1, shortcut,
    /// c2, then the up stages).
    pub fn convs(&self) -> Vec<&ConvDesc> {
        let mut out: Vec<&ConvDesc> = self.stem.iter().collect();
        for st in self.stages.iter().chain(&self.ups) {
            out.push(&st.resample);
            for b in &st.blocks {
                out.push(&b.c1);
                out.extend(b.shortcut.as_ref());
                out.push(&b.c2);
            }
        }
        out
    }

    /// The convs `--voxel-prune R` prunes: both convs of every residual block's branch (not
    /// the stem, the resampling convs or the 1×1 shortcuts), where nearly all the work is.
    pub fn block_convs(&self) -> Vec<&ConvDesc> {
        self.stages.iter().chain(&self.ups).flat_map(|st| st.blocks.iter().flat_map(|b| [&b.c1, &b.c2])).collect()
    }

    /// The kernel map each conv of [`NetDesc::convs`] runs on, as the tensor stride of the
    /// coordinates it is built on and the kernel: convs with equal entries share one map
    /// (a transposed conv runs on the transpose of the down map on its target coordinates).
    pub fn conv_maps(&self) -> Vec<(i32, KernelSpec)> {
        let mut out: Vec<(i32, KernelSpec)> = self.stem.iter().map(|c| (1, c.spec)).collect();
        let mut s = 1i32;
        let blocks = |out: &mut Vec<(i32, KernelSpec)>, st: &StageDesc, s: i32| {
            for b in &st.blocks {
                out.push((s, b.c1.spec));
                out.extend(b.shortcut.as_ref().map(|c| (s, c.spec)));
                out.push((s, b.c2.spec));
            }
        };
        for st in &self.stages {
            out.push((s, st.resample.spec));
            s = s.saturating_mul(st.resample.spec.stride as i32);
            blocks(&mut out, st, s);
        }
        for st in &self.ups {
            s /= (st.resample.spec.stride as i32).max(1);
            out.push((s, st.resample.spec));
            blocks(&mut out, st, s);
        }
        out
    }

    /// Every linear layer (point MLPs, then the classifier).
    pub fn linears(&self) -> Vec<&LinearDesc> {
        self.point_transforms.iter().chain(std::iter::once(&self.classifier)).collect()
    }

    /// Width factor of the uniform network these widths are, if they are one.
    pub fn uniform_cr(&self) -> Option<f32> {
        let cr = self.stem[0].cout as f32 / BASE_CHANNELS[0] as f32;
        Self::uniform(self.kind, cr, self.num_classes).ok().filter(|u| u == self).map(|_| cr)
    }

    /// Parameters (kernels, BatchNorm γ/β, linear weights and biases; not running statistics).
    pub fn parameters(&self) -> usize {
        let c: usize = self.convs().iter().map(|c| c.kernel_shape().iter().product::<usize>() + 2 * c.cout).sum();
        let l: usize =
            self.linears().iter().map(|l| l.cin * l.cout + l.cout + if l.bn.is_some() { 2 * l.cout } else { 0 }).sum();
        c + l
    }

    /// One short line of widths: stem, each stage's output, each up stage's output.
    pub fn widths_summary(&self) -> String {
        let mut v = vec![self.stem[1].cout];
        v.extend(self.stages.iter().chain(&self.ups).map(|s| s.blocks[1].c2.cout));
        v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("/")
    }

    /// Walk the network in execution order as a graph of channel spaces, checking that every
    /// width chains. Fails with a message naming the first layer whose input does not match.
    pub fn dataflow(&self) -> Result<Dataflow> {
        let mut g = Dataflow::default();
        let x = g.input(self.in_channels);
        let h = g.conv(&self.stem[0], &x)?;
        let stem_out = g.conv(&self.stem[1], &h)?;
        let mut h = stem_out.clone();
        let mut skips = vec![];
        for st in &self.stages {
            skips.push(h.clone());
            h = g.conv(&st.resample, &h)?;
            for b in &st.blocks {
                h = g.block(b, &h)?;
            }
        }
        // SPVCNN: the points start from the stem output and their average replaces it as the
        // encoder input; the values stay in the stem output's channel space.
        let mut points = stem_out;
        let mut meeting = 0;
        let mut meet = |g: &mut Dataflow, h: &Value, points: &Value| -> Result<Value> {
            let l = &self.point_transforms[meeting];
            meeting += 1;
            let m = g.linear(l, points)?;
            g.add(h, &m, &l.prefix)
        };
        for (i, st) in self.ups.iter().enumerate() {
            if self.kind == ArchKind::Spvcnn && POINT_MEETINGS.contains(&i) {
                h = meet(&mut g, &h, &points)?;
                points = h.clone();
            }
            let skip = skips.pop().ok_or_else(|| Error::invalid("network", "unbalanced skips"))?;
            let u = g.conv(&st.resample, &h)?;
            h = g.concat(&u, &skip);
            for b in &st.blocks {
                h = g.block(b, &h)?;
            }
        }
        if self.kind == ArchKind::Spvcnn {
            h = meet(&mut g, &h, &points)?;
        }
        let logits = g.linear(&self.classifier, &h)?;
        g.output(&logits);
        Ok(g)
    }
}

/// A feature tensor in the dataflow: its channels are the concatenation of these spaces.
pub type Value = Vec<usize>;

/// What a tensor in a [`Slot`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A conv kernel or a linear weight.
    Weight,
    /// A linear bias.
    Bias,
    /// A BatchNorm vector (γ, β, running mean or variance).
    BatchNorm,
}

/// Where a tensor's axis meets a channel space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// What the tensor is.
    pub kind: SlotKind,
    /// Tensor name.
    pub tensor: String,
    /// Axis of the tensor.
    pub axis: usize,
    /// First index of the space's channels along that axis (non-zero in concat consumers).
    pub offset: usize,
    /// Whether the layer writes these channels (a producer) or reads them (a consumer).
    pub produces: bool,
}

/// A set of channels produced together: a layer's output, merged with others by adds.
#[derive(Debug, Clone, Default)]
pub struct Space {
    /// Channels.
    pub width: usize,
    /// Tensor slices that index this space's channels.
    pub slots: Vec<Slot>,
    /// BatchNorm prefixes of the producers (γ and β zeroed = the channel held at zero).
    pub bns: Vec<String>,
    /// Neither prunable nor mergeable: the network's input and its logits.
    pub fixed: bool,
}

/// The network as channel spaces (after merging those joined by adds) and the slots that index
/// them: what pruning's dependency groups are made of.
#[derive(Debug, Clone, Default)]
pub struct Dataflow {
    /// Spaces in the order they were created; merged spaces point at their root in `parent`.
    pub spaces: Vec<Space>,
    parent: Vec<usize>,
}

impl Dataflow {
    fn root(&self, mut s: usize) -> usize {
        while self.parent[s] != s {
            s = self.parent[s];
        }
        s
    }

    fn space(&mut self, width: usize, fixed: bool) -> usize {
        self.spaces.push(Space { width, fixed, ..Default::default() });
        self.parent.push(self.spaces.len() - 1);
        self.spaces.len() - 1
    }

    fn width(&self, v: &Value) -> usize {
        v.iter().map(|&s| self.spaces[self.root(s)].width).sum()
    }

    fn input(&mut self, width: usize) -> Value {
        vec![self.space(width, true)]
    }

    fn output(&mut self, v: &Value) {
        for &s in v {
            let r = self.root(s);
            self.spaces[r].fixed = true;
        }
    }

    /// Record `tensor` reading value `v` along `axis`.
    fn consume(&mut self, v: &Value, tensor: &str, axis: usize) {
        let mut offset = 0;
        for &s in v {
            let r = self.root(s);
            let slot = Slot { kind: SlotKind::Weight, tensor: tensor.to_string(), axis, offset, produces: false };
            self.spaces[r].slots.push(slot);
            offset += self.spaces[r].width;
        }
    }

    fn check_in(&self, layer: &str, expected: usize, v: &Value) -> Result<()> {
        let got = self.width(v);
        if got != expected {
            return Err(Error::tensor(layer, format!("takes {expected} input channels but its input has {got}")));
        }
        Ok(())
    }

    fn conv(&mut self, c: &ConvDesc, x: &Value) -> Result<Value> {
        self.check_in(&c.kernel, c.cin, x)?;
        let rank = c.kernel_shape().len();
        self.consume(x, &c.kernel, rank - 2);
        let s = self.space(c.cout, false);
        self.produce(s, SlotKind::Weight, &c.kernel, rank - 1);
        self.produce_bn(s, &c.bn);
        Ok(vec![s])
    }

    fn linear(&mut self, l: &LinearDesc, x: &Value) -> Result<Value> {
        self.check_in(&l.prefix, l.cin, x)?;
        self.consume(x, &format!("{}.weight", l.prefix), 1);
        let s = self.space(l.cout, false);
        self.produce(s, SlotKind::Weight, &format!("{}.weight", l.prefix), 0);
        self.produce(s, SlotKind::Bias, &format!("{}.bias", l.prefix), 0);
        if let Some(bn) = &l.bn {
            self.produce_bn(s, bn);
        }
        Ok(vec![s])
    }

    fn produce(&mut self, s: usize, kind: SlotKind, tensor: &str, axis: usize) {
        self.spaces[s].slots.push(Slot { kind, tensor: tensor.to_string(), axis, offset: 0, produces: true });
    }

    fn produce_bn(&mut self, s: usize, bn: &str) {
        for leaf in ["weight", "bias", "running_mean", "running_var"] {
            self.produce(s, SlotKind::BatchNorm, &format!("{bn}.{leaf}"), 0);
        }
        self.spaces[s].bns.push(bn.to_string());
    }

    fn concat(&mut self, a: &Value, b: &Value) -> Value {
        a.iter().chain(b).copied().collect()
    }

    /// An elementwise add: both sides' channels are the same channels from now on.
    fn add(&mut self, a: &Value, b: &Value, layer: &str) -> Result<Value> {
        if a.len() != 1 || b.len() != 1 {
            return Err(Error::tensor(layer, "an add of concatenated features needs a shortcut conv"));
        }
        let (ra, rb) = (self.root(a[0]), self.root(b[0]));
        if self.spaces[ra].width != self.spaces[rb].width {
            return Err(Error::tensor(
                layer,
                format!("adds {} channels to {} channels", self.spaces[rb].width, self.spaces[ra].width),
            ));
        }
        if ra != rb {
            let moved = std::mem::take(&mut self.spaces[rb]);
            self.spaces[ra].slots.extend(moved.slots);
            self.spaces[ra].bns.extend(moved.bns);
            self.spaces[ra].fixed |= moved.fixed;
            self.spaces[rb].width = moved.width;
            self.parent[rb] = ra;
        }
        Ok(vec![ra])
    }

    fn block(&mut self, b: &BlockDesc, x: &Value) -> Result<Value> {
        let h = self.conv(&b.c1, x)?;
        let sc = match &b.shortcut {
            Some(s) => self.conv(s, x)?,
            None => x.clone(),
        };
        let y = self.conv(&b.c2, &h)?;
        self.add(&y, &sc, &b.prefix)
    }

    /// The merged spaces (dependency groups), in creation order of their first member.
    pub fn groups(&self) -> Vec<&Space> {
        (0..self.spaces.len()).filter(|&s| self.parent[s] == s).map(|s| &self.spaces[s]).collect()
    }
}
