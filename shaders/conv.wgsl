// Sparse convolution, two ways, both free of float atomics (missing on DX12, OpenGL and the
// web) and giving the same bits on every run.
//
// `main`, output-stationary (implicit GEMM, fetch on demand): each workgroup owns a tile of TM
// output rows x TN output channels and walks every kernel offset, gathering the neighbour rows
// of its outputs through the neighbour table `nbr[row * K + k]` (-1: none) into workgroup
// memory, then multiplying by the offset's weight slice. Every output is written once, its
// terms summed in a fixed order (offset, then input channel). Bias, residual add and ReLU are
// fused.
//
// `gather_gemm` + `scatter_sum`, weight-stationary (gather -> GEMM -> scatter, TorchSparse's
// dataflow): `gather_gemm` runs one group of offsets as a batched GEMM padded to the group's
// largest map (the CPU's adaptive grouping), writing each map pair's product row to a
// temporary; `scatter_sum` then gives every output row the sum of its pairs' rows in offset
// order through the pair-index table `pidx[row * K' + j]` (-1: none). The scatter is a gather
// from the output's side: no two threads write one row, so no atomics are needed.
//
// Features and weights are read through `load_x` / `load_w`: f32 storage here; the
// half-precision variant (the host swaps the marked block) stores pairs of f16 packed in u32
// words, read with core `unpack2x16float`, so it needs no SHADER_F16 feature. Accumulation is
// always f32.

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
// Each of the 16 x 16 threads computes a 4 x 4 block of the tile.
const RM: u32 = 4u;
const RN: u32 = 4u;

struct Params {
    n_out: u32,
    cin: u32,
    cout: u32,
    volume: u32,
    // Bit 0: bias, bit 1: residual, bit 2: ReLU, bit 3: add onto `y` (`scatter_sum` after the
    // first chunk of groups).
    flags: u32,
    // Row tiles per row of the 2D dispatch grid.
    row_tiles: u32,
    // Column tiles (`gather_gemm`: z = member * col_tiles + column tile).
    col_tiles: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// BEGIN STORAGE
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
fn load_x(i: u32) -> f32 { return x[i]; }
fn load_w(i: u32) -> f32 { return w[i]; }
// END STORAGE
@group(0) @binding(3) var<storage, read> nbr: array<i32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> residual: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
// `gather_gemm`: (offset, first temp row, pairs, 0) of each group member.
@group(0) @binding(8) var<storage, read> members: array<vec4<u32>>;
// `scatter_sum`: the product rows of `gather_gemm`.
@group(0) @binding(9) var<storage, read> temp: array<f32>;
// Output row of each neighbour-table row: tiles walk rows sorted by their neighbour bitmask
// (TorchSparse++'s sorted implicit GEMM), so the rows of a tile share most active offsets.
@group(0) @binding(7) var<storage, read> out_rows: array<u32>;

// A tile stored [kk][m] with a padded row (17 vec4 per kk) so the gather's stores, 16 threads
// per row, spread over banks; B stored [kk][n]. Each thread reads one vec4 of each per kk:
// the 4 x 4 block lives in four vec4 registers (no arrays, which some drivers put in local
// memory).
const AS: u32 = 17u;
var<workgroup> a_tile: array<vec4<f32>, 272>; // TK * AS
var<workgroup> b_tile: array<vec4<f32>, 256>; // TK * TN / 4
var<workgroup> rows: array<i32, 64>;          // gathered input row per output row of the tile
var<workgroup> any_row: atomic<u32>;          // does any output of the tile have this neighbour?
var<workgroup> tile_active: u32;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wg.x + wg.y * params.row_tiles) * TM;
    let col0 = wg.z * TN;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k = 0u; k < params.volume; k++) {
        if (li == 0u) {
            atomicStore(&any_row, 0u);
        }
        workgroupBarrier();
        if (li < TM) {
            let r = row0 + li;
            var src = -1;
            if (r < params.n_out) {
                src = nbr[r * params.volume + k];
            }
            rows[li] = src;
            if (src >= 0) {
                atomicOr(&any_row, 1u);
            }
        }
        workgroupBarrier();
        if (li == 0u) {
            tile_active = atomicLoad(&any_row);
        }
        // Offsets no output of the tile has contribute nothing: skip their GEMM (uniformly).
        if (workgroupUniformLoad(&tile_active) == 0u) {
            continue;
        }
        tile_step(k, col0, lid, li, &acc0, &acc1, &acc2, &acc3);
    }
    store_row(row0 + lid.y * RM, col0 + lid.x * RN, acc0);
    store_row(row0 + lid.y * RM + 1u, col0 + lid.x * RN, acc1);
    store_row(row0 + lid.y * RM + 2u, col0 + lid.x * RN, acc2);
    store_row(row0 + lid.y * RM + 3u, col0 + lid.x * RN, acc3);
}

// Adds the tile's gathered rows (`rows`) times the weights of offset `k` onto the 4 x 4 block.
// Called in uniform control flow: it synchronizes the workgroup.
fn tile_step(
    k: u32,
    col0: u32,
    lid: vec3<u32>,
    li: u32,
    acc0: ptr<function, vec4<f32>>,
    acc1: ptr<function, vec4<f32>>,
    acc2: ptr<function, vec4<f32>>,
    acc3: ptr<function, vec4<f32>>,
) {
    for (var c0 = 0u; c0 < params.cin; c0 += TK) {
        // 256 threads load 1024 values of A and of B, four each; consecutive threads read
        // consecutive channels of one input row.
        for (var e = li; e < TM * TK; e += 256u) {
            let m = e / TK;
            let kk = e % TK;
            let c = c0 + kk;
            let src = rows[m];
            var v = 0.0;
            if (src >= 0 && c < params.cin) {
                v = load_x(u32(src) * params.cin + c);
            }
            a_tile[kk * AS + m / 4u][m % 4u] = v;
        }
        for (var e = li; e < TK * TN; e += 256u) {
            let kk = e / TN;
            let c = c0 + kk;
            let n = col0 + e % TN;
            var v = 0.0;
            if (c < params.cin && n < params.cout) {
                v = load_w((k * params.cin + c) * params.cout + n);
            }
            b_tile[e / 4u][e % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = a_tile[kk * AS + lid.y];
            let b = b_tile[kk * (TN / 4u) + lid.x];
            *acc0 = fma(vec4<f32>(a.x), b, *acc0);
            *acc1 = fma(vec4<f32>(a.y), b, *acc1);
            *acc2 = fma(vec4<f32>(a.z), b, *acc2);
            *acc3 = fma(vec4<f32>(a.w), b, *acc3);
        }
        workgroupBarrier();
    }
}

// One group of offsets as a batched GEMM: workgroup (row tile, member * col_tiles + column
// tile) multiplies the member's gathered input rows (`nbr` holds them, [members, n_out] with
// n_out the padded rows; -1 pads) by its offset's weights into its pairs' temp rows.
@compute @workgroup_size(16, 16)
fn gather_gemm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wg.x + wg.y * params.row_tiles) * TM;
    let g = wg.z / params.col_tiles;
    let col0 = (wg.z % params.col_tiles) * TN;
    let mem = members[g];
    // Uniform exit: tiles past this member's pairs (padding) do nothing.
    if (row0 >= mem.z) {
        return;
    }
    if (li < TM) {
        var src = -1;
        if (row0 + li < mem.z) {
            src = nbr[g * params.n_out + row0 + li];
        }
        rows[li] = src;
    }
    workgroupBarrier();
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    tile_step(mem.x, col0, lid, li, &acc0, &acc1, &acc2, &acc3);
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < RM; i++) {
        let r = row0 + lid.y * RM + i;
        if (r < mem.z) {
            for (var j = 0u; j < RN; j++) {
                let n = col0 + lid.x * RN + j;
                if (n < params.cout) {
                    y[(mem.y + r) * params.cout + n] = accs[i][j];
                }
            }
        }
    }
}

// Thread (row, 4 channels): y = relu?(init + Σ_j temp[pidx[row * K' + j]]) in j order, where
// init is bias + residual for the first chunk of groups and the current `y` after it.
@compute @workgroup_size(256)
fn scatter_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let quads = (params.cout + 3u) / 4u;
    let t = gid.x + gid.y * params.row_tiles * 256u;
    let r = t / quads;
    if (r >= params.n_out) {
        return;
    }
    let n0 = (t % quads) * 4u;
    for (var j = 0u; j < RN; j++) {
        let n = n0 + j;
        if (n >= params.cout) {
            return;
        }
        var o = 0.0;
        if ((params.flags & 8u) != 0u) {
            o = y[r * params.cout + n];
        } else {
            if ((params.flags & 1u) != 0u) {
                o += bias[n];
            }
            if ((params.flags & 2u) != 0u) {
                o += residual[r * params.cout + n];
            }
        }
        for (var k = 0u; k < params.volume; k++) {
            let p = nbr[r * params.volume + k];
            if (p >= 0) {
                o += temp[u32(p) * params.cout + n];
            }
        }
        if ((params.flags & 4u) != 0u) {
            o = max(o, 0.0);
        }
        y[r * params.cout + n] = o;
    }
}

// Writes 4 consecutive output channels of neighbour-table row `t` (bias, residual, ReLU fused).
fn store_row(t: u32, n0: u32, v: vec4<f32>) {
    if (t >= params.n_out) {
        return;
    }
    let r = out_rows[t];
    for (var j = 0u; j < RN; j++) {
        let n = n0 + j;
        if (n >= params.cout) {
            return;
        }
        var o = v[j];
        if ((params.flags & 1u) != 0u) {
            o += bias[n];
        }
        if ((params.flags & 2u) != 0u) {
            o += residual[r * params.cout + n];
        }
        if ((params.flags & 4u) != 0u) {
            o = max(o, 0.0);
        }
        y[r * params.cout + n] = o;
    }
}
