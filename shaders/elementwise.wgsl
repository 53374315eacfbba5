// Row-wise helpers that keep features on the GPU between convs.
// `concat`: y[r] = [a[r] | b[r]] (channel concat of two tensors on the same rows).
// `pack_half`: f32 values to f16 pairs packed in u32 words (the conv's half-precision storage).

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
