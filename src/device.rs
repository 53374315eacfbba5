//! `Engine`: the device choice plus the per-network caches (kernel maps, tuned plans);
//! the only place that dispatches on the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cpu;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kmap::{KernelMap, KernelSpec, MapBuilder, MapKind};
use crate::plan::{Grouping, GroupingParams, Plan};
use crate::sparse_weights::{Format, OffsetWeights, SparseWeights};
use crate::tensor::{CoordSet, SparseTensor};

/// Where kernels run; models never match on it (only [`Engine`] does).
#[derive(Debug, Clone, Default)]
pub enum Device {
    /// Rayon-parallel CPU kernels on the global thread pool.
    #[default]
    Cpu,
    /// WGSL kernels through wgpu. Kernel maps, convolutions (with their fused bias, residual and
    /// ReLU) and concat run on the GPU, and features stay there between layers until the host
    /// asks for them ([`SparseTensor::feats`]); the classifier's linear layer, SPVCNN's point
    /// branch and every backward run on the CPU.
    Gpu(Arc<GpuContext>),
}

impl Device {
    /// The first GPU adapter (see [`GpuContext::new`]).
    pub fn gpu() -> Result<Self> {
        Ok(Device::Gpu(Arc::new(GpuContext::new()?)))
    }

    /// The faster kernel-map builder on this device (BENCHMARKS.md): merge-sort on the CPU,
    /// hashing on the GPU (H200: 3.1 ms against 6.0 ms for the scan's k3 map).
    pub fn map_builder(&self) -> MapBuilder {
        match self {
            Device::Cpu => MapBuilder::Sort,
            Device::Gpu(_) => MapBuilder::Hash,
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MapKey {
    input: u64,
    target: u64,
    kind: MapKind,
    spec: KernelSpec,
    /// Offsets the map was built for (`None`: all).
    keep: Option<Vec<bool>>,
}

/// Convolution weights `[K, Cin, Cout]` in TorchSparse offset order, plus an optional bias `[Cout]`.
///
/// The values are reached through accessors so that a GPU engine may keep a device copy with
/// them: the copy is made on first GPU use and dropped by every mutable access
/// ([`ConvWeight::kernel_mut`], [`ConvWeight::bias_mut`]), so an edit (pruning, fine-tuning)
/// is never hidden by a stale copy.
#[derive(Debug)]
pub struct ConvWeight {
    kernel: Vec<f32>,
    /// Kernel volume K.
    pub volume: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    bias: Option<Vec<f32>>,
    on_device: Mutex<Option<Arc<DeviceWeight>>>,
    /// Offsets whose `[Cin, Cout]` slice is all zero (pruned offsets): found on first use.
    zero_offsets: std::sync::OnceLock<Vec<bool>>,
    /// The kernel in a sparse format, for the CPU sparse kernels.
    sparse: Option<Arc<SparseWeights>>,
    /// Whether the sparse kernel timed faster (once per weight, `SparseMode::Auto`).
    sparse_wins: std::sync::OnceLock<bool>,
    /// The kernel rounded to bf16 and laid out for the CPU bf16 kernel: made on first use.
    bf16: std::sync::OnceLock<Arc<cpu::bf16::Bf16Kernel>>,
}

/// A [`ConvWeight`]'s values on one GPU context, in one storage precision.
#[derive(Debug)]
struct DeviceWeight {
    ctx: u64,
    precision: crate::gpu::conv::Precision,
    kernel: crate::gpu::conv::DeviceValues,
    bias: Option<crate::gpu::GpuBuffer<f32>>,
}

impl Clone for ConvWeight {
    fn clone(&self) -> Self {
        let on_device = self.on_device.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Self {
            kernel: self.kernel.clone(),
            volume: self.volume,
            cin: self.cin,
            cout: self.cout,
            bias: self.bias.clone(),
            on_device: Mutex::new(on_device),
            zero_offsets: self.zero_offsets.clone(),
            sparse: self.sparse.clone(),
            sparse_wins: self.sparse_wins.clone(),
            bf16: self.bf16.clone(),
        }
    }
}

impl ConvWeight {
    /// Validate and wrap a kernel `[volume, cin, cout]` and optional bias.
    pub fn new(kernel: Vec<f32>, volume: usize, cin: usize, cout: usize, bias: Option<Vec<f32>>) -> Result<Self> {
        if kernel.len() != volume * cin * cout {
            return Err(Error::tensor(
                "kernel",
                format!("expected [{volume}, {cin}, {cout}] = {} values, got {}", volume * cin * cout, kernel.len()),
            ));
        }
        if let Some(b) = &bias {
            if b.len() != cout {
                return Err(Error::tensor("bias", format!("expected [{cout}], got [{}]", b.len())));
            }
        }
        Ok(Self {
            kernel,
            volume,
            cin,
            cout,
            bias,
            on_device: Mutex::new(None),
            zero_offsets: Default::default(),
            sparse: None,
            sparse_wins: Default::default(),
            bf16: Default::default(),
        })
    }

    /// Also keep the kernel in sparse `format` (its zeros are the pruned weights), for the CPU
    /// sparse kernels. Fails where the zeros lack the format's structure.
    pub fn with_format(mut self, format: Format) -> Result<Self> {
        self.sparse = Some(Arc::new(SparseWeights::new(format, &self.kernel, self.volume, self.cin, self.cout)?));
        self.sparse_wins = Default::default();
        Ok(self)
    }

    /// The kernel in a sparse format, when it has one.
    pub fn sparse(&self) -> Option<&SparseWeights> {
        self.sparse.as_deref()
    }

    /// Per offset: whether its `[Cin, Cout]` slice is all zero. The CPU conv skips those
    /// offsets' pairs (an offset-pruned layer runs only its kept offsets); the products it
    /// skips are exact zeros, so the result is the same.
    pub fn zero_offsets(&self) -> &[bool] {
        self.zero_offsets.get_or_init(|| {
            let per = (self.cin * self.cout).max(1);
            self.kernel.chunks(per).map(|k| k.iter().all(|&v| v == 0.0)).collect()
        })
    }

    /// The kernel in the CPU bf16 kernel's layout, made once and kept (until an edit).
    pub fn bf16(&self) -> Result<&cpu::bf16::Bf16Kernel> {
        if let Some(k) = self.bf16.get() {
            return Ok(k);
        }
        let k = Arc::new(cpu::bf16::Bf16Kernel::new(&self.kernel, self.volume, self.cin, self.cout)?);
        Ok(self.bf16.get_or_init(|| k))
    }

    /// The kernel, row-major `[K, Cin, Cout]`.
    pub fn kernel(&self) -> &[f32] {
        &self.kernel
    }

    /// The bias `[Cout]`, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The kernel for editing in place (its length must stay `K·Cin·Cout`); drops any device copy.
    pub fn kernel_mut(&mut self) -> &mut [f32] {
        *self.on_device.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        self.zero_offsets = Default::default();
        // An edited kernel no longer matches its compressed or rounded copies: drop them.
        self.sparse = None;
        self.bf16 = Default::default();
        &mut self.kernel
    }

    /// The bias for editing in place; drops any device copy.
    pub fn bias_mut(&mut self) -> Option<&mut [f32]> {
        *self.on_device.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        self.bias.as_deref_mut()
    }

    /// The kernel and bias on `ctx` in `precision`: uploaded on first use, then reused.
    fn device_copy(
        &self,
        ctx: &crate::gpu::GpuContext,
        precision: crate::gpu::conv::Precision,
    ) -> Result<Arc<DeviceWeight>> {
        let mut slot = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = slot.as_ref().filter(|d| d.ctx == ctx.context_id() && d.precision == precision) {
            return Ok(d.clone());
        }
        let kernel = crate::gpu::conv::DeviceValues::upload(ctx, "weights", &self.kernel, precision)?;
        let bias = self.bias.as_deref().map(|b| ctx.to_device("bias", b)).transpose()?;
        let d = Arc::new(DeviceWeight { ctx: ctx.context_id(), precision, kernel, bias });
        *slot = Some(d.clone());
        Ok(d)
    }
}

/// Runs sparse convolutions on a device, caching kernel maps per coordinate set and tuned
/// plans per layer shape, so a network builds each map once.
#[derive(Debug, Default)]
pub struct Engine {
    device: Device,
    builder: MapBuilder,
    grouping: Grouping,
    maps: Mutex<HashMap<MapKey, Arc<KernelMap>>>,
    tuned: Mutex<HashMap<LayerKey, Tuned>>,
    map_secs: Mutex<f64>,
    prune_secs: Mutex<f64>,
    trace: Mutex<Option<Vec<LayerTrace>>>,
    tmaps: Mutex<HashMap<MapKey, Arc<KernelMap>>>,
    precision: crate::gpu::conv::Precision,
    gpu_tables: Mutex<HashMap<TableKey, Arc<GpuTables>>>,
    /// Host copies of maps' sorted neighbour tables, which voxel-pruned GPU convs cut to their
    /// kept rows (every pruned conv on one map shares one).
    sorted_tables: Mutex<HashMap<MapKey, Arc<crate::gpu::conv::SortedNeighbours>>>,
    sparse: SparseMode,
}

/// When a layer whose weights carry a sparse format ([`ConvWeight::with_format`]) runs the CPU
/// sparse kernel instead of the dense one (the GPU always runs them dense).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseMode {
    /// Measured: under `Grouping::Auto`, both timed once per weight on its first input;
    /// otherwise by density against the measured break-even of each format.
    #[default]
    Auto,
    /// Always the sparse kernel.
    Always,
    /// Always the dense kernel.
    Never,
}

/// Density at or below which a format beats the dense kernel on the CPU, for untimed runs
/// (BENCHMARKS.md, "Pruning": `cargo bench --bench sparse` on the scan's 64→64 and 128→128
/// layers: blocks win from 50% zeros, elements only near 90% on wide layers, N:M never on
/// this CPU, which has no sparse hardware).
pub fn break_even(f: Format) -> f64 {
    match f {
        Format::Block => 0.5,
        Format::Element => 0.1,
        Format::NM(..) => 0.0,
    }
}

/// A map's device-side tables for one execution plan (and, weight-stationary, one width).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TableKey {
    map: MapKey,
    plan: String,
    cin: usize,
    cout: usize,
}

/// What a GPU conv needs of its map, uploaded once per map and plan.
#[derive(Debug)]
enum GpuTables {
    /// Output-stationary: neighbour rows sorted by bitmask, and their output rows.
    OutputStationary(crate::gpu::GpuBuffer<i32>, crate::gpu::GpuBuffer<u32>),
    /// Gather -> GEMM -> scatter per group.
    WeightStationary(crate::gpu::conv::WeightStationary),
    /// Too large for one binding: the host-side path splits it.
    Split,
}

/// Timing of one conv call, recorded while tracing is on.
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// Map kind.
    pub kind: MapKind,
    /// Kernel.
    pub spec: KernelSpec,
    /// Input rows.
    pub n_in: usize,
    /// Output rows.
    pub n_out: usize,
    /// Map pairs the conv ran (those of kept offsets only, for an offset-pruned layer on the
    /// CPU).
    pub pairs: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Execution plan.
    pub plan: String,
    /// Wall-clock seconds of the conv (epilogue included, map build excluded).
    pub seconds: f64,
    /// The output's coordinates (the network level the conv writes, as a shared set).
    pub out_coords: Arc<CoordSet>,
    /// For a voxel-pruned submanifold conv: the output rows it computed (ascending); `None`
    /// when every output row was computed.
    pub computed_rows: Option<Arc<[u32]>>,
}

/// What the tuner chose for a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tuned {
    Ungrouped,
    Grouped(GroupingParams),
    OutputTiled,
}

/// A layer's identity for the tuner: tuned parameters carry over to new scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LayerKey {
    kind: MapKind,
    spec: KernelSpec,
    in_stride: i32,
    cin: usize,
    cout: usize,
}

impl Engine {
    /// An engine on `device` building maps with `builder` and grouping offsets per `grouping`.
    pub fn new(device: Device, builder: MapBuilder, grouping: Grouping) -> Self {
        Self { device, builder, grouping, ..Default::default() }
    }

    /// Use `precision` for convs: f16 on the GPU; bf16 on the CPU where it has AVX512_BF16
    /// (elsewhere the CPU runs f32: [`crate::cpu::bf16::describe`] says which). The CPU runs f16
    /// as f32, and a GPU conv refuses bf16.
    pub fn with_precision(mut self, precision: crate::gpu::conv::Precision) -> Self {
        self.precision = precision;
        self
    }

    /// When layers with sparse weights run the CPU sparse kernels.
    pub fn with_sparse_mode(mut self, mode: SparseMode) -> Self {
        self.sparse = mode;
        self
    }

    /// Storage precision of convs.
    pub fn precision(&self) -> crate::gpu::conv::Precision {
        self.precision
    }

    /// The kernel-map builder.
    pub fn builder(&self) -> MapBuilder {
        self.builder
    }

    /// The device this engine runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Forget every cached kernel map (e.g. between scans). Tuned grouping parameters are
    /// kept: they belong to the layer, not to the scan (TorchSparse tunes once per dataset).
    pub fn clear_cache(&self) {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.tmaps.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.sorted_tables.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Forget the tuned grouping parameters too.
    pub fn clear_tuning(&self) {
        self.tuned.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Seconds spent building kernel maps since the last call (for per-stage timings).
    pub fn take_map_seconds(&self) -> f64 {
        std::mem::take(&mut *self.map_secs.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Seconds spent on voxel pruning's own work since the last call: scoring and selecting
    /// voxels, restricting maps to the kept rows or sites, filling the pruned rows.
    pub fn take_prune_seconds(&self) -> f64 {
        std::mem::take(&mut *self.prune_secs.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Count `s` seconds of voxel-pruning work (see [`Engine::take_prune_seconds`]).
    pub fn add_prune_seconds(&self, s: f64) {
        *self.prune_secs.lock().unwrap_or_else(|e| e.into_inner()) += s;
    }

    /// Start (or restart) recording per-conv timings.
    pub fn start_trace(&self) {
        *self.trace.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Stop recording and return what was recorded.
    pub fn take_trace(&self) -> Vec<LayerTrace> {
        self.trace.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }

    /// Number of cached kernel maps.
    pub fn cached_maps(&self) -> usize {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn cached(&self, key: MapKey, build: impl FnOnce() -> Result<KernelMap>) -> Result<Arc<KernelMap>> {
        if let Some(m) = self.maps.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(m.clone());
        }
        let t0 = std::time::Instant::now();
        let m = Arc::new(build()?);
        *self.map_secs.lock().unwrap_or_else(|e| e.into_inner()) += t0.elapsed().as_secs_f64();
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).insert(key, m.clone());
        Ok(m)
    }

    /// The forward map of a conv on `input`: submanifold for stride 1, downsampling otherwise.
    pub fn kernel_map(&self, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<Arc<KernelMap>> {
        self.kernel_map_keeping(input, spec, None)
    }

    /// [`Engine::kernel_map`] built for the offsets `keep` marks only (`None`: all): the
    /// union of what the convs sharing the map use, so offsets an offset-pruned network never
    /// uses are neither searched (CPU) nor run. Cached apart from the full map.
    pub fn kernel_map_keeping(
        &self,
        input: &Arc<CoordSet>,
        spec: KernelSpec,
        keep: Option<&[bool]>,
    ) -> Result<Arc<KernelMap>> {
        let keep = keep.and_then(KernelMap::kept_mask);
        let kind = if spec.stride == 1 { MapKind::Submanifold } else { MapKind::Down };
        let key = MapKey { input: input.id(), target: 0, kind, spec, keep: keep.clone() };
        let keep = keep.as_deref();
        self.cached(key, || match &self.device {
            Device::Cpu => cpu::build_map_keeping(self.builder, input, spec, keep),
            Device::Gpu(g) => {
                let (map, tables) = match self.builder {
                    MapBuilder::Hash => crate::gpu::kmap::build_with_tables(g, input, spec, keep)?,
                    MapBuilder::Sort => crate::gpu::kmap::build_sorted_with_tables(g, input, spec, keep)?,
                };
                // The conv's sorted neighbour table was made on the device with the map: keep it.
                if let Some(t) = tables {
                    let key = Self::table_key(&map, &Self::device_output_tiled(), 0, 0);
                    let t = Arc::new(GpuTables::OutputStationary(t.nbr, t.out_rows));
                    self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).insert(key, t);
                }
                Ok(map)
            }
        })
    }

    /// The map of a transposed (upsampling) conv from `input` back to `target`: the transposed
    /// map of the downsampling conv `spec` on `target`, whose outputs must be `input`'s coordinates.
    pub fn transposed_map(
        &self,
        input: &Arc<CoordSet>,
        target: &Arc<CoordSet>,
        spec: KernelSpec,
    ) -> Result<Arc<KernelMap>> {
        self.transposed_map_keeping(input, target, spec, None)
    }

    /// [`Engine::transposed_map`] from the down map built for the offsets `keep` marks only
    /// (see [`Engine::kernel_map_keeping`]).
    pub fn transposed_map_keeping(
        &self,
        input: &Arc<CoordSet>,
        target: &Arc<CoordSet>,
        spec: KernelSpec,
        keep: Option<&[bool]>,
    ) -> Result<Arc<KernelMap>> {
        if spec.stride < 2 {
            return Err(Error::invalid("transposed conv", "stride must be at least 2"));
        }
        let keep = keep.and_then(KernelMap::kept_mask);
        let key = MapKey { input: input.id(), target: target.id(), kind: MapKind::Up, spec, keep: keep.clone() };
        // Outside the cache closure, so its build time is counted once. A voxel-pruned down
        // conv made `input` from `target` with a map of its own: run on its transpose.
        let pruned = MapKey { input: target.id(), target: input.id(), kind: MapKind::Down, spec, keep: keep.clone() };
        let found = self.maps.lock().unwrap_or_else(|e| e.into_inner()).get(&pruned).cloned();
        let down = match found {
            Some(m) => m,
            None => self.kernel_map_keeping(target, spec, keep.as_deref())?,
        };
        self.cached(key, || {
            if !same_coords(down.out_coords(), input) {
                return Err(Error::invalid(
                    "transposed conv",
                    format!(
                        "input coordinates (stride {}, {} voxels) are not the stride-{} downsampling of the target (stride {}, {} voxels)",
                        input.stride(),
                        input.len(),
                        spec.stride,
                        target.stride(),
                        target.len()
                    ),
                ));
            }
            // Lazily: a GPU conv on it needs only the counts and the device tables.
            let mut up = down.transposed_lazy();
            up.share_in_coords(input.clone());
            if let Device::Gpu(g) = &self.device {
                // The transposed conv's table, from the down map's on the device.
                let ot = Self::device_output_tiled();
                let found = self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).get(&Self::table_key(&down, &ot, 0, 0)).cloned();
                if let Some(GpuTables::OutputStationary(nbr, rows)) = found.as_deref() {
                    let dn = crate::gpu::kmap::DeviceNeighbours { nbr: nbr.clone_ref(), out_rows: rows.clone_ref() };
                    let t = dn.transposed(g, up.volume(), up.n_out())?;
                    let t = Arc::new(GpuTables::OutputStationary(t.nbr, t.out_rows));
                    self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).insert(Self::table_key(&up, &ot, 0, 0), t);
                }
            }
            Ok(up)
        })
    }

    /// The execution plan of `map` for these weights: fixed, ungrouped, or tuned once per layer
    /// on its first input.
    pub fn plan_for(&self, map: &KernelMap, x: &[f32], w: &ConvWeight) -> Result<Plan> {
        if matches!(self.device, Device::Gpu(_)) && matches!(self.grouping, Grouping::Auto | Grouping::Heuristic) {
            return Ok(crate::gpu::conv::default_plan(map, w.cout));
        }
        Ok(match self.grouping {
            Grouping::Off => Plan::ungrouped(map),
            Grouping::Fixed(p) => Plan::grouped(map, p),
            Grouping::OutputTiled if matches!(self.device, Device::Gpu(_)) => Self::device_output_tiled(),
            Grouping::OutputTiled => Plan::output_tiled(map),
            Grouping::Heuristic => Plan::output_tiled(map),
            Grouping::Auto => {
                let key = LayerKey {
                    kind: map.kind(),
                    spec: map.spec(),
                    in_stride: map.in_coords().stride(),
                    cin: w.cin,
                    cout: w.cout,
                };
                let known = self.tuned.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
                match known {
                    Some(Tuned::Grouped(p)) => Plan::grouped(map, p),
                    Some(Tuned::Ungrouped) => Plan::ungrouped(map),
                    Some(Tuned::OutputTiled) => Plan::output_tiled(map),
                    None => {
                        let (plan, _) = cpu::tune::tune(map, x, w.cin, w.kernel(), w.cout, 2)?;
                        self.tuned.lock().unwrap_or_else(|e| e.into_inner()).insert(
                            key,
                            match (plan.output_tiled, plan.params) {
                                (true, _) => Tuned::OutputTiled,
                                (false, Some(p)) => Tuned::Grouped(p),
                                (false, None) => Tuned::Ungrouped,
                            },
                        );
                        plan
                    }
                }
            }
        })
    }

    /// Run `x` through the conv of `map` with weights `w`.
    pub fn conv_with_map(&self, map: &KernelMap, x: &SparseTensor, w: &ConvWeight) -> Result<SparseTensor> {
        self.conv_fused(map, x, w, None, false)
    }

    /// Conv of `map`, then `relu?(out + bias + residual)` fused into one pass.
    pub fn conv_fused(
        &self,
        map: &KernelMap,
        x: &SparseTensor,
        w: &ConvWeight,
        residual: Option<&SparseTensor>,
        relu: bool,
    ) -> Result<SparseTensor> {
        self.conv_fused_ex(map, x, w, residual, relu, None)
    }

    /// [`Engine::conv_fused`], computing only the output rows `pruned` keeps (`keep[q]`) and
    /// giving the others its fill (resolved to the widths). On the CPU (f32 or bf16) the
    /// pruned rows' pairs are filtered out tile by tile inside the output-tiled kernel and
    /// their fill is written by its epilogue; on the GPU the output-stationary table holds only
    /// the kept rows and a row kernel writes the fill. No restricted map is built.
    fn conv_fused_ex(
        &self,
        map: &KernelMap,
        x: &SparseTensor,
        w: &ConvWeight,
        residual: Option<&SparseTensor>,
        relu: bool,
        pruned: Option<(&[bool], crate::voxel_prune::Fill)>,
    ) -> Result<SparseTensor> {
        if let Some(r) = residual {
            if !same_coords(r.coord_set(), map.out_coords()) || r.channels() != w.cout {
                return Err(Error::invalid(
                    "residual add",
                    format!(
                        "shortcut ({} voxels, {} channels) does not match the conv output ({} voxels, {} channels)",
                        r.len(),
                        r.channels(),
                        map.n_out(),
                        w.cout
                    ),
                ));
            }
        }
        if x.channels() != w.cin {
            return Err(Error::tensor(
                "kernel",
                format!("input has {} channels but the kernel expects {}", x.channels(), w.cin),
            ));
        }
        if w.volume != map.volume() {
            return Err(Error::tensor(
                "kernel",
                format!(
                    "kernel volume {} does not match kernel size {} (volume {})",
                    w.volume,
                    map.spec().size,
                    map.volume()
                ),
            ));
        }
        // A map built for some offsets only serves weights that are zero at the others.
        if map.kept_offsets().is_some() {
            map.check_kept(w.zero_offsets())?;
        }
        let t0 = std::time::Instant::now();
        let (out, plan, label) = match &self.device {
            Device::Cpu => {
                // A map that came from a GPU is fetched here, where a lost device is an error.
                map.fetch()?;
                use crate::voxel_prune::Fill;
                let pruned = match pruned {
                    Some((keep, Fill::Input)) => {
                        Some(cpu::conv::PrunedRows { keep, fill: cpu::conv::RowFill::Copy(x.try_feats()?) })
                    }
                    Some((keep, Fill::Zero)) => {
                        Some(cpu::conv::PrunedRows { keep, fill: cpu::conv::RowFill::Residual })
                    }
                    None => None,
                };
                let epi = cpu::conv::Epilogue {
                    bias: w.bias(),
                    residual: residual.map(|r| r.try_feats()).transpose()?,
                    relu,
                    pruned,
                };
                let bf16 = self.precision == crate::gpu::conv::Precision::Bf16 && cpu::bf16::available();
                // Pruned rows are skipped by the output-tiled kernels (they read `epi.pruned`).
                let kept_rows = if pruned.is_some() { ", kept rows" } else { "" };
                if let Some(sw) = w.sparse().filter(|_| pruned.is_none() && self.use_sparse(map, x, w, epi)) {
                    let y = cpu::sparse::conv_sparse(map, x.try_feats()?, w.cin, sw, epi)?;
                    // The pairs it runs: those of offsets with any nonzero weight.
                    let skip: Vec<bool> = sw.offsets.iter().map(|o| *o == OffsetWeights::Empty).collect();
                    let plan = Plan::ungrouped(map).skipping(map, &skip);
                    let label = format!("sparse {} {:.2}", sw.format.name(), sw.density());
                    (SparseTensor::new(map.out_coords().clone(), y, w.cout)?, plan, label)
                } else if bf16 {
                    // One fixed execution (output-tiled, canonical offset order): the same
                    // bits for every thread count; pruned offsets are not run.
                    let skip = w.zero_offsets();
                    let y = cpu::bf16::conv_forward(map, x.try_feats()?, w.cin, w.bf16()?, Some(skip), epi)?;
                    let plan = Plan::output_tiled(map).skipping(map, skip);
                    (
                        SparseTensor::new(map.out_coords().clone(), y, w.cout)?,
                        plan,
                        format!("bf16 out-tiled{kept_rows}"),
                    )
                } else {
                    let plan = match pruned {
                        // Only the output-tiled execution skips rows; pruned offsets are not run.
                        Some(_) => Plan::output_tiled(map).skipping(map, w.zero_offsets()),
                        None => self.dense_cpu_plan(map, x, w)?,
                    };
                    let y = cpu::conv::conv_forward_ex(map, &plan, x.try_feats()?, w.cin, w.kernel(), w.cout, epi)?;
                    let label = format!("{}{kept_rows}", plan.label());
                    (SparseTensor::new(map.out_coords().clone(), y, w.cout)?, plan, label)
                }
            }
            Device::Gpu(g) => match pruned {
                Some((keep, fill)) => {
                    let y = self.gpu_conv_kept_rows(g, map, x, w, residual, relu, keep, fill)?;
                    (y, Plan::output_tiled(map), "gpu output-stationary, kept rows".to_string())
                }
                None => {
                    // The GPU plan needs no timing on features: do not pull them back to the
                    // host. Sparse formats run dense here (their zeros multiplied like any weight).
                    let plan = self.plan_for(map, &[], w)?;
                    let label = plan.label();
                    (self.gpu_conv(g, map, &plan, x, w, residual, relu)?, plan, label)
                }
            },
        };
        if let Some(trace) = self.trace.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // GPU work is only submitted so far: a layer's time includes its kernels.
            if let Device::Gpu(g) = &self.device {
                g.sync()?;
            }
            trace.push(LayerTrace {
                kind: map.kind(),
                spec: map.spec(),
                n_in: map.n_in(),
                n_out: map.n_out(),
                pairs: match pruned {
                    Some((keep, _)) => plan.pairs_kept(map, keep),
                    None if plan.groups.is_empty() => map.total_pairs(),
                    None => plan.pairs(map),
                },
                cin: w.cin,
                cout: w.cout,
                plan: label,
                seconds: t0.elapsed().as_secs_f64(),
                out_coords: map.out_coords().clone(),
                computed_rows: None,
            });
        }
        Ok(out)
    }

    /// The dense CPU plan of a layer, without the offsets whose weights are all zero
    /// (offset-pruned layers: those pairs are never gathered or multiplied).
    fn dense_cpu_plan(&self, map: &KernelMap, x: &SparseTensor, w: &ConvWeight) -> Result<Plan> {
        let plan = self.plan_for(map, x.try_feats()?, w)?;
        let zero = w.zero_offsets();
        Ok(if zero.iter().any(|&z| z) { plan.skipping(map, zero) } else { plan })
    }

    /// Whether a layer with sparse weights runs the sparse kernel: as the engine's
    /// [`SparseMode`] says; `Auto` times both once per weight on its first input under
    /// `Grouping::Auto`, and otherwise follows the measured break-even densities
    /// (BENCHMARKS.md, "Pruning").
    fn use_sparse(&self, map: &KernelMap, x: &SparseTensor, w: &ConvWeight, epi: cpu::conv::Epilogue<'_>) -> bool {
        let Some(sw) = w.sparse() else { return false };
        match self.sparse {
            SparseMode::Never => false,
            SparseMode::Always => true,
            SparseMode::Auto if self.grouping == Grouping::Auto => *w.sparse_wins.get_or_init(|| {
                let time = |f: &dyn Fn() -> Result<Vec<f32>>| -> f64 {
                    (0..2)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            let ok = f().is_ok();
                            if ok {
                                t.elapsed().as_secs_f64()
                            } else {
                                f64::INFINITY
                            }
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let sparse = time(&|| cpu::sparse::conv_sparse(map, x.try_feats()?, w.cin, sw, epi));
                let dense = time(&|| {
                    let plan = self.dense_cpu_plan(map, x, w)?;
                    cpu::conv::conv_forward_ex(map, &plan, x.try_feats()?, w.cin, w.kernel(), w.cout, epi)
                });
                sparse < dense
            }),
            SparseMode::Auto => sw.density() <= break_even(sw.format),
        }
    }

    /// The output-stationary plan as the GPU runs it: from its device tables, so without the
    /// per-offset groups (which would need the map's counts on the host).
    fn device_output_tiled() -> Plan {
        crate::gpu::conv::output_stationary_plan()
    }

    /// The cache key of a built map (a map kept for some offsets only has its own).
    fn map_key(map: &KernelMap) -> MapKey {
        MapKey {
            input: map.in_coords().id(),
            target: map.out_coords().id(),
            kind: map.kind(),
            spec: map.spec(),
            keep: map.kept_offsets().map(<[bool]>::to_vec),
        }
    }

    fn table_key(map: &KernelMap, plan: &Plan, cin: usize, cout: usize) -> TableKey {
        TableKey { map: Self::map_key(map), plan: plan.label(), cin, cout }
    }

    /// Whether a conv's operands each fit one storage binding of `ctx` (else the GPU conv
    /// splits the work on the host).
    fn gpu_fits(ctx: &GpuContext, map: &KernelMap, cin: usize, cout: usize) -> bool {
        let (limit, kv) = (ctx.binding_limit() as usize / 4, map.volume());
        map.n_in() * cin <= limit && map.n_out() * kv.max(cout) <= limit && kv * cin * cout <= limit
    }

    /// The voxel-pruned GPU conv: the map's bitmask-sorted neighbour table cut down to the kept
    /// rows (still in sorted order, so tiles keep sharing offsets) drives the
    /// output-stationary kernel, which writes only those rows; a row kernel writes the fill of
    /// the others into the same output first. Features stay on the device. Needs
    /// [`Engine::gpu_fits`] (the caller checks).
    #[allow(clippy::too_many_arguments)]
    fn gpu_conv_kept_rows(
        &self,
        ctx: &Arc<GpuContext>,
        map: &KernelMap,
        x: &SparseTensor,
        w: &ConvWeight,
        residual: Option<&SparseTensor>,
        relu: bool,
        keep: &[bool],
        fill: crate::voxel_prune::Fill,
    ) -> Result<SparseTensor> {
        use crate::gpu::conv::{conv_on_device_into, DeviceValues, SortedNeighbours};
        use crate::gpu::elementwise::{fill_rows, RowSource};
        use crate::gpu::DeviceFeats;
        let (cin, cout, kv, n_out) = (w.cin, w.cout, map.volume(), map.n_out());
        if keep.len() != n_out {
            return Err(Error::invalid("voxel pruning", "kept-row flags and output rows differ in number"));
        }
        let t0 = std::time::Instant::now();
        map.fetch()?;
        // Subset maps share their coordinates' ids with the whole map: never cached.
        let key = (map.kind() != MapKind::Subset).then(|| Self::map_key(map));
        let cached =
            key.as_ref().and_then(|k| self.sorted_tables.lock().unwrap_or_else(|e| e.into_inner()).get(k).cloned());
        let sorted = match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(SortedNeighbours::new(map)?);
                if let Some(k) = key {
                    self.sorted_tables.lock().unwrap_or_else(|e| e.into_inner()).insert(k, s.clone());
                }
                s
            }
        };
        let mut nbr = Vec::new();
        let mut rows = Vec::new();
        for (t, &o) in sorted.out_rows.iter().enumerate() {
            if keep[o as usize] {
                rows.push(o);
                nbr.extend_from_slice(&sorted.nbr[t * kv..(t + 1) * kv]);
            }
        }
        let pruned: Vec<u32> = (0..n_out as u32).filter(|&q| !keep[q as usize]).collect();
        self.add_prune_seconds(t0.elapsed().as_secs_f64());
        let xb = DeviceFeats::buffer_of(x, ctx, "x")?;
        let rb = residual.map(|r| DeviceFeats::buffer_of(r, ctx, "residual")).transpose()?;
        let y = ctx.scratch::<f32>("y", n_out * cout)?;
        if !pruned.is_empty() {
            let list = ctx.to_device("pruned rows", &pruned)?;
            // `fill` arrives resolved to the widths (`conv_voxel_pruned`).
            let src = match (fill, &rb) {
                (crate::voxel_prune::Fill::Input, _) => RowSource::Copy(&xb),
                (crate::voxel_prune::Fill::Zero, Some(r)) if relu => RowSource::Relu(r),
                (crate::voxel_prune::Fill::Zero, Some(r)) => RowSource::Copy(r),
                (crate::voxel_prune::Fill::Zero, None) => RowSource::Zero,
            };
            fill_rows(ctx, &y, cout, &list, src)?;
        }
        if !rows.is_empty() {
            let (tn, tr) = (ctx.to_device("kept neighbours", &nbr)?, ctx.to_device("kept rows", &rows)?);
            let xv = DeviceValues::from_features(ctx, &xb, self.precision)?;
            let dw = w.device_copy(ctx, self.precision)?;
            conv_on_device_into(
                ctx,
                (&tn, &tr),
                (&xv, cin),
                (&dw.kernel, kv, cout),
                dw.bias.as_ref(),
                rb.as_ref(),
                relu,
                &y,
            )?;
        }
        SparseTensor::from_device(map.out_coords().clone(), Box::new(DeviceFeats::new(y, ctx.clone())), cout)
    }

    /// The GPU conv with features kept on the device: inputs and residual used in place when a
    /// GPU op produced them, the map's tables uploaded once per map and plan, the output left
    /// on the device. Work over one binding takes the splitting host-side path.
    #[allow(clippy::too_many_arguments)]
    fn gpu_conv(
        &self,
        ctx: &Arc<GpuContext>,
        map: &KernelMap,
        plan: &Plan,
        x: &SparseTensor,
        w: &ConvWeight,
        residual: Option<&SparseTensor>,
        relu: bool,
    ) -> Result<SparseTensor> {
        use crate::gpu::conv::{conv_on_device, DeviceValues, SortedNeighbours, WeightStationary};
        let (cin, cout, kv) = (w.cin, w.cout, map.volume());
        // Output-stationary tables serve every width; weight-stationary chunks depend on it.
        let key = match plan.output_tiled {
            true => Self::table_key(map, plan, 0, 0),
            false => Self::table_key(map, plan, cin, cout),
        };
        // Subset maps (voxel pruning's restricted maps) share their coordinates' ids, so two
        // of them with different kept rows would share a key: their tables are never cached.
        let cacheable = map.kind() != MapKind::Subset;
        let cached = match Self::gpu_fits(ctx, map, cin, cout) {
            true if cacheable => self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned(),
            true => None,
            false => Some(Arc::new(GpuTables::Split)),
        };
        let tables = match cached {
            Some(t) => t,
            None => {
                let t = if map.n_out() == 0 || cout == 0 {
                    GpuTables::Split
                } else if plan.output_tiled {
                    let sorted = SortedNeighbours::new(map)?;
                    GpuTables::OutputStationary(
                        ctx.to_device("neighbours", &sorted.nbr)?,
                        ctx.to_device("out rows", &sorted.out_rows)?,
                    )
                } else {
                    match WeightStationary::prepare(ctx, map, plan, cin, cout)? {
                        Some(ws) => GpuTables::WeightStationary(ws),
                        None => GpuTables::Split,
                    }
                };
                let t = Arc::new(t);
                if cacheable {
                    self.gpu_tables.lock().unwrap_or_else(|e| e.into_inner()).insert(key, t.clone());
                }
                t
            }
        };
        if let GpuTables::Split = *tables {
            let y = crate::gpu::conv::conv_forward_planned(
                ctx,
                map,
                plan,
                x.try_feats()?,
                cin,
                w.kernel(),
                cout,
                w.bias(),
                residual.map(|r| r.try_feats()).transpose()?,
                relu,
                self.precision,
            )?;
            return SparseTensor::new(map.out_coords().clone(), y, cout);
        }
        use crate::gpu::DeviceFeats;
        // Inputs a GPU op produced are used in place; host features are uploaded.
        let xb = DeviceFeats::buffer_of(x, ctx, "x")?;
        let rb = residual.map(|r| DeviceFeats::buffer_of(r, ctx, "residual")).transpose()?;
        let rb = rb.as_ref();
        let xv = DeviceValues::from_features(ctx, &xb, self.precision)?;
        let dw = w.device_copy(ctx, self.precision)?;
        let (wv, bias) = (&dw.kernel, dw.bias.as_ref());
        let y = match &*tables {
            GpuTables::OutputStationary(nbr, rows) => {
                conv_on_device(ctx, (nbr, rows), (&xv, cin), (wv, kv, cout), bias, rb, relu)?
            }
            GpuTables::WeightStationary(ws) => ws.run(ctx, (&xv, cin), (wv, cout), bias, rb, relu)?,
            GpuTables::Split => unreachable!("handled above"),
        };
        SparseTensor::from_device(map.out_coords().clone(), Box::new(DeviceFeats::new(y, ctx.clone())), cout)
    }

    /// Gradients of the conv of `map` (see [`cpu::conv::ConvGrads`]); the transposed map is
    /// built once per map and cached.
    pub fn conv_backward(
        &self,
        map: &KernelMap,
        x: &SparseTensor,
        w: &ConvWeight,
        dy: &[f32],
        need_dx: bool,
    ) -> Result<cpu::conv::ConvGrads> {
        let key = Self::map_key(map);
        let tmap = {
            // Subset maps (voxel-pruned convs) share their coordinates but not their rows: a
            // key cannot tell them apart, so their transposes are never cached.
            let cached = if map.kind() == MapKind::Subset {
                Some(Arc::new(map.transposed()))
            } else {
                self.tmaps.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
            };
            match cached {
                Some(t) => t,
                None => {
                    let t = Arc::new(map.transposed());
                    self.tmaps.lock().unwrap_or_else(|e| e.into_inner()).insert(key, t.clone());
                    t
                }
            }
        };
        // The input gradient is a conv Cout -> Cin over the transposed map; the output-tiled
        // path measured fastest for it at every width of MinkUNet (about 5% of a training step
        // over the forward heuristic's choice).
        let dx_plan = match self.grouping {
            Grouping::Off => Plan::ungrouped(&tmap),
            _ => Plan::output_tiled(&tmap),
        };
        match &self.device {
            Device::Gpu(_) => {
                Err(Error::invalid("conv backward", "training runs on the CPU only (the GPU backward is not built)"))
            }
            Device::Cpu => {
                cpu::conv::conv_backward(map, &tmap, &dx_plan, x.try_feats()?, w.cin, w.kernel(), w.cout, dy, need_dx)
            }
        }
    }

    /// Channel concat `[a | b]` of two tensors on the same coordinates.
    pub fn concat(&self, a: &SparseTensor, b: &SparseTensor) -> Result<SparseTensor> {
        same_rows("concat", a, b)?;
        let c = a.channels() + b.channels();
        if let Device::Gpu(g) = &self.device {
            // On the device when either part is there already.
            if a.device_feats().is_some() || b.device_feats().is_some() {
                use crate::gpu::DeviceFeats;
                let (ba, bb) =
                    (DeviceFeats::buffer_of(a, g, "concat part")?, DeviceFeats::buffer_of(b, g, "concat part")?);
                let y = crate::gpu::elementwise::concat(g, &ba, a.channels(), &bb, b.channels())?;
                let dev = Box::new(crate::gpu::DeviceFeats::new(y, g.clone()));
                return SparseTensor::from_device(a.coord_set().clone(), dev, c);
            }
        }
        let f = cpu::elementwise::concat(a.try_feats()?, a.channels(), b.try_feats()?, b.channels());
        SparseTensor::new(a.coord_set().clone(), f, c)
    }

    /// Point-wise linear layer `x · Wᵀ + b`, PyTorch layout `W: [out, in]`. Returns `[N, out]`.
    pub fn linear(&self, x: &[f32], cin: usize, w: &[f32], b: &[f32], cout: usize) -> Result<Vec<f32>> {
        if w.len() != cin * cout || b.len() != cout || (cin > 0 && !x.len().is_multiple_of(cin)) {
            return Err(Error::invalid(
                "linear",
                format!("weight {} values, bias {} for {cin} -> {cout}", w.len(), b.len()),
            ));
        }
        Ok(match &self.device {
            Device::Cpu | Device::Gpu(_) => cpu::elementwise::linear(x, cin, w, b, cout),
        })
    }

    /// Sparse conv: submanifold for stride 1, downsampling otherwise.
    pub fn conv(&self, x: &SparseTensor, w: &ConvWeight, spec: KernelSpec) -> Result<SparseTensor> {
        let map = self.kernel_map(x.coord_set(), spec)?;
        self.conv_with_map(&map, x, w)
    }

    /// A voxel-pruned conv (see [`crate::voxel_prune`]). For stride 1, `rows` are the output
    /// rows computed (ascending); the others get `fill` (resolved for the widths). For a
    /// downsampling conv, `rows` are the important input rows: only their output sites exist,
    /// and the result lies on that smaller coordinate set (the transposed conv back onto
    /// `x`'s coordinates then finds this map in the cache). `reference` computes every
    /// voxel and overwrites the pruned ones instead (SPS-Conv's released semantics).
    #[allow(clippy::too_many_arguments)]
    pub fn conv_voxel_pruned(
        &self,
        x: &SparseTensor,
        spec: KernelSpec,
        keep: Option<&[bool]>,
        w: &ConvWeight,
        residual: Option<&SparseTensor>,
        relu: bool,
        rows: &[u32],
        fill: crate::voxel_prune::Fill,
        reference: bool,
    ) -> Result<SparseTensor> {
        if spec.stride > 1 {
            if residual.is_some() {
                return Err(Error::invalid("voxel pruning", "a downsampling conv takes no residual"));
            }
            let pmap = self.pruned_down_map(x.coord_set(), spec, keep, rows)?;
            if !reference {
                return self.conv_fused(&pmap, x, w, None, relu);
            }
            let full = self.kernel_map_keeping(x.coord_set(), spec, keep)?;
            let y = self.conv_fused(&full, x, w, None, relu)?;
            // The surviving sites are a subsequence of the full map's (both ascending).
            let (all, kept) = (full.out_coords().coords(), pmap.out_coords().coords());
            let mut sel = Vec::with_capacity(kept.len());
            let mut j = 0;
            for (i, c) in all.iter().enumerate() {
                if j < kept.len() && *c == kept[j] {
                    sel.push(i);
                    j += 1;
                }
            }
            let yf = y.try_feats()?;
            let c = w.cout;
            let f: Vec<f32> = sel.iter().flat_map(|&i| yf[i * c..(i + 1) * c].iter().copied()).collect();
            return SparseTensor::new(pmap.out_coords().clone(), f, c);
        }
        let fill = fill.resolve(w.cin, w.cout);
        let map = self.kernel_map_keeping(x.coord_set(), spec, keep)?;
        let c = w.cout;
        // The fast path runs only the kept rows' pairs; the reference runs them all. Either way
        // the pruned rows are then overwritten.
        let t0 = std::time::Instant::now();
        let mut kept = vec![false; map.n_out()];
        for &r in rows {
            *kept
                .get_mut(r as usize)
                .ok_or_else(|| Error::invalid("voxel pruning", format!("kept row {r} is out of range")))? = true;
        }
        let kernel_skips = match &self.device {
            // Dense weights (f32 or bf16): the kernel skips the pruned rows and writes their
            // fill itself.
            Device::Cpu => w.sparse().is_none(),
            // The kept rows' table (sparse formats run dense on the GPU); work over one
            // binding takes the host-side route below.
            Device::Gpu(g) => Self::gpu_fits(g, &map, w.cin, w.cout) && map.n_out() > 0 && w.cout > 0,
        };
        if !reference && kernel_skips {
            self.add_prune_seconds(t0.elapsed().as_secs_f64());
            let y = self.conv_fused_ex(&map, x, w, residual, relu, Some((&kept, fill)))?;
            self.note_computed_rows(rows);
            return Ok(y);
        }
        // Elsewhere (sparse formats, the reference): a map restricted to the kept rows
        // (or the full map), then the pruned rows overwritten.
        let sub = if reference { None } else { Some(map.for_outputs(&kept)?) };
        self.add_prune_seconds(t0.elapsed().as_secs_f64());
        let y = self.conv_fused(sub.as_ref().unwrap_or(&*map), x, w, residual, relu)?;
        self.note_computed_rows(rows);
        let t1 = std::time::Instant::now();
        let mut y = y.into_feats();
        let xf = x.try_feats()?;
        let rf = residual.map(|r| r.try_feats()).transpose()?;
        use crate::voxel_prune::Fill;
        use rayon::prelude::*;
        const ROWS: usize = 1024;
        y.par_chunks_mut(ROWS * c).enumerate().for_each(|(ci, chunk)| {
            for (i, o) in chunk.chunks_mut(c).enumerate() {
                let q = ci * ROWS + i;
                if kept[q] {
                    continue;
                }
                // A pruned row holds the input, the activated residual, or zero.
                match (fill, rf) {
                    (Fill::Input, _) => o.copy_from_slice(&xf[q * c..(q + 1) * c]),
                    (Fill::Zero, Some(r)) => {
                        for (o, &v) in o.iter_mut().zip(&r[q * c..(q + 1) * c]) {
                            *o = if relu { v.max(0.0) } else { v };
                        }
                    }
                    (Fill::Zero, None) => o.fill(0.0),
                }
            }
        });
        self.add_prune_seconds(t1.elapsed().as_secs_f64());
        SparseTensor::new(map.out_coords().clone(), y, c)
    }

    /// Per-voxel importance of `x` for voxel pruning ([`crate::voxel_prune::importance`]). On
    /// the GPU, features that live there are summed there and only the row sums come back
    /// (L1 sums carry the CPU's bits; L2 sums may differ in the last bit).
    pub fn voxel_scores(&self, x: &SparseTensor, score: crate::voxel_prune::Score) -> Result<Vec<f32>> {
        use crate::voxel_prune::{importance, score_of_sum, Score};
        let t0 = std::time::Instant::now();
        let c = x.channels();
        let scores = match &self.device {
            Device::Gpu(g) if c > 0 && crate::gpu::DeviceFeats::of(x, g).is_some() => {
                let buf = crate::gpu::DeviceFeats::buffer_of(x, g, "x")?;
                let sums = crate::gpu::elementwise::row_sums(g, &buf, c, score == Score::L2)?;
                let mut v = g.read(&sums)?;
                v.truncate(x.len());
                v.into_iter().map(|s| score_of_sum(s, c, score)).collect()
            }
            _ => importance(x.try_feats()?, c, score),
        };
        self.add_prune_seconds(t0.elapsed().as_secs_f64());
        Ok(scores)
    }

    /// Record in the trace (when on) that its last conv computed only `rows`.
    fn note_computed_rows(&self, rows: &[u32]) {
        if let Some(last) = self.trace.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|t| t.last_mut()) {
            last.computed_rows = Some(rows.into());
        }
    }

    /// The downsampling map of `spec` on `input` with only the output sites that an important
    /// input row (`rows`) falls into; every input's pairs into those sites stay. Cached under
    /// its output set, so the transposed conv back onto `input` runs on its transpose.
    pub fn pruned_down_map(
        &self,
        input: &Arc<CoordSet>,
        spec: KernelSpec,
        keep: Option<&[bool]>,
        rows: &[u32],
    ) -> Result<Arc<KernelMap>> {
        let full = self.kernel_map_keeping(input, spec, keep)?;
        // A GPU-built map comes to the host here, where a lost device is an error.
        full.fetch()?;
        let t0 = std::time::Instant::now();
        let mut important = vec![false; full.n_in()];
        for &r in rows {
            *important
                .get_mut(r as usize)
                .ok_or_else(|| Error::invalid("voxel pruning", format!("row {r} is out of range")))? = true;
        }
        let mut alive = vec![false; full.n_out()];
        for k in 0..full.volume() {
            let (ins, outs) = full.pairs(k);
            for (&i, &o) in ins.iter().zip(outs) {
                if important[i as usize] {
                    alive[o as usize] = true;
                }
            }
        }
        let sites: Vec<u32> = (0..full.n_out() as u32).filter(|&o| alive[o as usize]).collect();
        let oc = full.out_coords();
        let out =
            Arc::new(CoordSet::new_unchecked(sites.iter().map(|&o| oc.coords()[o as usize]).collect(), oc.stride()));
        let m = Arc::new(full.restrict_outputs(&sites, out.clone())?);
        self.add_prune_seconds(t0.elapsed().as_secs_f64());
        let keep = keep.and_then(KernelMap::kept_mask);
        let key = MapKey { input: input.id(), target: out.id(), kind: MapKind::Down, spec, keep };
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).insert(key, m.clone());
        Ok(m)
    }

    /// Transposed conv back onto `target` (the coordinates `x` was downsampled from).
    pub fn conv_transposed(
        &self,
        x: &SparseTensor,
        target: &Arc<CoordSet>,
        w: &ConvWeight,
        spec: KernelSpec,
    ) -> Result<SparseTensor> {
        let map = self.transposed_map(x.coord_set(), target, spec)?;
        self.conv_with_map(&map, x, w)
    }
}

/// The same coordinate set: the same `Arc`, or equal stride and rows.
fn same_coords(a: &Arc<CoordSet>, b: &Arc<CoordSet>) -> bool {
    Arc::ptr_eq(a, b) || (a.stride() == b.stride() && a.coords() == b.coords())
}

fn same_rows(op: &'static str, a: &SparseTensor, b: &SparseTensor) -> Result<()> {
    if !same_coords(a.coord_set(), b.coord_set()) {
        return Err(Error::invalid(
            op,
            format!("tensors on different coordinates ({} vs {} voxels)", a.len(), b.len()),
        ));
    }
    Ok(())
}
