// Output-stationary sparse convolution (implicit GEMM, fetch on demand): each workgroup owns a
// tile of TM output rows x TN output channels and walks every kernel offset, gathering the
// neighbour rows of its outputs through the neighbour table `nbr[out * K + k]` (-1: none) into
// workgroup memory, then multiplies by the offset's weight slice. No atomics, no scatter: every
// output is written once, its terms summed in a fixed order (offset, then input channel), so
// results are identical run to run on every backend. Bias, residual add and ReLU are fused.
// Features and weights are read through `load_x` / `load_w`: f32 storage here; the half-precision
// variant (the host swaps the marked block) stores pairs of f16 packed in u32 words, read with
// core `unpack2x16float`, so it needs no SHADER_F16 feature. Accumulation is always f32.

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
    // Bit 0: bias, bit 1: residual, bit 2: ReLU.
    flags: u32,
    // Row tiles per row of the 2D dispatch grid.
    row_tiles: u32,
    _pad0: u32,
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

var<workgroup> a_tile: array<f32, 1024>; // TM * TK, row-major [m][k]
var<workgroup> b_tile: array<f32, 1024>; // TK * TN, row-major [k][n]
var<workgroup> rows: array<i32, 64>;     // gathered input row per output row of the tile
var<workgroup> any_row: atomic<u32>;     // does any output of the tile have this neighbour?
var<workgroup> tile_active: u32;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wg.x + wg.y * params.row_tiles) * TM;
    let col0 = wg.z * TN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < RM * RN; i++) {
        acc[i] = 0.0;
    }
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
        for (var c0 = 0u; c0 < params.cin; c0 += TK) {
            // 256 threads load 1024 values of A and of B, four each.
            for (var e = li; e < TM * TK; e += 256u) {
                let m = e / TK;
                let c = c0 + e % TK;
                let src = rows[m];
                var v = 0.0;
                if (src >= 0 && c < params.cin) {
                    v = load_x(u32(src) * params.cin + c);
                }
                a_tile[e] = v;
            }
            for (var e = li; e < TK * TN; e += 256u) {
                let c = c0 + e / TN;
                let n = col0 + e % TN;
                var v = 0.0;
                if (c < params.cin && n < params.cout) {
                    v = load_w((k * params.cin + c) * params.cout + n);
                }
                b_tile[e] = v;
            }
            workgroupBarrier();
            for (var kk = 0u; kk < TK; kk++) {
                var a: array<f32, 4>;
                var b: array<f32, 4>;
                for (var i = 0u; i < RM; i++) {
                    a[i] = a_tile[(lid.y * RM + i) * TK + kk];
                }
                for (var j = 0u; j < RN; j++) {
                    b[j] = b_tile[kk * TN + lid.x * RN + j];
                }
                for (var i = 0u; i < RM; i++) {
                    for (var j = 0u; j < RN; j++) {
                        acc[i * RN + j] = fma(a[i], b[j], acc[i * RN + j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < RM; i++) {
        let r = row0 + lid.y * RM + i;
        if (r >= params.n_out) {
            continue;
        }
        for (var j = 0u; j < RN; j++) {
            let n = col0 + lid.x * RN + j;
            if (n >= params.cout) {
                continue;
            }
            var v = acc[i * RN + j];
            if ((params.flags & 1u) != 0u) {
                v += bias[n];
            }
            if ((params.flags & 2u) != 0u) {
                v += residual[r * params.cout + n];
            }
            if ((params.flags & 4u) != 0u) {
                v = max(v, 0.0);
            }
            y[r * params.cout + n] = v;
        }
    }
}
