// Row-wise helpers that keep features on the GPU between convs.
// `concat`: y[r] = [a[r] | b[r]] (channel concat of two tensors on the same rows).
// `pack_half`: f32 values to f16 pairs packed in u32 words (the conv's half-precision storage).
// `row_sums`: a voxel-pruned conv's importance sums, one per row of `a` (`[n, ca]`).
// `fill_rows`: the rows a voxel-pruned conv does not compute get zero, `a`'s row, or its ReLU.

struct Params {
    n: u32,
    ca: u32,
    cb: u32,
    // Threads per row of the 2D dispatch grid.
    row_threads: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> packed: array<u32>;
@group(0) @binding(5) var<storage, read> row_list: array<u32>;

// Thread per output value of the `[n, ca + cb]` result.
@compute @workgroup_size(256)
fn concat(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * params.row_threads;
    let c = params.ca + params.cb;
    if (t >= params.n * c) {
        return;
    }
    let r = t / c;
    let j = t % c;
    if (j < params.ca) {
        y[t] = a[r * params.ca + j];
    } else {
        y[t] = b[r * params.cb + j - params.ca];
    }
}

// Thread per packed word: values 2t and 2t + 1 of `a` (n values; an odd tail pads with 0).
@compute @workgroup_size(256)
fn pack_half(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * params.row_threads;
    if (2u * t >= params.n) {
        return;
    }
    var hi = 0.0;
    if (2u * t + 1u < params.n) {
        hi = a[2u * t + 1u];
    }
    packed[t] = pack2x16float(vec2<f32>(a[2u * t], hi));
}

// Thread per row: sum |v| (cb = 0) or v * v (cb = 1) over the row's ca channels in the CPU's
// order (`voxel_prune::importance`: eight lane sums, channel j into lane j % 8, then the lanes
// in order), so L1 sums carry the CPU's bits; the host divides or takes the root.
@compute @workgroup_size(256)
fn row_sums(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * params.row_threads;
    if (r >= params.n) {
        return;
    }
    var lanes: array<f32, 8>;
    for (var l = 0u; l < 8u; l++) {
        lanes[l] = 0.0;
    }
    for (var j = 0u; j < params.ca; j++) {
        let v = a[r * params.ca + j];
        if (params.cb == 0u) {
            lanes[j % 8u] += abs(v);
        } else {
            lanes[j % 8u] += v * v;
        }
    }
    var s = 0.0;
    for (var l = 0u; l < 8u; l++) {
        s += lanes[l];
    }
    y[r] = s;
}

// Thread per value of the n listed rows (`row_list`), each ca wide: cb = 0 writes zero,
// 1 copies `a`'s row, 2 copies its ReLU.
@compute @workgroup_size(256)
fn fill_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x + gid.y * params.row_threads;
    if (t >= params.n * params.ca) {
        return;
    }
    let i = row_list[t / params.ca] * params.ca + t % params.ca;
    if (params.cb == 0u) {
        y[i] = 0.0;
    } else if (params.cb == 1u) {
        y[i] = a[i];
    } else {
        y[i] = max(a[i], 0.0);
    }
}
