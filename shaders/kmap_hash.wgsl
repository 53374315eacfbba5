// Kernel maps by coordinate hashing on the GPU.
//
// `insert`: one thread per input voxel claims a slot of an open-addressing table (linear
// probing) with compare-and-swap; a slot holds `row + 1`, 0 is empty. Coordinates are unique,
// so a taken slot always means "probe on".
// `query`: one thread per (output row, kernel offset) looks up `output + delta[k]`, comparing
// the full coordinates of the candidate row (no silent hash collisions), and writes the input
// row or -1 into the neighbour table `nbr[out * K + k]`. The table's layout depends on the
// insertion race, the answers do not: results are identical run to run.

struct Params {
    n_in: u32,
    n_out: u32,
    volume: u32,
    mask: u32,
    // Threads per row of the 2D dispatch grid (workgroups in x times 256).
    row_threads: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> in_coords: array<vec4<i32>>;
@group(0) @binding(2) var<storage, read_write> table: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read> out_coords: array<vec4<i32>>;
@group(0) @binding(4) var<storage, read> deltas: array<vec4<i32>>;
@group(0) @binding(5) var<storage, read_write> nbr: array<i32>;

fn hash(c: vec4<i32>) -> u32 {
    var h = bitcast<u32>(c.x) * 0x9E3779B1u;
    h = (h ^ (h >> 16u)) + bitcast<u32>(c.y) * 0x85EBCA77u;
    h = (h ^ (h >> 13u)) + bitcast<u32>(c.z) * 0xC2B2AE3Du;
    h = (h ^ (h >> 16u)) + bitcast<u32>(c.w) * 0x27D4EB2Fu;
    h = h ^ (h >> 15u);
    h = h * 0x2C1B3C6Du;
    return h ^ (h >> 12u);
}

@compute @workgroup_size(256)
fn insert(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params.row_threads;
    if (i >= params.n_in) {
        return;
    }
    var slot = hash(in_coords[i]) & params.mask;
    loop {
        let r = atomicCompareExchangeWeak(&table[slot], 0u, i + 1u);
        if (r.exchanged) {
            return;
        }
        // A weak exchange may fail spuriously on an empty slot: try the same slot again.
        if (r.old_value != 0u) {
            slot = (slot + 1u) & params.mask;
        }
    }
}

@compute @workgroup_size(256)
fn query(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * params.row_threads;
    if (t >= params.n_out * params.volume) {
        return;
    }
    let o = t / params.volume;
    let k = t % params.volume;
    let c = out_coords[o] + deltas[k];
    var slot = hash(c) & params.mask;
    loop {
        let v = atomicLoad(&table[slot]);
        if (v == 0u) {
            nbr[t] = -1;
            return;
        }
        if (all(in_coords[v - 1u] == c)) {
            nbr[t] = i32(v - 1u);
            return;
        }
        slot = (slot + 1u) & params.mask;
    }
}
