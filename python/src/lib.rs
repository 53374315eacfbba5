//! Python bindings of sparseconv (`import sparseconv`): numpy arrays in and out, the engine
//! working with the GIL released, errors raised as Python exceptions carrying the same one-line
//! messages as the command line. The Python-side docs and types are in `py/sparseconv/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use sparseconv::io::kitti::{LearningMap, NUM_CLASSES};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{self, Prepared, Timings, VoxelizeMode};
use sparseconv::prune;
use sparseconv::prune::channel::{ChannelOptions, Selection};
use sparseconv::prune::importance::Criterion;
use sparseconv::{
    ConvWeight, CoordSet, Device, Engine, Error, Grouping, KernelSpec, PointCloud, Precision, SparseTensor,
};

/// The SemanticKITTI label map (training id ↔ raw id), as bundled with the repository.
const KITTI_YAML: &str = include_str!("../../data/semantickitti/semantic-kitti.yaml");

/// A library error as the Python exception a caller expects, with the CLI's message.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::NoGpu(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

fn value_err(what: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{what}: {msg}"))
}

/// The values of a 2-D array, row-major: borrowed where numpy already lays it out so, copied
/// otherwise (the engine then takes its own copy: tensors own their features).
fn rows_f32(a: &PyReadonlyArray2<'_, f32>) -> Vec<f32> {
    match a.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    }
}

fn points_of(points: &PyReadonlyArray2<'_, f32>) -> PyResult<PointCloud> {
    let dims = points.shape()[1];
    PointCloud::new(rows_f32(points), dims).map_err(py_err)
}

fn device_of(device: &str) -> PyResult<Device> {
    match device {
        "cpu" => Ok(Device::Cpu),
        "gpu" => Device::gpu().map_err(py_err),
        other => Err(value_err("device", format!("expected \"cpu\" or \"gpu\", got {other:?}"))),
    }
}

fn precision_of(precision: &str, device: &Device) -> PyResult<Precision> {
    match (precision, device) {
        ("f32", _) => Ok(Precision::F32),
        ("f16", Device::Gpu(_)) => Ok(Precision::F16),
        ("bf16", Device::Cpu) => Ok(Precision::Bf16),
        ("f16", Device::Cpu) => Err(value_err("precision", "f16 is a GPU mode (the CPU has bf16)")),
        ("bf16", Device::Gpu(_)) => Err(value_err("precision", "bf16 is a CPU mode (the GPU has f16)")),
        (other, _) => Err(value_err("precision", format!("expected \"f32\", \"f16\" or \"bf16\", got {other:?}"))),
    }
}

fn thread_pool(threads: Option<usize>) -> PyResult<Option<Arc<rayon::ThreadPool>>> {
    match threads {
        None => Ok(None),
        Some(0) => Err(value_err("threads", "must be at least 1")),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map(|p| Some(Arc::new(p)))
            .map_err(|e| value_err("threads", e)),
    }
}

/// Run `f` without the GIL, on `pool` when one was asked for.
fn run<T: Send>(py: Python<'_>, pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| match pool {
        Some(p) => p.install(f),
        None => f(),
    })
}

/// Points of a scan file (.bin, .pcd.bin, .ply, .npy) as float32 `[N, C]` (x, y, z, then the
/// file's other columns).
#[pyfunction]
fn read_points<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let cloud = py.detach(|| sparseconv::io::read_points(&path, None)).map_err(py_err)?;
    let n = cloud.data.len() / cloud.dims;
    let a = Array2::from_shape_vec((n, cloud.dims), cloud.data).map_err(|e| value_err("points", e))?;
    Ok(a.into_pyarray(py))
}

/// Voxelize points (float32 `[N, C]`, C ≥ 3) at `voxel_size`: voxel coordinates int32
/// `[M, 4]` (batch, x, y, z), the mean of every point column per voxel float32 `[M, C]`, and
/// each point's voxel row int64 `[N]`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn voxelize<'py>(
    py: Python<'py>,
    points: PyReadonlyArray2<'py, f32>,
    voxel_size: f32,
) -> PyResult<(Bound<'py, PyArray2<i32>>, Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<i64>>)> {
    let cloud = points_of(&points)?;
    let v = py.detach(|| sparseconv::voxel::voxelize(&cloud, voxel_size)).map_err(py_err)?;
    let m = v.tensor.len();
    let c = v.tensor.channels();
    let coords: Vec<i32> = v.tensor.coords().iter().flatten().copied().collect();
    let coords = Array2::from_shape_vec((m, 4), coords).map_err(|e| value_err("coords", e))?;
    let feats = Array2::from_shape_vec((m, c), v.tensor.feats().to_vec()).map_err(|e| value_err("feats", e))?;
    let inverse: Vec<i64> = v.inverse.iter().map(|&i| i64::from(i)).collect();
    Ok((coords.into_pyarray(py), feats.into_pyarray(py), inverse.into_pyarray(py)))
}

/// One sparse convolution in TorchSparse's layout: weight float32 `[K, Cin, Cout]` in
/// TorchSparse's offset order; returns the output coordinates int32 `[M', 4]` and features
/// float32 `[M', Cout]`. `tensor_stride` is the input's stride in voxels; a transposed conv
/// needs `target_coords`, the finer coordinates it upsamples back onto (those the matching
/// strided conv started from).
#[pyfunction]
#[pyo3(signature = (coords, feats, weight, kernel_size, stride=1, dilation=1, transposed=false, target_coords=None, tensor_stride=1, bias=None, device="cpu"))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn conv<'py>(
    py: Python<'py>,
    coords: PyReadonlyArray2<'py, i32>,
    feats: PyReadonlyArray2<'py, f32>,
    weight: PyReadonlyArray3<'py, f32>,
    kernel_size: u32,
    stride: u32,
    dilation: u32,
    transposed: bool,
    target_coords: Option<PyReadonlyArray2<'py, i32>>,
    tensor_stride: i32,
    bias: Option<Vec<f32>>,
    device: &str,
) -> PyResult<(Bound<'py, PyArray2<i32>>, Bound<'py, PyArray2<f32>>)> {
    let coords4 = |a: &PyReadonlyArray2<'py, i32>, what: &str| -> PyResult<Vec<[i32; 4]>> {
        if a.shape()[1] != 4 {
            return Err(value_err(what, format!("expected [M, 4] (batch, x, y, z), got {:?}", a.shape())));
        }
        Ok(a.as_array().rows().into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
    };
    let c = coords4(&coords, "coords")?;
    let (cin, wshape) = (feats.shape()[1], weight.shape().to_vec());
    if feats.shape()[0] != c.len() {
        return Err(value_err("feats", format!("{} rows for {} coordinates", feats.shape()[0], c.len())));
    }
    let spec = KernelSpec::new(kernel_size, stride, dilation).map_err(py_err)?;
    if wshape[0] != spec.volume() || wshape[1] != cin {
        return Err(value_err(
            "weight",
            format!(
                "expected [{}, {cin}, Cout] for kernel size {kernel_size} and {cin} input channels, got {wshape:?}",
                spec.volume()
            ),
        ));
    }
    let kernel: Vec<f32> = weight.as_array().iter().copied().collect();
    let w = ConvWeight::new(kernel, wshape[0], wshape[1], wshape[2], bias).map_err(py_err)?;
    let input = CoordSet::new(c, tensor_stride).map_err(py_err)?;
    let x = SparseTensor::new(Arc::new(input), rows_f32(&feats), cin).map_err(py_err)?;
    let target = match (transposed, target_coords) {
        (true, Some(t)) => {
            let fine = tensor_stride / stride.max(1) as i32;
            if fine * stride as i32 != tensor_stride {
                return Err(value_err(
                    "tensor_stride",
                    format!("a transposed conv of stride {stride} needs an input stride divisible by it, got {tensor_stride}"),
                ));
            }
            Some(Arc::new(CoordSet::new(coords4(&t, "target_coords")?, fine).map_err(py_err)?))
        }
        (true, None) => {
            return Err(value_err("target_coords", "a transposed conv needs the coordinates to upsample onto"))
        }
        (false, Some(_)) => return Err(value_err("target_coords", "only a transposed conv takes them")),
        (false, None) => None,
    };
    let device = device_of(device)?;
    let engine = Engine::new(device.clone(), device.map_builder(), Grouping::Heuristic);
    let y = py
        .detach(|| match &target {
            Some(t) => engine.conv_transposed(&x, t, &w, spec),
            None => engine.conv(&x, &w, spec),
        })
        .map_err(py_err)?;
    let m = y.len();
    let out_c: Vec<i32> = y.coords().iter().flatten().copied().collect();
    let out_c = Array2::from_shape_vec((m, 4), out_c).map_err(|e| value_err("coords", e))?;
    let feats = y.try_feats().map_err(py_err)?.to_vec();
    let out_f = Array2::from_shape_vec((m, w.cout), feats).map_err(|e| value_err("feats", e))?;
    Ok((out_c.into_pyarray(py), out_f.into_pyarray(py)))
}

/// Prune a model file and write the smaller model: `granularity` "channel" (criterion "l1",
/// "l2", "bn" or "random"; widths kept on multiples of `round_to`) or "offset" (kernel offsets
/// by L1). Returns the pruned widths (`stem/stage1/.../up4`).
#[pyfunction]
#[pyo3(signature = (model, out, ratio, granularity="channel", criterion="l1", round_to=16))]
fn prune_model(
    py: Python<'_>,
    model: PathBuf,
    out: PathBuf,
    ratio: f64,
    granularity: &str,
    criterion: &str,
    round_to: usize,
) -> PyResult<String> {
    let criterion: Criterion = criterion.parse().map_err(py_err)?;
    if criterion == Criterion::Taylor {
        return Err(value_err("criterion", "taylor needs labelled scans: use the command line's prune --data"));
    }
    let granularity = granularity.to_string();
    py.detach(move || -> sparseconv::Result<String> {
        let ck = Checkpoint::load(&model)?;
        let kind = match ck.metadata().get("arch") {
            Some(a) => sparseconv::nn::arch::ArchKind::parse(a)?,
            None => sparseconv::nn::arch::ArchKind::MinkUNet,
        };
        let pruned = match granularity.as_str() {
            "channel" => {
                let opts = ChannelOptions { ratio, selection: Selection::Local, round_to, min_width: 8 };
                prune::prune_channels(&ck, kind, criterion, &opts, &[], 0)?
            }
            "offset" if criterion == Criterion::L1 => {
                prune::prune_offsets(&ck, kind, ratio, Selection::Local, prune::offset::OffsetScope::Conv)?
            }
            "offset" => return Err(Error::invalid("criterion", "offsets are pruned by l1")),
            other => {
                return Err(Error::invalid("granularity", format!("expected \"channel\" or \"offset\", got {other:?}")))
            }
        };
        pruned.save(&out)?;
        Ok(pruned.after.widths_summary())
    })
    .map_err(py_err)
}

/// A segmentation network (MinkUNet or SPVCNN) loaded from a safetensors file, with the engine
/// it runs on.
#[pyclass(name = "Model", module = "sparseconv", frozen)]
struct PyModel {
    model: pipeline::Model,
    engine: Engine,
    pool: Option<Arc<rayon::ThreadPool>>,
    labels: LearningMap,
    cr: f32,
}

impl PyModel {
    fn prepare(&self, points: &PyReadonlyArray2<'_, f32>) -> PyResult<Prepared> {
        let cloud = points_of(points)?;
        pipeline::prepare_points(&cloud, VoxelizeMode::Mean).map_err(py_err)
    }

    fn segment_raw(&self, py: Python<'_>, p: &Prepared) -> PyResult<pipeline::Segmentation> {
        run(py, self.pool.as_deref(), || pipeline::segment(&self.engine, &self.model, p, &mut Timings::default()))
            .map_err(py_err)
    }
}

#[pymethods]
impl PyModel {
    /// Load weights (TorchSparse/SPVNAS names; pruned models too). `device` "cpu" or "gpu";
    /// `threads` CPU threads (default: all cores); `precision` "f32", "bf16" (CPU) or "f16" (GPU).
    #[staticmethod]
    #[pyo3(signature = (path, device="cpu", threads=None, precision="f32"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, threads: Option<usize>, precision: &str) -> PyResult<Self> {
        let device = device_of(device)?;
        let precision = precision_of(precision, &device)?;
        let pool = thread_pool(threads)?;
        let (model, cr) = py.detach(|| pipeline::Model::load(&path, None, None)).map_err(py_err)?;
        let labels = LearningMap::parse(KITTI_YAML, Path::new("semantic-kitti.yaml")).map_err(py_err)?;
        let engine = Engine::new(device.clone(), device.map_builder(), Grouping::Heuristic).with_precision(precision);
        Ok(Self { model, engine, pool, labels, cr })
    }

    /// Network name ("minkunet" or "spvcnn").
    #[getter]
    fn arch(&self) -> String {
        self.model.desc().kind.name().to_string()
    }

    /// Channel ratio the model was built with.
    #[getter]
    fn cr(&self) -> f32 {
        self.cr
    }

    /// Per-level widths, `stem/stage1/.../up4` (pruned models show their own).
    #[getter]
    fn widths(&self) -> String {
        self.model.desc().widths_summary()
    }

    /// A label per point of `points` (float32 `[N, C]`, x, y, z, then intensity): SemanticKITTI
    /// raw ids (as in `.label` files), or training ids 1..19 with `train_ids=True`.
    #[pyo3(signature = (points, train_ids=false))]
    fn segment<'py>(
        &self,
        py: Python<'py>,
        points: PyReadonlyArray2<'py, f32>,
        train_ids: bool,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let p = self.prepare(&points)?;
        let seg = self.segment_raw(py, &p)?;
        let labels: Vec<u32> = if train_ids {
            seg.point_labels
        } else {
            seg.point_labels.iter().map(|&t| self.labels.to_raw(t)).collect()
        };
        Ok(labels.into_pyarray(py))
    }

    /// Class scores per point, float32 `[N, 19]` (column j is training id j + 1).
    fn logits<'py>(&self, py: Python<'py>, points: PyReadonlyArray2<'py, f32>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let p = self.prepare(&points)?;
        let seg = self.segment_raw(py, &p)?;
        let inverse = p.inverse.unwrap_or_else(|| (0..p.points as u32).collect());
        let mut out = Vec::with_capacity(inverse.len() * NUM_CLASSES);
        for &v in &inverse {
            let v = v as usize;
            out.extend_from_slice(&seg.logits[v * NUM_CLASSES..(v + 1) * NUM_CLASSES]);
        }
        let a = Array2::from_shape_vec((inverse.len(), NUM_CLASSES), out).map_err(|e| value_err("logits", e))?;
        Ok(a.into_pyarray(py))
    }

    fn __repr__(&self) -> String {
        format!("sparseconv.Model({} cr={} widths {})", self.arch(), self.cr, self.widths())
    }
}

/// The extension module (`sparseconv._sparseconv`; `sparseconv/__init__.py` re-exports it).
#[pymodule]
fn _sparseconv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_points, m)?)?;
    m.add_function(wrap_pyfunction!(voxelize, m)?)?;
    m.add_function(wrap_pyfunction!(conv, m)?)?;
    m.add_function(wrap_pyfunction!(prune_model, m)?)?;
    m.add_class::<PyModel>()?;
    m.add("NUM_CLASSES", NUM_CLASSES)?;
    Ok(())
}
