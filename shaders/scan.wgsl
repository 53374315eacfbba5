// Exclusive prefix sums of u32 by reduce-then-scan (no single-pass decoupled look-back: that
// needs forward-progress guarantees not every backend gives). The host recurses: `reduce`
// writes one sum per block of 1024 values, those sums are scanned the same way, and `scan`
// turns each block into its exclusive prefix sums starting at its block's scanned sum.
// Integer sums: the same bits on every run, whatever the scheduling.

struct Params {
    n: u32,
    // Workgroups per row of the 2D dispatch grid.
    row_groups: u32,
    // 1: add `sums[block]` to every value of the block (0: a single block starting at 0).
    with_offsets: u32,
    _pad: u32,
}

const WG: u32 = 256u;
const BLOCK: u32 = 1024u; // WG * 4 values per thread

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<u32>;
@group(0) @binding(2) var<storage, read_write> sums: array<u32>;

var<workgroup> part: array<u32, 256>;

fn load4(base: u32) -> vec4<u32> {
    var v = vec4<u32>(0u);
    for (var i = 0u; i < 4u; i++) {
        if (base + i < params.n) {
            v[i] = data[base + i];
        }
    }
    return v;
}

@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wg.x + wg.y * params.row_groups;
    let v = load4(b * BLOCK + li * 4u);
    part[li] = v.x + v.y + v.z + v.w;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (li < off) {
            part[li] += part[li + off];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        sums[b] = part[0];
    }
}

@compute @workgroup_size(256)
fn scan(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wg.x + wg.y * params.row_groups;
    let base = b * BLOCK + li * 4u;
    let v = load4(base);
    let total = v.x + v.y + v.z + v.w;
    part[li] = total;
    workgroupBarrier();
    // Inclusive Hillis-Steele scan of the per-thread totals.
    for (var off = 1u; off < WG; off <<= 1u) {
        var t = 0u;
        if (li >= off) {
            t = part[li - off];
        }
        workgroupBarrier();
        part[li] += t;
        workgroupBarrier();
    }
    var start = part[li] - total;
    if (params.with_offsets == 1u) {
        start += sums[b];
    }
    let e = vec4<u32>(start, start + v.x, start + v.x + v.y, start + v.x + v.y + v.z);
    for (var i = 0u; i < 4u; i++) {
        if (base + i < params.n) {
            data[base + i] = e[i];
        }
    }
}
