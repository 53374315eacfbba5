//! The wgpu backend: one [`GpuContext`] (adapter, device, queue, pipeline cache) built once,
//! stateless host functions per kernel family (`kmap`, `conv`) that only write, dispatch, copy
//! and map. Runs on Vulkan, Metal and DX12 with no CUDA toolkit; Mesa's lavapipe gives a CPU
//! Vulkan adapter where no GPU exists (CI).

pub mod conv;
pub mod elementwise;
pub mod kmap;
pub mod shaders;
pub mod sort;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use shaders::PipelineKey;

/// Environment variable that picks the adapter: a case-insensitive part of its name.
pub const ADAPTER_ENV: &str = "SPARSECONV_ADAPTER";

/// Largest workgroup count per dispatch dimension that every adapter supports.
const MAX_GROUPS: u32 = 65_535;

/// Adapter, device, queue and compiled pipelines; build once and share.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    binding_limit: u64,
    pipelines: Mutex<HashMap<PipelineKey, (wgpu::ComputePipeline, wgpu::BindGroupLayout)>>,
    pool: Arc<Pool>,
    uniforms: Mutex<UniformRing>,
    // Bound where a kernel's optional operand is absent (never read).
    placeholder: wgpu::Buffer,
    // Finished command buffers not yet handed to the queue (see [`SUBMIT_BATCH`]).
    pending: Mutex<Vec<wgpu::CommandBuffer>>,
    // Work recorded and submitted since the context was built (see [`GpuContext::counters`]).
    dispatches: std::sync::atomic::AtomicU64,
    submits: std::sync::atomic::AtomicU64,
    // Distinguishes contexts: a buffer works only with the context that made it.
    id: u64,
}

static NEXT_CONTEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Free device buffers by size: scratch buffers return here when their [`GpuBuffer`] drops,
/// so a chain of layers reuses memory instead of allocating (and wgpu zero-filling) each time.
type Pool = Mutex<HashMap<u64, Vec<wgpu::Buffer>>>;

/// Buffers kept per size class.
const POOL_DEPTH: usize = 8;

/// Kernel parameters live in a ring of small uniform buffers written with
/// `Queue::write_buffer` (applied at the next submit, ordered after earlier submissions), not
/// in a new buffer per dispatch: creating a mapped buffer per dispatch was most of the host
/// cost of a kernel-map build (~60 dispatches). A slot is rewritten only after `UNIFORM_SLOTS`
/// further parameter blocks, far more than one encoder ever records before its submit.
const UNIFORM_SLOTS: usize = 4096;

/// Bytes per uniform slot (every parameter struct is smaller).
const UNIFORM_BYTES: u64 = 256;

/// Command buffers handed to the queue in one submit: each `Queue::submit` costs host time
/// (validation, fences, resource triage), and a forward pass finishes about a hundred
/// encoders. Reads and [`GpuContext::sync`] flush what is pending first, so results are
/// never stale; the device only starts later by the few encoders still held back.
const SUBMIT_BATCH: usize = 8;

#[derive(Default)]
struct UniformRing {
    slots: Vec<wgpu::Buffer>,
    next: usize,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.describe())
    }
}

fn no_adapter(detail: &str) -> Error {
    Error::NoGpu(format!(
        "{detail}. sparseconv needs a Vulkan, Metal or DX12 adapter; on Linux without a GPU, Mesa's \
         software Vulkan driver works (`apt-get install mesa-vulkan-drivers`, lavapipe)"
    ))
}

impl GpuContext {
    /// Pick an adapter (`SPARSECONV_ADAPTER` = part of its name, else the first discrete GPU,
    /// then integrated, then virtual, then CPU) and open a device with its full limits.
    pub fn new() -> Result<Self> {
        Self::with_adapter(std::env::var(ADAPTER_ENV).ok().as_deref())
    }

    /// Like [`GpuContext::new`] with an explicit adapter name filter.
    pub fn with_adapter(name: Option<&str>) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        let rank = |t: wgpu::DeviceType| match t {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let mut candidates: Vec<wgpu::Adapter> = match name {
            Some(n) => {
                let n = n.to_lowercase();
                adapters.into_iter().filter(|a| a.get_info().name.to_lowercase().contains(&n)).collect()
            }
            None => adapters,
        };
        candidates.sort_by_key(|a| rank(a.get_info().device_type));
        let adapter = match (candidates.into_iter().next(), name) {
            (Some(a), _) => a,
            (None, Some(n)) => {
                return Err(no_adapter(&format!(
                    "no GPU adapter matches {ADAPTER_ENV}=`{n}` (found: {})",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )))
            }
            (None, None) => return Err(no_adapter("no GPU adapter found")),
        };
        let info = adapter.get_info();
        let limits = adapter.limits();

        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sparseconv"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| no_adapter(&format!("adapter `{}` refused a device: {e}", info.name)))?;
        let binding_limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            device,
            queue,
            info,
            limits,
            binding_limit,
            pipelines: Mutex::new(HashMap::new()),
            pool: Arc::new(Mutex::new(HashMap::new())),
            uniforms: Mutex::new(UniformRing::default()),
            placeholder,
            pending: Mutex::new(Vec::new()),
            dispatches: 0.into(),
            submits: 0.into(),
            id: NEXT_CONTEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Adapter name, type and backend.
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.device_type, self.info.backend)
    }

    /// The adapter's limits (the device was opened with all of them).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// This context's identity (see [`GpuBuffer::context_id`]).
    pub fn context_id(&self) -> u64 {
        self.id
    }

    /// Largest storage binding in bytes; work that needs more is split.
    pub fn binding_limit(&self) -> u64 {
        self.binding_limit
    }

    /// Pretend the adapter binds at most `bytes` per storage buffer (never more than it really
    /// does), so tests can exercise the splitting of large inputs on any adapter.
    pub fn with_binding_limit(mut self, bytes: u64) -> Self {
        self.binding_limit = self.binding_limit.min(bytes.max(256));
        self
    }

    /// The pipeline of `key`, compiled on first use.
    fn pipeline(&self, key: PipelineKey) -> (wgpu::ComputePipeline, wgpu::BindGroupLayout) {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key.shader.name()),
                    source: wgpu::ShaderSource::Wgsl(key.shader.source_variant(key.variant)),
                });
                let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.entry),
                    layout: None,
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let layout = pipeline.get_bind_group_layout(0);
                (pipeline, layout)
            })
            .clone()
    }

    /// Dispatches recorded and command buffers submitted so far (host-side work per scan).
    pub fn counters(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.dispatches.load(Relaxed), self.submits.load(Relaxed))
    }

    /// A storage buffer holding `data`.
    fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check_binding(label, bytes.len() as u64)?;
        // Zero-sized bindings are invalid: keep at least one element.
        let contents: &[u8] = if bytes.is_empty() { &[0u8; 16] } else { bytes };
        Ok(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        }))
    }

    /// A tiny storage buffer to bind where a kernel's optional operand is absent.
    fn placeholder(&self) -> &wgpu::Buffer {
        &self.placeholder
    }

    /// A zeroed storage buffer of `bytes` bytes.
    fn zeroed(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_binding(label, bytes)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer holding `value`, from the ring (see [`UNIFORM_SLOTS`]).
    fn uniform<T: bytemuck::Pod>(&self, value: &T) -> wgpu::Buffer {
        let bytes = bytemuck::bytes_of(value);
        assert!(bytes.len() as u64 <= UNIFORM_BYTES, "kernel parameters exceed a uniform slot");
        let slot = {
            let mut ring = self.uniforms.lock().unwrap_or_else(|e| e.into_inner());
            let i = ring.next;
            ring.next = (i + 1) % UNIFORM_SLOTS;
            if i == ring.slots.len() {
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: UNIFORM_BYTES,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                ring.slots.push(b);
            }
            ring.slots[i].clone()
        };
        self.queue.write_buffer(&slot, 0, bytes);
        slot
    }

    fn check_binding(&self, label: &str, bytes: u64) -> Result<()> {
        let max = self.binding_limit;
        if bytes > max {
            return Err(Error::invalid(
                "gpu",
                format!("buffer `{label}` needs {bytes} bytes, over the adapter's binding limit of {max}"),
            ));
        }
        Ok(())
    }

    /// Record one dispatch of `key` over `groups` workgroups (x may exceed the per-dimension
    /// limit: it is folded into y) with `buffers` bound in order at bindings 0, 1, ….
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        key: PipelineKey,
        bindings: &[(u32, &wgpu::Buffer)],
        groups: (u32, u32, u32),
    ) {
        let (pipeline, layout) = self.pipeline(key);
        self.dispatches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .iter()
            .map(|&(b, buf)| wgpu::BindGroupEntry { binding: b, resource: buf.as_entire_binding() })
            .collect();
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        let mut pass =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(key.entry), timestamp_writes: None });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// A command encoder to record kernels into (then [`GpuContext::submit`]).
    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }
}

/// A typed storage buffer resident on the device: the input and output of the `*_on_device`
/// kernel entry points, so a chain of kernels moves no data through the host.
pub struct GpuBuffer<T> {
    buf: wgpu::Buffer,
    len: usize,
    // The context (device) the buffer belongs to.
    ctx: u64,
    // Where the buffer goes back on drop (scratch buffers only).
    pool: Option<Weak<Pool>>,
    _t: PhantomData<T>,
}

impl<T> Drop for GpuBuffer<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take().and_then(|w| w.upgrade()) {
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            let free = pool.entry(self.buf.size()).or_default();
            if free.len() < POOL_DEPTH {
                free.push(self.buf.clone());
            }
        }
    }
}

impl<T> std::fmt::Debug for GpuBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

impl<T: bytemuck::Pod> GpuBuffer<T> {
    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Identity of the context that made the buffer.
    pub fn context_id(&self) -> u64 {
        self.ctx
    }

    /// The wgpu buffer, to bind or copy.
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buf
    }

    pub(crate) fn wrap(ctx: &GpuContext, buf: wgpu::Buffer, len: usize) -> Self {
        Self { buf, len, ctx: ctx.id, pool: None, _t: PhantomData }
    }

    /// Another handle on the same storage that never returns it to the pool (the original
    /// keeps that role). Crate-internal: wgpu keeps the storage alive while any handle lives,
    /// but once the original goes back to the pool another buffer may be written into it, so
    /// only code that drops the copy first may hold one.
    pub(crate) fn clone_ref(&self) -> Self {
        Self { buf: self.buf.clone(), len: self.len, ctx: self.ctx, pool: None, _t: PhantomData }
    }

    /// The same storage seen as `len` values of `U` (the buffer moves, pool membership too).
    /// Refused (`None`) when `len` values of `U` do not fit in the buffer.
    pub fn cast<U: bytemuck::Pod>(self, len: usize) -> Option<GpuBuffer<U>> {
        if len.checked_mul(std::mem::size_of::<U>()).is_none_or(|b| b as u64 > self.buf.size()) {
            return None;
        }
        Some(self.view(len))
    }

    /// [`GpuBuffer::cast`] for lengths the crate derived from the buffer's own (a prefix of
    /// it): a longer one is a bug here, so it panics rather than returning.
    pub(crate) fn view<U: bytemuck::Pod>(mut self, len: usize) -> GpuBuffer<U> {
        assert!((len * std::mem::size_of::<U>()) as u64 <= self.buf.size(), "GPU buffer view beyond its storage");
        GpuBuffer { buf: self.buf.clone(), len, ctx: self.ctx, pool: self.pool.take(), _t: PhantomData }
    }
}

impl GpuContext {
    /// Copy `data` to the device.
    pub fn to_device<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<GpuBuffer<T>> {
        Ok(GpuBuffer::wrap(self, self.upload(label, data)?, data.len()))
    }

    /// A device buffer for `len` values whose contents are unspecified, from the pool when one
    /// of its size class is free. Size classes are powers of two (up to the binding limit).
    pub fn scratch<T: bytemuck::Pod>(&self, label: &str, len: usize) -> Result<GpuBuffer<T>> {
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        self.check_binding(label, bytes)?;
        let class = bytes.max(256).next_power_of_two();
        let class = if class > self.binding_limit { bytes.max(256).next_multiple_of(256) } else { class };
        let reused = self.pool.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&class).and_then(Vec::pop);
        let buf = match reused {
            Some(b) => b,
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: class,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        Ok(GpuBuffer { buf, len, ctx: self.id, pool: Some(Arc::downgrade(&self.pool)), _t: PhantomData })
    }

    /// An error unless every buffer was made by this context (wgpu would panic on a buffer of
    /// another device).
    pub fn check_owns<T>(&self, what: &str, bufs: &[&GpuBuffer<T>]) -> Result<()> {
        if bufs.iter().any(|b| b.ctx != self.id) {
            return Err(Error::invalid("gpu", format!("{what}: a buffer of another GPU context was passed")));
        }
        Ok(())
    }

    /// Copy a device buffer back (waits for every submitted kernel).
    pub fn read<T: bytemuck::Pod>(&self, b: &GpuBuffer<T>) -> Result<Vec<T>> {
        Ok(self.read_all(&[b])?.pop().unwrap_or_default())
    }

    /// Copy several device buffers back with one wait.
    pub fn read_all<T: bytemuck::Pod>(&self, bufs: &[&GpuBuffer<T>]) -> Result<Vec<Vec<T>>> {
        self.check_owns("read", bufs)?;
        let size = std::mem::size_of::<T>() as u64;
        // Copies start at multiples of 4 bytes.
        let lens: Vec<u64> = bufs.iter().map(|b| (b.len() as u64 * size).next_multiple_of(4)).collect();
        let total: u64 = lens.iter().sum::<u64>().max(16);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.encoder();
        let mut at = 0;
        for (b, &len) in bufs.iter().zip(&lens) {
            if len > 0 {
                enc.copy_buffer_to_buffer(b.raw(), 0, &staging, at, len);
            }
            at += len;
        }
        self.submit(enc);
        self.flush();
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.sync()?;
        rx.recv()
            .map_err(|_| Error::invalid("gpu", "readback never completed"))?
            .map_err(|e| Error::invalid("gpu", format!("readback failed: {e}")))?;
        let data = slice.get_mapped_range().map_err(|e| Error::invalid("gpu", format!("readback failed: {e}")))?;
        let mut out = Vec::with_capacity(bufs.len());
        let mut at = 0usize;
        for (b, &len) in bufs.iter().zip(&lens) {
            let bytes = b.len() * size as usize;
            out.push(bytemuck::pod_collect_to_vec::<u8, T>(&data[at..at + bytes]));
            at += len as usize;
        }
        drop(data);
        staging.unmap();
        Ok(out)
    }

    /// Wait until the device has finished all submitted work.
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::invalid("gpu", format!("waiting for the device failed: {e}")))
    }

    /// Queue recorded work without waiting (handed to the device in batches of
    /// [`SUBMIT_BATCH`] encoders, and at every read or sync).
    pub fn submit(&self, enc: wgpu::CommandEncoder) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.push(enc.finish());
        if pending.len() >= SUBMIT_BATCH {
            self.submit_all(&mut pending);
        }
    }

    /// Hand every pending encoder to the device now.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            self.submit_all(&mut pending);
        }
    }

    fn submit_all(&self, pending: &mut Vec<wgpu::CommandBuffer>) {
        self.submits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue.submit(pending.drain(..));
    }
}

/// Sparse-tensor features held in a GPU buffer (see [`crate::tensor::DeviceFeatures`]).
#[derive(Debug)]
pub struct DeviceFeats {
    buf: GpuBuffer<f32>,
    ctx: std::sync::Arc<GpuContext>,
}

impl DeviceFeats {
    /// Features `buf` on `ctx`'s device.
    pub fn new(buf: GpuBuffer<f32>, ctx: std::sync::Arc<GpuContext>) -> Self {
        Self { buf, ctx }
    }

    /// The device buffer `[N, C]`.
    pub fn buffer(&self) -> &GpuBuffer<f32> {
        &self.buf
    }

    /// The GPU storage of `t`'s features on `ctx`, if that is where they are.
    pub fn of<'a>(t: &'a crate::tensor::SparseTensor, ctx: &std::sync::Arc<GpuContext>) -> Option<&'a DeviceFeats> {
        t.device_feats()
            .and_then(|d| d.as_any().downcast_ref::<DeviceFeats>())
            .filter(|d| std::sync::Arc::ptr_eq(&d.ctx, ctx))
    }

    /// `t`'s features on `ctx`'s device: a handle on its buffer when they are there already
    /// (valid while `t` lives), else an upload of its host features.
    pub fn buffer_of(
        t: &crate::tensor::SparseTensor,
        ctx: &std::sync::Arc<GpuContext>,
        label: &str,
    ) -> Result<GpuBuffer<f32>> {
        match Self::of(t, ctx) {
            Some(d) => Ok(d.buf.clone_ref()),
            None => ctx.to_device(label, t.feats()),
        }
    }
}

impl crate::tensor::DeviceFeatures for DeviceFeats {
    fn len(&self) -> usize {
        self.buf.len()
    }

    fn to_host(&self) -> Result<Vec<f32>> {
        self.ctx.read(&self.buf)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Workgroup grid for `n` workgroups: x up to the per-dimension limit, the rest in y.
fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n.max(1), 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}
