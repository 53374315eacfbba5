//! Layers of the segmentation networks, loaded by TorchSparse parameter names; inference folds
//! each BatchNorm into the conv before it.

use std::sync::Arc;

use super::arch::{BlockDesc, ConvDesc, LinearDesc};
use super::checkpoint::{Checkpoint, SPARSE_FORMAT};
use crate::device::{ConvWeight, Engine};
use crate::error::Result;
use crate::kmap::KernelSpec;
use crate::sparse_weights::Format;
use crate::tensor::{CoordSet, SparseTensor};
use crate::voxel_prune::{kept_rows, VoxelLayer};

/// BatchNorm epsilon of TorchSparse / PyTorch.
pub const BN_EPS: f32 = 1e-5;

/// BatchNorm parameters and running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Scale γ.
    pub weight: Vec<f32>,
    /// Shift β.
    pub bias: Vec<f32>,
    /// Running mean.
    pub running_mean: Vec<f32>,
    /// Running variance.
    pub running_var: Vec<f32>,
}

impl BatchNorm {
    /// Load `{prefix}.weight/bias/running_mean/running_var`, each `[c]`.
    pub fn load(ck: &Checkpoint, prefix: &str, c: usize) -> Result<Self> {
        Ok(Self {
            weight: ck.take(&format!("{prefix}.weight"), &[c])?,
            bias: ck.take(&format!("{prefix}.bias"), &[c])?,
            running_mean: ck.take(&format!("{prefix}.running_mean"), &[c])?,
            running_var: ck.take(&format!("{prefix}.running_var"), &[c])?,
        })
    }

    /// Inference as an affine map `y = a·x + b` per channel (computed in f64).
    pub fn affine(&self) -> (Vec<f64>, Vec<f64>) {
        let a: Vec<f64> = self
            .weight
            .iter()
            .zip(&self.running_var)
            .map(|(&g, &v)| g as f64 / (v as f64 + BN_EPS as f64).sqrt())
            .collect();
        let b = self
            .bias
            .iter()
            .zip(&self.running_mean)
            .zip(&a)
            .map(|((&beta, &m), &a)| beta as f64 - a * m as f64)
            .collect();
        (a, b)
    }
}

/// A sparse conv (TorchSparse `spnn.Conv3d`), optionally transposed, with BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct Conv {
    /// Kernel geometry.
    pub spec: KernelSpec,
    /// Transposed (upsampling) conv.
    pub transposed: bool,
    /// Weights `[K, Cin, Cout]` and bias (the folded BatchNorm shift).
    pub weight: ConvWeight,
    /// Apply ReLU after the conv.
    pub relu: bool,
    /// The offsets the conv's kernel map is built for, when the network's convs sharing that
    /// map never use some (offset pruning; `None`: all). Set by the network
    /// ([`share_map_offsets`]); a conv whose nonzero weights fall outside it errors.
    pub map_offsets: Option<Arc<[bool]>>,
    /// Voxel pruning of this conv (`None`: every voxel computed); see [`crate::voxel_prune`].
    pub voxel: Option<VoxelLayer>,
}

impl Conv {
    /// Load the conv `d` (`[K³, Cin, Cout]`, or `[Cin, Cout]` for kernel size 1) and its
    /// BatchNorm, folded: `W'[k][i][o] = a[o]·W[k][i][o]`, `b'[o] = b[o]`.
    pub fn load(ck: &Checkpoint, d: &ConvDesc) -> Result<Self> {
        let (vol, cout) = (d.spec.volume(), d.cout);
        let mut kernel = ck.take(&d.kernel, &d.kernel_shape())?;
        let (a, b) = BatchNorm::load(ck, &d.bn, cout)?.affine();
        for (j, v) in kernel.iter_mut().enumerate() {
            *v = (*v as f64 * a[j % cout]) as f32;
        }
        let bias = b.iter().map(|&v| v as f32).collect();
        let mut weight = ConvWeight::new(kernel, vol, d.cin, cout, Some(bias))?;
        // Folding scales columns, so the pruned zeros stay zeros in the folded kernel.
        if let Some(f) = ck.metadata().get(&format!("{SPARSE_FORMAT}{}", d.kernel)) {
            let bad = |e: crate::error::Error| {
                crate::error::Error::format(ck.path(), format!("metadata `{SPARSE_FORMAT}{}`: {e}", d.kernel))
            };
            weight = weight.with_format(Format::parse(f).map_err(bad)?).map_err(bad)?;
        }
        Ok(Self { spec: d.spec, transposed: d.transposed, weight, relu: d.relu, map_offsets: None, voxel: None })
    }

    /// Run the conv; a transposed conv needs the coordinates it upsamples back to.
    pub fn forward(&self, e: &Engine, x: &SparseTensor, target: Option<&Arc<CoordSet>>) -> Result<SparseTensor> {
        self.forward_add(e, x, target, None)
    }

    /// Run the conv with a residual added before the ReLU (`relu(conv(x) + r)`, or
    /// `conv(x) + r` without ReLU), fused into the conv's output pass.
    pub fn forward_add(
        &self,
        e: &Engine,
        x: &SparseTensor,
        target: Option<&Arc<CoordSet>>,
        residual: Option<&SparseTensor>,
    ) -> Result<SparseTensor> {
        let keep = self.map_offsets.as_deref();
        if let Some(v) = self.voxel.filter(|_| !self.transposed) {
            let scores = e.voxel_scores(x, v.score)?;
            let t0 = std::time::Instant::now();
            let coords = x.coords();
            let rows = kept_rows(&scores, |i| coords[i][0], v.ratio)?;
            e.add_prune_seconds(t0.elapsed().as_secs_f64());
            return e.conv_voxel_pruned(
                x,
                self.spec,
                keep,
                &self.weight,
                residual,
                self.relu,
                &rows,
                v.fill,
                v.reference,
            );
        }
        let map = match (self.transposed, target) {
            (true, Some(t)) => e.transposed_map_keeping(x.coord_set(), t, self.spec, keep)?,
            (true, None) => {
                return Err(crate::error::Error::invalid("transposed conv", "no target coordinates given"));
            }
            (false, _) => e.kernel_map_keeping(x.coord_set(), self.spec, keep)?,
        };
        e.conv_fused(&map, x, &self.weight, residual, self.relu)
    }
}

/// Give each conv the offsets its kernel map must hold: the union of the offsets with nonzero
/// weights over all convs on the same map (`maps[i]` names conv `i`'s map, as
/// [`super::arch::NetDesc::conv_maps`] does). Offsets no conv on a map uses are then never
/// searched for nor run (offset-pruned networks); a map every conv uses fully stays whole.
pub fn share_map_offsets<K: std::hash::Hash + Eq>(convs: &mut [&mut Conv], maps: &[K]) {
    let mut used: hashbrown::HashMap<&K, Vec<bool>> = hashbrown::HashMap::new();
    for (c, k) in convs.iter().zip(maps) {
        let zero = c.weight.zero_offsets();
        let u = used.entry(k).or_insert_with(|| vec![false; zero.len()]);
        if u.len() == zero.len() {
            for (u, &z) in u.iter_mut().zip(zero) {
                *u |= !z;
            }
        } else {
            // Cannot happen for one spec; keep the map whole rather than guess.
            u.iter_mut().for_each(|u| *u = true);
        }
    }
    for (c, k) in convs.iter_mut().zip(maps) {
        c.map_offsets = used.get(k).filter(|u| !u.iter().all(|&b| b)).map(|u| Arc::from(u.as_slice()));
    }
}

/// TorchSparse's `ResidualBlock`: `relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`, the
/// shortcut being identity or a 1×1 conv + BatchNorm.
#[derive(Debug, Clone)]
pub struct Residual {
    /// First conv + BN + ReLU (`net.0`, `net.1`).
    pub c1: Conv,
    /// Second conv + BN (`net.3`, `net.4`); its ReLU applies after the shortcut is added.
    pub c2: Conv,
    /// 1×1 conv + BN shortcut (`downsample.0`, `downsample.1`) when the width changes.
    pub shortcut: Option<Conv>,
}

impl Residual {
    /// Load the block `d` (`{p}.net.0.kernel`, …, `{p}.downsample.0.kernel` when it has one).
    pub fn load(ck: &Checkpoint, d: &BlockDesc) -> Result<Self> {
        // The block's final ReLU follows the shortcut add, which c2's epilogue fuses in.
        Ok(Self {
            c1: Conv::load(ck, &d.c1)?,
            c2: Conv::load(ck, &d.c2)?,
            shortcut: d.shortcut.as_ref().map(|s| Conv::load(ck, s)).transpose()?,
        })
    }

    /// Run the block (the shortcut add and final ReLU fused into the second conv).
    pub fn forward(&self, e: &Engine, x: &SparseTensor) -> Result<SparseTensor> {
        let h = self.c1.forward(e, x, None)?;
        let sc = match &self.shortcut {
            Some(s) => Some(s.forward(e, x, None)?),
            None => None,
        };
        self.c2.forward_add(e, &h, None, Some(sc.as_ref().unwrap_or(x)))
    }
}

/// Point-wise `nn.Linear` (`weight [out, in]`, `bias [out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
    /// Input features.
    pub cin: usize,
    /// Output features.
    pub cout: usize,
}

impl Linear {
    /// Load `{p}.weight` and `{p}.bias`, and fold the BatchNorm1d that follows when `d` has
    /// one (its ReLU is the caller's).
    pub fn load(ck: &Checkpoint, d: &LinearDesc) -> Result<Self> {
        let (p, cin, cout) = (&d.prefix, d.cin, d.cout);
        let mut weight = ck.take(&format!("{p}.weight"), &[cout, cin])?;
        let mut bias = ck.take(&format!("{p}.bias"), &[cout])?;
        if let Some(bn) = &d.bn {
            let (a, b) = BatchNorm::load(ck, bn, cout)?.affine();
            for o in 0..cout {
                for w in &mut weight[o * cin..(o + 1) * cin] {
                    *w = (*w as f64 * a[o]) as f32;
                }
                bias[o] = (bias[o] as f64 * a[o] + b[o]) as f32;
            }
        }
        Ok(Self { weight, bias, cin, cout })
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, e: &Engine, x: &[f32]) -> Result<Vec<f32>> {
        e.linear(x, self.cin, &self.weight, &self.bias, self.cout)
    }
}
