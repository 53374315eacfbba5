// Kernel maps by sorting (PointAcc, Lin et al., MICRO 2021) on the GPU. Coordinates become the
// crate's packed 64-bit keys held as u32 pairs (batch 7 bits | x 19 | y 19 | z 19, axes biased
// by 2^18; `hi` holds bits 32..63). The host sorts them with `radix_sort.wgsl`; shifting a key
// by a kernel offset is one 64-bit add (with carry across the pair), and each (output,
// offset) finds its input by binary search in the sorted keys. Downsampled outputs are the
// unique parent keys: flag the first of each run of equal sorted keys, scan the flags
// (`scan.wgsl`), compact.

struct Params {
    n: u32,
    n_out: u32,
    volume: u32,
    // Grid stride of parents (`keys` with stride > 1 packs floor(c / s) * s per axis).
    stride: i32,
    // Threads per row of the 2D dispatch grid (workgroups in x times 256).
    row_threads: u32,
    // First query row of this slice (`query` is dispatched in slices of output rows).
    row0: u32,
    _pad1: u32,
    _pad2: u32,
}

const BIAS: i32 = 262144; // 2^18

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> coords: array<vec4<i32>>;
@group(0) @binding(2) var<storage, read_write> hi_a: array<u32>;
@group(0) @binding(3) var<storage, read_write> lo_a: array<u32>;
@group(0) @binding(4) var<storage, read_write> val_a: array<u32>;
@group(0) @binding(5) var<storage, read> s_hi: array<u32>;
@group(0) @binding(6) var<storage, read> s_lo: array<u32>;
@group(0) @binding(7) var<storage, read> s_val: array<u32>;
@group(0) @binding(8) var<storage, read> deltas: array<vec2<u32>>; // (hi, lo) two's complement
@group(0) @binding(9) var<storage, read_write> nbr: array<i32>;
@group(0) @binding(10) var<storage, read_write> flags: array<u32>;
@group(0) @binding(11) var<storage, read_write> count: array<u32>;

fn thread_index(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * params.row_threads;
}

fn floor_to(c: i32, s: i32) -> i32 {
    var q = c / s;
    if (c % s != 0 && c < 0) {
        q -= 1;
    }
    return q * s;
}

// Packed key of row `i` (of its parent cell when stride > 1), with the row as value.
@compute @workgroup_size(256)
fn keys(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = thread_index(gid);
    if (i >= params.n) {
        return;
    }
    var c = coords[i];
    if (params.stride > 1) {
        c = vec4<i32>(c.x, floor_to(c.y, params.stride), floor_to(c.z, params.stride), floor_to(c.w, params.stride));
    }
    let x = u32(c.y + BIAS);
    let y = u32(c.z + BIAS);
    let z = u32(c.w + BIAS);
    hi_a[i] = (u32(c.x) << 25u) | (x << 6u) | (y >> 13u);
    lo_a[i] = (y << 19u) | z;
    val_a[i] = i;
}

fn less(ah: u32, al: u32, bh: u32, bl: u32) -> bool {
    return ah < bh || (ah == bh && al < bl);
}

// Thread (o, k): the input row whose key is query key `o` (in hi_a / lo_a) plus offset `k`.
@compute @workgroup_size(256)
fn query(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t >= params.n_out * params.volume) {
        return;
    }
    let o = params.row0 + t / params.volume;
    let k = t % params.volume;
    let d = deltas[k];
    let lo = lo_a[o] + d.y;
    let hi = hi_a[o] + d.x + u32(lo < d.y);
    var a = 0u;
    var b = params.n;
    while (a < b) {
        let m = (a + b) / 2u;
        if (less(s_hi[m], s_lo[m], hi, lo)) {
            a = m + 1u;
        } else {
            b = m;
        }
    }
    var row = -1;
    if (a < params.n && s_hi[a] == hi && s_lo[a] == lo) {
        row = i32(s_val[a]);
    }
    nbr[t] = row;
}

fn first_of_run(i: u32) -> bool {
    return i == 0u || s_hi[i] != s_hi[i - 1u] || s_lo[i] != s_lo[i - 1u];
}

@compute @workgroup_size(256)
fn unique_flags(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = thread_index(gid);
    if (i < params.n) {
        flags[i] = u32(first_of_run(i));
    }
}

// After the exclusive scan of the flags: each run's first key goes to its slot.
@compute @workgroup_size(256)
fn compact(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = thread_index(gid);
    if (i >= params.n) {
        return;
    }
    let first = first_of_run(i);
    if (first) {
        hi_a[flags[i]] = s_hi[i];
        lo_a[flags[i]] = s_lo[i];
    }
    if (i == params.n - 1u) {
        count[0] = flags[i] + u32(first);
    }
}
