// One pass of a stable LSD radix sort of 64-bit keys held as u32 pairs (core WGSL has no
// 64-bit integers) with a u32 value each, on the 8-bit digit at `shift`. `count` writes, per
// block of 1024 elements, how many of each digit it holds into `hist[digit * blocks + block]`
// (digit-major, so one exclusive scan of `hist` gives every block's output start for every
// digit); `scatter` moves each element to its start plus its rank among the block's earlier
// elements of the same digit, which keeps the sort stable. The host skips digits where no key
// differs from another.

struct Params {
    n: u32,
    shift: u32,
    blocks: u32,
    row_groups: u32,
}

const WG: u32 = 256u;
const BLOCK: u32 = 1024u;
const RADIX: u32 = 256u; // digit values (one per thread of a workgroup)
const NONE: u32 = 256u; // digit of a slot past the end

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> hi_in: array<u32>;
@group(0) @binding(2) var<storage, read> lo_in: array<u32>;
@group(0) @binding(3) var<storage, read> val_in: array<u32>;
@group(0) @binding(4) var<storage, read_write> hist: array<u32>;
@group(0) @binding(5) var<storage, read_write> hi_out: array<u32>;
@group(0) @binding(6) var<storage, read_write> lo_out: array<u32>;
@group(0) @binding(7) var<storage, read_write> val_out: array<u32>;

var<workgroup> counts: array<atomic<u32>, 256>;
var<workgroup> digits: array<u32, 256>;
var<workgroup> run: array<u32, 256>;

fn digit(i: u32) -> u32 {
    if (i >= params.n) {
        return NONE;
    }
    var k = lo_in[i];
    if (params.shift >= 32u) {
        k = hi_in[i];
    }
    return (k >> (params.shift & 31u)) & (RADIX - 1u);
}

@compute @workgroup_size(256)
fn count(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wg.x + wg.y * params.row_groups;
    if (li < RADIX) {
        atomicStore(&counts[li], 0u);
    }
    workgroupBarrier();
    for (var r = 0u; r < BLOCK / WG; r++) {
        let d = digit(b * BLOCK + r * WG + li);
        if (d != NONE) {
            atomicAdd(&counts[d], 1u);
        }
    }
    workgroupBarrier();
    if (li < RADIX) {
        hist[li * params.blocks + b] = atomicLoad(&counts[li]);
    }
}

@compute @workgroup_size(256)
fn scatter(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wg.x + wg.y * params.row_groups;
    if (li < RADIX) {
        run[li] = 0u;
    }
    // Rounds of 256 elements in order; a thread's rank counts the same digits before it in
    // its round, `run` those of earlier rounds.
    for (var r = 0u; r < BLOCK / WG; r++) {
        let i = b * BLOCK + r * WG + li;
        let d = digit(i);
        digits[li] = d;
        workgroupBarrier();
        if (d != NONE) {
            var rank = 0u;
            for (var j = 0u; j < li; j++) {
                rank += u32(digits[j] == d);
            }
            let dst = hist[d * params.blocks + b] + run[d] + rank;
            hi_out[dst] = hi_in[i];
            lo_out[dst] = lo_in[i];
            val_out[dst] = val_in[i];
        }
        workgroupBarrier();
        if (li < RADIX) {
            var c = 0u;
            for (var j = 0u; j < WG; j++) {
                c += u32(digits[j] == li);
            }
            run[li] += c;
        }
        workgroupBarrier();
    }
}
