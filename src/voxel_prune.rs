//! Voxel (activation) pruning: which voxels a conv computes, and what the others get.
//!
//! After SPS-Conv (Liu et al., "Spatial Pruned Sparse Convolution for Efficient 3D Object
//! Detection", NeurIPS 2022): a voxel's importance is the magnitude of its input features, and
//! a pruned layer computes only the top `1 − r` of its voxels. SPS-Conv's released code runs
//! the conv on every voxel and overwrites the pruned ones afterwards, which saves no time;
//! here the pruned outputs are never gathered, multiplied or scattered (the f32 and bf16 CPU
//! kernels skip their pairs tile by tile, `cpu::conv::PrunedRows` in the engine; the GPU's
//! output-stationary kernel runs a neighbour table of the kept rows only; sparse-format
//! weights run on a map restricted to the kept rows, [`crate::kmap::KernelMap::for_outputs`]), and that
//! overwrite is kept as the reference ([`VoxelPlan::reference`]) the fast path is tested against.
//!
//! With [`Fill::Zero`] a residual block's second conv sees zeros at the rows its first conv
//! pruned, scores them lowest and prunes them again at an equal ratio: the block is skipped
//! for those voxels as a whole (stochastic depth per voxel). On the real scan the kept sets
//! also barely move between blocks of one level (`tests/viz_levels.rs` counts them).
//!
//! A pruned **submanifold** conv reads every input voxel but writes only its kept voxels; the
//! others get [`Fill`]. A pruned **downsampling** conv creates only the output sites that an
//! important input voxel falls into; unimportant voxels still contribute to those sites
//! (through their pairs of the full map), but create none of their own — the issue's
//! definition, stricter than SPS-Conv's SPRS-Conv, which lets every voxel keep the site at
//! its own position. The next level's coordinate set is then smaller, and every conv on it
//! shrinks; the decoder's transposed conv runs on the transpose of that pruned map, so fine
//! voxels whose coarse site was never created get only the skip connection.
//!
//! Plans name convs by their kernel tensor (`up1.1.0.net.0.kernel`), as width plans do.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// How a voxel's importance is scored from its input features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Score {
    /// Mean absolute value over channels (SPS-Conv's `attn_pred` before its monotone sigmoid).
    #[default]
    L1,
    /// Euclidean norm over channels.
    L2,
}

/// What a pruned submanifold conv outputs at the voxels it does not compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// The layer's input passes through unchanged (SPS-Conv); where the conv changes the width
    /// this cannot apply and [`Fill::Zero`] is used instead.
    #[default]
    Input,
    /// The conv (with its folded BatchNorm) contributes nothing: the output is the activation
    /// of the residual where the layer adds one (a residual block then reduces to its
    /// shortcut, as in stochastic depth), else zero.
    Zero,
}

impl Fill {
    /// The fill a conv of these widths really uses.
    pub fn resolve(self, cin: usize, cout: usize) -> Fill {
        if cin == cout {
            self
        } else {
            Fill::Zero
        }
    }
}

impl std::str::FromStr for Score {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "l1" => Ok(Score::L1),
            "l2" => Ok(Score::L2),
            _ => Err(format!("unknown voxel score `{s}` (l1 or l2)")),
        }
    }
}

impl std::str::FromStr for Fill {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "input" => Ok(Fill::Input),
            "zero" => Ok(Fill::Zero),
            _ => Err(format!("unknown voxel fill `{s}` (input or zero)")),
        }
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Score::L1 => "l1",
            Score::L2 => "l2",
        })
    }
}

impl std::fmt::Display for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fill::Input => "input",
            Fill::Zero => "zero",
        })
    }
}

/// One conv's voxel pruning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoxelLayer {
    /// Fraction of voxels pruned, in `[0, 1)`.
    pub ratio: f32,
    /// Importance score.
    pub score: Score,
    /// What pruned voxels get (submanifold convs).
    pub fill: Fill,
    /// Compute every voxel, then overwrite the pruned ones (SPS-Conv's released semantics; the
    /// reference the fast path is tested against, and no faster than no pruning).
    pub reference: bool,
}

/// Per-conv pruning ratios for a network, with the score and fill they share.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VoxelPlan {
    /// Conv kernel tensor name → ratio.
    pub ratios: BTreeMap<String, f32>,
    /// Importance score.
    pub score: Score,
    /// What pruned voxels of a submanifold conv get.
    pub fill: Fill,
    /// Run the compute-everything-then-overwrite reference instead of skipping work.
    pub reference: bool,
}

/// Check a pruning ratio.
pub fn check_ratio(what: &str, r: f32) -> Result<f32> {
    if !(0.0..1.0).contains(&r) {
        return Err(Error::invalid(
            "voxel pruning ratio",
            format!("{what}: {r} is outside [0, 1) (the fraction of voxels pruned)"),
        ));
    }
    Ok(r)
}

const HEADER: &str = "# sparseconv voxel plan";

impl VoxelPlan {
    /// `r` on every conv named.
    pub fn uniform<'a>(names: impl IntoIterator<Item = &'a str>, r: f32) -> Result<Self> {
        check_ratio("--voxel-prune", r)?;
        Ok(Self { ratios: names.into_iter().map(|n| (n.to_string(), r)).collect(), ..Self::default() })
    }

    /// Whether no conv is pruned.
    pub fn is_empty(&self) -> bool {
        self.ratios.values().all(|&r| r == 0.0)
    }

    /// The layer setting of conv `name`, if pruned.
    pub fn layer(&self, name: &str) -> Option<VoxelLayer> {
        self.ratios.get(name).filter(|&&r| r > 0.0).map(|&ratio| VoxelLayer {
            ratio,
            score: self.score,
            fill: self.fill,
            reference: self.reference,
        })
    }

    /// Parse a plan file: a header line, optional `score l1|l2` and `fill input|zero` lines,
    /// then `conv NAME RATIO` lines; `#` starts a comment. `what` names the file in errors.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        let bad = |line: usize, msg: String| Error::format(what, format!("line {line}: {msg}"));
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l.trim() == HEADER => {}
            _ => return Err(Error::format(what, format!("not a voxel plan (first line must be `{HEADER}`)"))),
        }
        let mut plan = Self::default();
        for (i, line) in lines {
            let n = i + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["score", s] => plan.score = s.parse().map_err(|e| bad(n, e))?,
                ["fill", s] => plan.fill = s.parse().map_err(|e| bad(n, e))?,
                ["conv", name, r] => {
                    let r: f32 = r.parse().map_err(|_| bad(n, format!("ratio `{r}` is not a number")))?;
                    check_ratio(name, r).map_err(|e| bad(n, e.to_string()))?;
                    if plan.ratios.insert(name.to_string(), r).is_some() {
                        return Err(bad(n, format!("conv `{name}` is listed twice")));
                    }
                }
                _ => return Err(bad(n, format!("expected `score S`, `fill F` or `conv NAME RATIO`, got `{line}`"))),
            }
        }
        Ok(plan)
    }

    /// The plan as its file text ([`VoxelPlan::parse`] reads it back).
    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER}\nscore {}\nfill {}\n", self.score, self.fill);
        for (name, r) in &self.ratios {
            s.push_str(&format!("conv {name} {r}\n"));
        }
        s
    }
}

/// Per-voxel importance of `x` (`[n, c]`): one score per row, each summed in a fixed order
/// (eight lanes, then the lanes in order), so the same bits whatever the thread count.
pub fn importance(x: &[f32], c: usize, score: Score) -> Vec<f32> {
    use rayon::prelude::*;
    if c == 0 {
        return Vec::new();
    }
    let row_score = |row: &[f32]| {
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for ch in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(ch) {
                *a += if score == Score::L1 { v.abs() } else { v * v };
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += if score == Score::L1 { v.abs() } else { v * v };
        }
        score_of_sum(acc.iter().sum(), c, score)
    };
    const ROWS: usize = 2048;
    let mut out = vec![0f32; x.len() / c];
    out.par_chunks_mut(ROWS).zip(x.par_chunks(ROWS * c)).for_each(|(o, xs)| {
        for (o, row) in o.iter_mut().zip(xs.chunks_exact(c)) {
            *o = row_score(row);
        }
    });
    out
}

/// A row's score from its sum over `c` channels (of `|v|` for L1, `v²` for L2): what
/// [`importance`] does last, and what a GPU's row sums get on the host.
pub fn score_of_sum(s: f32, c: usize, score: Score) -> f32 {
    match score {
        Score::L1 => s / c as f32,
        Score::L2 => s.sqrt(),
    }
}

/// Rows kept when pruning the fraction `r` of each batch item's voxels by `scores`: the
/// `n − ⌊r·n⌋` highest-scoring rows of every batch index (ties go to the lower row, so the
/// set is unique), in ascending row order. `batch[i]` is row `i`'s batch index.
pub fn kept_rows(scores: &[f32], batch: impl Fn(usize) -> i32, r: f32) -> Result<Vec<u32>> {
    check_ratio("voxel pruning", r)?;
    let n = scores.len();
    let first = if n > 0 { batch(0) } else { 0 };
    if (0..n).all(|i| batch(i) == first) {
        return Ok(top_rows(scores, 0..n as u32, r));
    }
    let mut by_batch: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
    for i in 0..n {
        by_batch.entry(batch(i)).or_default().push(i as u32);
    }
    let mut kept: Vec<u32> = by_batch.into_values().flat_map(|rows| top_rows(scores, rows.into_iter(), r)).collect();
    kept.sort_unstable();
    Ok(kept)
}

/// The `m − ⌊r·m⌋` best of the `m` rows given (ascending input gives ascending output): the
/// threshold score by selection on a copy of the scores, then one pass keeping the rows above
/// it and the lowest-numbered rows at it.
fn top_rows(scores: &[f32], rows: impl Iterator<Item = u32> + Clone, r: f32) -> Vec<u32> {
    let m = rows.clone().count();
    let keep = m - ((r as f64 * m as f64).floor() as usize).min(m);
    if keep == m {
        return rows.collect();
    }
    if keep == 0 {
        return Vec::new();
    }
    let mut s: Vec<f32> = rows.clone().map(|i| scores[i as usize]).collect();
    // Descending: the keep-th best score is the threshold.
    let (_, &mut t, _) = s.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
    let above = rows.clone().filter(|&i| scores[i as usize].total_cmp(&t).is_gt()).count();
    let mut at = keep - above;
    let mut out = Vec::with_capacity(keep);
    for i in rows {
        match scores[i as usize].total_cmp(&t) {
            std::cmp::Ordering::Greater => out.push(i),
            std::cmp::Ordering::Equal if at > 0 => {
                out.push(i);
                at -= 1;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rows_are_the_top_scores_per_batch_item() {
        let s = [0.5, 0.1, 0.9, 0.1, 0.3, 0.7];
        // One batch item: prune ⌊0.5·6⌋ = 3, keep rows 0, 2, 5.
        assert_eq!(kept_rows(&s, |_| 0, 0.5).unwrap(), vec![0, 2, 5]);
        // Two items of three: prune one each, the lowest of each (rows 1 and 3).
        assert_eq!(kept_rows(&s, |i| (i / 3) as i32, 0.34).unwrap(), vec![0, 2, 4, 5]);
        // Ties go to the lower row.
        assert_eq!(kept_rows(&[1.0, 1.0, 1.0], |_| 0, 0.5).unwrap(), vec![0, 1]);
        assert_eq!(kept_rows(&s, |_| 0, 0.0).unwrap().len(), 6);
        assert!(kept_rows(&s, |_| 0, 1.0).is_err());
        assert!(kept_rows(&s, |_| 0, -0.1).is_err());
    }

    #[test]
    fn plans_round_trip_and_bad_lines_are_errors() {
        let mut p = VoxelPlan::uniform(["a.kernel", "b.kernel"], 0.5).unwrap();
        p.fill = Fill::Zero;
        p.score = Score::L2;
        assert_eq!(VoxelPlan::parse(&p.to_text(), "p").unwrap(), p);
        for bad in [
            "conv a 0.5\n",
            "# sparseconv voxel plan\nconv a 1.0\n",
            "# sparseconv voxel plan\nconv a x\n",
            "# sparseconv voxel plan\nconv a 0.1\nconv a 0.2\n",
            "# sparseconv voxel plan\nfill half\n",
            "# sparseconv voxel plan\nratio a 0.1\n",
        ] {
            assert!(VoxelPlan::parse(bad, "p").is_err(), "{bad}");
        }
    }

    #[test]
    fn importance_scores_rows() {
        let x = [1.0, -3.0, 0.0, 0.0, 3.0, 4.0];
        assert_eq!(importance(&x, 2, Score::L1), vec![2.0, 0.0, 3.5]);
        assert_eq!(importance(&x, 2, Score::L2), vec![10f32.sqrt(), 0.0, 5.0]);
    }
}
