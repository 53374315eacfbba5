//! Packing of `(batch, x, y, z)` coordinates into one ordered `u64` key.
//!
//! Layout, most significant first: 7 bits batch, then 19 bits each for x, y, z stored
//! with a bias of 2^18. Stored coordinates must lie in `[-2^17, 2^17)` and kernel
//! offsets in `(-2^17, 2^17)`, so a shifted coordinate stays inside its 19-bit field.
//! That guard makes `key(c) + delta_key(d) == key(c + d)` exact (no carry between
//! fields) and keeps the lexicographic `(b, x, y, z)` order, which the merge-sort
//! kernel-map builder relies on (PointAcc, Lin et al., MICRO 2021).

use crate::error::{Error, Result};

/// Largest batch index that fits the key.
pub const MAX_BATCH: i32 = (1 << BATCH_BITS) - 1;
/// Stored coordinates must satisfy `-COORD_LIMIT <= c < COORD_LIMIT`.
pub const COORD_LIMIT: i32 = 1 << 17;

const BATCH_BITS: u32 = 7;
const AXIS_BITS: u32 = 19;
const BIAS: i64 = 1 << 18;
const X_SHIFT: u32 = 2 * AXIS_BITS;
const Y_SHIFT: u32 = AXIS_BITS;
const B_SHIFT: u32 = 3 * AXIS_BITS;
const AXIS_MASK: u64 = (1 << AXIS_BITS) - 1;

/// Pack a coordinate that is already known to be in range.
#[inline(always)]
pub fn pack(c: [i32; 4]) -> u64 {
    ((c[0] as u64) << B_SHIFT)
        | (((c[1] as i64 + BIAS) as u64) << X_SHIFT)
        | (((c[2] as i64 + BIAS) as u64) << Y_SHIFT)
        | ((c[3] as i64 + BIAS) as u64)
}

/// Inverse of [`pack`].
#[inline(always)]
pub fn unpack(k: u64) -> [i32; 4] {
    [
        (k >> B_SHIFT) as i32,
        (((k >> X_SHIFT) & AXIS_MASK) as i64 - BIAS) as i32,
        (((k >> Y_SHIFT) & AXIS_MASK) as i64 - BIAS) as i32,
        ((k & AXIS_MASK) as i64 - BIAS) as i32,
    ]
}

/// The signed key difference that shifts a packed coordinate by `d` (no batch change).
#[inline(always)]
pub fn delta_key(d: [i32; 3]) -> i64 {
    ((d[0] as i64) << X_SHIFT) + ((d[1] as i64) << Y_SHIFT) + d[2] as i64
}

/// Check that a coordinate can be stored and packed.
pub fn check(c: [i32; 4]) -> Result<()> {
    if c[0] < 0 || c[0] > MAX_BATCH {
        return Err(Error::CoordRange { coord: c, msg: format!("batch index must be in 0..={MAX_BATCH}") });
    }
    for &v in &c[1..] {
        if !(-COORD_LIMIT..COORD_LIMIT).contains(&v) {
            return Err(Error::CoordRange {
                coord: c,
                msg: format!(
                    "x, y, z must be in {}..{} grid units (centre the cloud or use a larger voxel size)",
                    -COORD_LIMIT, COORD_LIMIT
                ),
            });
        }
    }
    Ok(())
}

/// Check that a kernel offset keeps every shifted coordinate inside its key field.
pub fn check_offset(d: [i32; 3]) -> Result<()> {
    if d.iter().any(|v| v.abs() >= COORD_LIMIT) {
        return Err(Error::invalid(
            "kernel offsets",
            format!("offset {d:?} is too large (|offset| must be below {COORD_LIMIT} grid units)"),
        ));
    }
    Ok(())
}

/// Floor division that rounds towards negative infinity (voxel grids are centred on the sensor).
#[inline(always)]
pub fn floor_div(a: i32, b: i32) -> i32 {
    a.div_euclid(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_and_order() {
        let cs = [
            [0, -COORD_LIMIT, -5, 7],
            [0, -1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
            [0, 0, 1, -3],
            [1, -COORD_LIMIT, -COORD_LIMIT, -COORD_LIMIT],
            [MAX_BATCH, COORD_LIMIT - 1, COORD_LIMIT - 1, COORD_LIMIT - 1],
        ];
        for w in cs.windows(2) {
            assert!(pack(w[0]) < pack(w[1]), "{:?} !< {:?}", w[0], w[1]);
        }
        for c in cs {
            check(c).unwrap();
            assert_eq!(unpack(pack(c)), c);
        }
    }

    #[test]
    fn shifted_keys_are_exact_at_the_range_edges() {
        let d = [COORD_LIMIT - 1, -(COORD_LIMIT - 1), 3];
        check_offset(d).unwrap();
        for c in [[2, -COORD_LIMIT, COORD_LIMIT - 1, -2], [0, COORD_LIMIT - 1, -COORD_LIMIT, 0]] {
            let shifted = (pack(c) as i64 + delta_key(d)) as u64;
            assert_eq!(unpack(shifted), [c[0], c[1] + d[0], c[2] + d[1], c[3] + d[2]]);
        }
    }

    #[test]
    fn out_of_range_is_an_error() {
        assert!(check([0, COORD_LIMIT, 0, 0]).is_err());
        assert!(check([0, 0, -COORD_LIMIT - 1, 0]).is_err());
        assert!(check([MAX_BATCH + 1, 0, 0, 0]).is_err());
        assert!(check([-1, 0, 0, 0]).is_err());
        assert!(check_offset([0, COORD_LIMIT, 0]).is_err());
    }

    #[test]
    fn floor_div_negative() {
        assert_eq!(floor_div(-1, 2), -1);
        assert_eq!(floor_div(-2, 2), -1);
        assert_eq!(floor_div(-3, 2), -2);
        assert_eq!(floor_div(3, 2), 1);
    }
}
