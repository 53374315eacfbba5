// From a neighbour table `nbr[row * K + k]` (input row or -1) on the device to what the rest
// needs, without a round trip through the host:
// - the map's pairs in the crate's layout (offset-major, output rows ascending): `pair_flags`
//   marks present entries column by column, the host scans the flags (`scan.wgsl`),
//   `pair_compact` writes each pair at its scanned position and `column_starts` each offset's
//   first pair;
// - the transposed table of a (sorted) table, for the transposed conv: `fill_empty`, then
//   `transpose_scatter` (each (output, offset) entry names one input, and each input appears
//   at most once per offset, so every write has its own slot);
// - `drop_offsets`: entries of offsets no conv on the map uses (offset-pruned networks) become
//   -1 in place, so neither the pairs nor the conv see them;
// - the table with rows sorted by neighbour bitmask for the output-stationary conv:
//   `row_masks` writes each row's mask as a sort key, the host radix-sorts
//   (`radix_sort.wgsl`), `permute_rows` gathers the rows in that order.

struct Params {
    n: u32,
    volume: u32,
    // Threads per row of the 2D dispatch grid.
    row_threads: u32,
    // `transpose_scatter`: rows of the transposed table.
    n_t: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> nbr: array<i32>;
@group(0) @binding(2) var<storage, read_write> mask_hi: array<u32>;
@group(0) @binding(3) var<storage, read_write> mask_lo: array<u32>;
@group(0) @binding(4) var<storage, read_write> rows: array<u32>;
@group(0) @binding(5) var<storage, read> order: array<u32>;
@group(0) @binding(6) var<storage, read_write> sorted_nbr: array<i32>;
@group(0) @binding(7) var<storage, read_write> flags: array<u32>;
@group(0) @binding(8) var<storage, read> pos: array<u32>;
@group(0) @binding(9) var<storage, read_write> in_idx: array<u32>;
@group(0) @binding(10) var<storage, read_write> out_idx: array<u32>;
@group(0) @binding(11) var<storage, read_write> starts: array<u32>;
@group(0) @binding(12) var<storage, read> keep: array<u32>;

fn thread_index(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * params.row_threads;
}

// Entry t of the column-major view [K, n]: (offset t / n, row t % n).
fn entry(t: u32) -> i32 {
    return nbr[(t % params.n) * params.volume + t / params.n];
}

@compute @workgroup_size(256)
fn row_masks(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = thread_index(gid);
    if (r >= params.n) {
        return;
    }
    var hi = 0u;
    var lo = 0u;
    for (var k = 0u; k < params.volume; k++) {
        if (nbr[r * params.volume + k] >= 0) {
            // Offsets past 64 share bits: that only loosens the grouping.
            let b = k % 64u;
            if (b < 32u) {
                lo |= 1u << b;
            } else {
                hi |= 1u << (b - 32u);
            }
        }
    }
    mask_hi[r] = hi;
    mask_lo[r] = lo;
    rows[r] = r;
}

@compute @workgroup_size(256)
fn permute_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t >= params.n * params.volume) {
        return;
    }
    let r = order[t / params.volume];
    sorted_nbr[t] = nbr[r * params.volume + t % params.volume];
}

@compute @workgroup_size(256)
fn pair_flags(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t < params.n * params.volume) {
        flags[t] = u32(entry(t) >= 0);
    }
}

@compute @workgroup_size(256)
fn pair_compact(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t >= params.n * params.volume) {
        return;
    }
    let i = entry(t);
    if (i >= 0) {
        in_idx[pos[t]] = u32(i);
        out_idx[pos[t]] = t % params.n;
    }
}

// Thread k <= K: the first pair of offset k (k = K: the pair count).
@compute @workgroup_size(64)
fn column_starts(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if (k > params.volume) {
        return;
    }
    let total = params.n * params.volume;
    if (k < params.volume) {
        starts[k] = pos[k * params.n];
    } else if (total == 0u) {
        starts[k] = 0u;
    } else {
        starts[k] = pos[total - 1u] + u32(entry(total - 1u) >= 0);
    }
}

@compute @workgroup_size(256)
fn fill_empty(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t < params.n_t * params.volume) {
        sorted_nbr[t] = -1;
    }
}

// Thread per entry of the sorted table `nbr` (rows `order`): input i of output o at offset k
// becomes output i's entry naming input o.
@compute @workgroup_size(256)
fn transpose_scatter(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t >= params.n * params.volume) {
        return;
    }
    let i = nbr[t];
    if (i >= 0) {
        sorted_nbr[u32(i) * params.volume + t % params.volume] = i32(order[t / params.volume]);
    }
}

@compute @workgroup_size(256)
fn drop_offsets(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = thread_index(gid);
    if (t >= params.n * params.volume) {
        return;
    }
    if (keep[t % params.volume] == 0u) {
        sorted_nbr[t] = -1;
    }
}
