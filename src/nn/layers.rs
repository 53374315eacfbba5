//! Layers of the segmentation networks, loaded by TorchSparse parameter names; inference folds
//! each BatchNorm into the conv before it.

use std::sync::Arc;

use super::checkpoint::Checkpoint;
use crate::device::{ConvWeight, Engine};
use crate::error::Result;
use crate::kmap::KernelSpec;
use crate::tensor::{CoordSet, SparseTensor};

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

/// Checkpoint shape of a conv kernel: `[K, Cin, Cout]`, or `[Cin, Cout]` for kernel size 1
/// (TorchSparse stores 1×1 convs without the offset axis).
pub fn kernel_shape(spec: KernelSpec, cin: usize, cout: usize) -> Vec<usize> {
    if spec.size == 1 {
        vec![cin, cout]
    } else {
        vec![spec.volume(), cin, cout]
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
}

impl Conv {
    /// Load `{name}` (`[K³, Cin, Cout]`, or `[Cin, Cout]` for kernel size 1) followed by the
    /// BatchNorm `{bn}`, folded: `W'[k][i][o] = a[o]·W[k][i][o]`, `b'[o] = b[o]`.
    #[allow(clippy::too_many_arguments)]
    pub fn load_bn(
        ck: &Checkpoint,
        name: &str,
        bn: &str,
        spec: KernelSpec,
        cin: usize,
        cout: usize,
        transposed: bool,
        relu: bool,
    ) -> Result<Self> {
        let vol = spec.volume();
        let shape = kernel_shape(spec, cin, cout);
        let mut kernel = ck.take(name, &shape)?;
        let (a, b) = BatchNorm::load(ck, bn, cout)?.affine();
        for (j, v) in kernel.iter_mut().enumerate() {
            *v = (*v as f64 * a[j % cout]) as f32;
        }
        let bias = b.iter().map(|&v| v as f32).collect();
        Ok(Self { spec, transposed, weight: ConvWeight::new(kernel, vol, cin, cout, Some(bias))?, relu })
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
        let map = match (self.transposed, target) {
            (true, Some(t)) => e.transposed_map(x.coord_set(), t, self.spec)?,
            (true, None) => {
                return Err(crate::error::Error::invalid("transposed conv", "no target coordinates given"));
            }
            (false, _) => e.kernel_map(x.coord_set(), self.spec)?,
        };
        e.conv_fused(&map, x, &self.weight, residual, self.relu)
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
    /// Load the block `{p}` (`{p}.net.0.kernel`, …, `{p}.downsample.0.kernel`).
    pub fn load(ck: &Checkpoint, p: &str, cin: usize, cout: usize) -> Result<Self> {
        let k3 = KernelSpec::new(3, 1, 1)?;
        let c1 = Conv::load_bn(ck, &format!("{p}.net.0.kernel"), &format!("{p}.net.1"), k3, cin, cout, false, true)?;
        // The block's final ReLU follows the shortcut add, which c2's epilogue fuses in.
        let c2 = Conv::load_bn(ck, &format!("{p}.net.3.kernel"), &format!("{p}.net.4"), k3, cout, cout, false, true)?;
        let shortcut = if cin != cout {
            Some(Conv::load_bn(
                ck,
                &format!("{p}.downsample.0.kernel"),
                &format!("{p}.downsample.1"),
                KernelSpec::new(1, 1, 1)?,
                cin,
                cout,
                false,
                false,
            )?)
        } else {
            None
        };
        Ok(Self { c1, c2, shortcut })
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
    /// Load `{p}.weight` and `{p}.bias`.
    pub fn load(ck: &Checkpoint, p: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            weight: ck.take(&format!("{p}.weight"), &[cout, cin])?,
            bias: ck.take(&format!("{p}.bias"), &[cout])?,
            cin,
            cout,
        })
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, e: &Engine, x: &[f32]) -> Result<Vec<f32>> {
        e.linear(x, self.cin, &self.weight, &self.bias, self.cout)
    }
}
