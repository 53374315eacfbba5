//! Named weight tensors with the exact names and shapes of TorchSparse / SPVNAS checkpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::bench::pseudo_random;
use crate::error::{Error, Result};
use crate::io::tensors::{write, OutTensor, Tensor, TensorFile};

/// Tensor-name prefixes that hold training state (optimizer moments, masks, rewind points) and
/// that inference ignores.
pub const TRAINING_PREFIXES: [&str; 3] = ["optim.", "mask.", "rewind."];

/// Metadata key prefix listing an offset-pruned conv's kept offsets
/// (`kept_offsets.{kernel}` = `0,4,13`); the other offsets' slices must be zero.
pub const KEPT_OFFSETS: &str = "kept_offsets.";

/// Metadata key prefix naming a conv's sparse weight format (`format.{kernel}` = `block`,
/// `element` or `2:4`): the layer keeps its kernel in that format for the CPU sparse kernels.
pub const SPARSE_FORMAT: &str = "format.";

/// State of a random checkpoint: the seed counter and what it has invented.
type Synth = (u64, BTreeMap<String, Tensor<f32>>);

/// How a random checkpoint invents tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// He-uniform weights and BatchNorm statistics near identity (exercises every term).
    Perturbed,
    /// The start of training: He-uniform kernels, BatchNorm γ = 1, β = 0, mean 0, var 1, biases 0.
    Fresh,
}

/// A set of named f32 tensors: read from a safetensors file, or synthesised on demand.
///
/// Layers ask for their tensors by name and shape with [`Checkpoint::take`]; afterwards
/// [`Checkpoint::finish`] rejects any tensor that no layer asked for (except BatchNorm's
/// `num_batches_tracked` and the training-state prefixes), so a checkpoint for another
/// architecture or width never loads silently.
pub struct Checkpoint {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor<f32>>,
    metadata: HashMap<String, String>,
    used: Mutex<BTreeSet<String>>,
    random: Option<(Init, Mutex<Synth>)>,
}

impl Checkpoint {
    /// Read every float tensor of a safetensors file (F32, F16 or BF16).
    pub fn load(path: &Path) -> Result<Self> {
        let f = TensorFile::open(path)?;
        let mut tensors = BTreeMap::new();
        for name in f.names() {
            if name.ends_with("num_batches_tracked") {
                continue;
            }
            let t = f.float_any(&name)?;
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::format(path, format!("tensor `{name}` has a NaN or infinite value at index {i}")));
            }
            tensors.insert(name, t);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata: f.metadata(),
            used: Mutex::new(BTreeSet::new()),
            random: None,
        })
    }

    /// A checkpoint that invents every tensor a model asks for: He-scaled kernels and linear
    /// weights, BatchNorm statistics near identity. For tests, benchmarks and shape discovery.
    pub fn random(seed: u64) -> Self {
        Self::synthetic(Init::Perturbed, seed)
    }

    /// A checkpoint that invents the initial weights of training (He-uniform kernels and linear
    /// weights, identity BatchNorm, zero biases).
    pub fn fresh(seed: u64) -> Self {
        Self::synthetic(Init::Fresh, seed)
    }

    fn synthetic(init: Init, seed: u64) -> Self {
        Self {
            path: PathBuf::from("<random>"),
            tensors: BTreeMap::new(),
            metadata: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
            random: Some((init, Mutex::new((seed, BTreeMap::new())))),
        }
    }

    /// Tensors already in memory (e.g. the weights of a model being trained), named `label` in
    /// messages.
    pub fn from_tensors(
        label: &str,
        tensors: BTreeMap<String, Tensor<f32>>,
        metadata: HashMap<String, String>,
    ) -> Self {
        Self { path: PathBuf::from(label), tensors, metadata, used: Mutex::new(BTreeSet::new()), random: None }
    }

    /// Whether tensors are invented on demand ([`Checkpoint::random`], [`Checkpoint::fresh`]):
    /// such a checkpoint has no shapes to read widths from.
    pub fn is_synthetic(&self) -> bool {
        self.random.is_some()
    }

    /// Every stored tensor by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor<f32>> {
        &self.tensors
    }

    /// A stored tensor by name (any shape), for training state and masks.
    pub fn get(&self, name: &str) -> Option<&Tensor<f32>> {
        self.tensors.get(name)
    }

    /// The file's `__metadata__`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Shape of a stored tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Where the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn take(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some((init, r)) = &self.random {
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            r.0 += 1;
            let n: usize = shape.iter().product();
            let data = synth(*init, name, shape, n, r.0);
            r.1.insert(name.to_string(), Tensor { shape: shape.to_vec(), data: data.clone() });
            return Ok(data);
        }
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::format(&self.path, format!("missing tensor `{name}` (the model expects shape {shape:?})"))
        })?;
        if t.shape != shape {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` has shape {:?} but the model expects {shape:?}", t.shape),
            ));
        }
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        Ok(t.data.clone())
    }

    /// Fail on tensors no layer asked for (another architecture, width or class count).
    pub fn finish(&self) -> Result<()> {
        if self.random.is_some() {
            return Ok(());
        }
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in &self.tensors {
            if !used.contains(name) && !TRAINING_PREFIXES.iter().any(|p| name.starts_with(p)) {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "unknown tensor `{name}` with shape {:?} (weights for another architecture or width?)",
                        t.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check the metadata's kept-offset lists against the tensors: every listed conv exists,
    /// its offsets are in range, and every offset not listed is all zero.
    pub fn check_kept_offsets(&self) -> Result<()> {
        for (key, list) in &self.metadata {
            let Some(name) = key.strip_prefix(KEPT_OFFSETS) else { continue };
            let bad = |msg: String| Error::format(&self.path, format!("metadata `{key}`: {msg}"));
            let t = self.tensors.get(name).ok_or_else(|| bad(format!("no tensor `{name}`")))?;
            if t.shape.len() != 3 {
                return Err(bad(format!("`{name}` has shape {:?}, not [K, Cin, Cout]", t.shape)));
            }
            let mut keep = vec![false; t.shape[0]];
            for v in list.split(',').filter(|v| !v.is_empty()) {
                match v.trim().parse::<usize>() {
                    Ok(k) if k < keep.len() => keep[k] = true,
                    _ => return Err(bad(format!("`{v}` is not an offset of a {}-offset kernel", keep.len()))),
                }
            }
            let per = t.shape[1] * t.shape[2];
            if let Some(k) =
                (0..keep.len()).find(|&k| !keep[k] && t.data[k * per..(k + 1) * per].iter().any(|&v| v != 0.0))
            {
                return Err(bad(format!("offset {k} is not listed as kept but its weights are not zero")));
            }
        }
        Ok(())
    }

    /// The tensors a random checkpoint has invented so far (to save them).
    pub fn synthesized(&self) -> BTreeMap<String, Tensor<f32>> {
        self.random.as_ref().map(|(_, r)| r.lock().unwrap_or_else(|e| e.into_inner()).1.clone()).unwrap_or_default()
    }
}

/// Save named tensors (f32, or f16 when `half`) with metadata.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor<f32>>,
    metadata: HashMap<String, String>,
    half: bool,
) -> Result<()> {
    let list = tensors
        .iter()
        .map(|(n, t)| {
            let v =
                if half { OutTensor::F16(&t.data, t.shape.clone()) } else { OutTensor::F32(&t.data, t.shape.clone()) };
            (n.as_str(), v)
        })
        .collect();
    write(path, list, Some(metadata))
}

fn synth(init: Init, name: &str, shape: &[usize], n: usize, seed: u64) -> Vec<f32> {
    let leaf = name.rsplit('.').next().unwrap_or("");
    match (init, leaf) {
        (Init::Fresh, "running_var") => vec![1.0; n],
        (Init::Fresh, "running_mean" | "bias") => vec![0.0; n],
        (Init::Fresh, "weight") if shape.len() == 1 => vec![1.0; n],
        _ => synth_perturbed(name, shape, n, seed),
    }
}

fn synth_perturbed(name: &str, shape: &[usize], n: usize, seed: u64) -> Vec<f32> {
    let leaf = name.rsplit('.').next().unwrap_or("");
    match leaf {
        "running_var" => pseudo_random(n, seed, 0.25).into_iter().map(|v| 1.0 + v).collect(),
        "running_mean" | "bias" => pseudo_random(n, seed, 0.1),
        "weight" if shape.len() == 1 => pseudo_random(n, seed, 0.2).into_iter().map(|v| 1.0 + v).collect(),
        _ => {
            // Kernels [K, Cin, Cout] / [Cin, Cout] and linear weights [out, in]: He-uniform on fan-in.
            let fan_in = match shape.len() {
                3 => shape[0] * shape[1],
                2 if leaf == "kernel" => shape[0],
                2 => shape[1],
                _ => 1,
            };
            pseudo_random(n, seed, (6.0 / fan_in.max(1) as f32).sqrt())
        }
    }
}
