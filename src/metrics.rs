//! Segmentation metrics over the 19 SemanticKITTI training classes (class 0 ignored).

use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;

/// Confusion counts `[gt][pred]` over training ids 1..=19; points with ground truth 0 are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    counts: Vec<u64>,
    /// Labelled points per ground-truth class whose prediction was outside 1..=19.
    missed: Vec<u64>,
}

impl Default for Confusion {
    fn default() -> Self {
        Self::new()
    }
}

impl Confusion {
    /// No points yet.
    pub fn new() -> Self {
        Self { counts: vec![0; NUM_CLASSES * NUM_CLASSES], missed: vec![0; NUM_CLASSES] }
    }

    /// Count predictions against ground truth (training ids 0..=19).
    pub fn from_labels(pred: &[u32], gt: &[u32]) -> Result<Self> {
        if pred.len() != gt.len() {
            return Err(Error::invalid("IoU", format!("{} predictions for {} labelled points", pred.len(), gt.len())));
        }
        let mut c = Self::new();
        for (&p, &g) in pred.iter().zip(gt) {
            if g == 0 || g as usize > NUM_CLASSES {
                continue;
            }
            if p == 0 || p as usize > NUM_CLASSES {
                // Unlabeled/unknown predictions are wrong for every labelled point.
                c.missed[g as usize - 1] += 1;
                continue;
            }
            c.counts[(g as usize - 1) * NUM_CLASSES + (p as usize - 1)] += 1;
        }
        Ok(c)
    }

    /// Accumulate another confusion matrix.
    pub fn add(&mut self, o: &Confusion) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        for (a, b) in self.missed.iter_mut().zip(&o.missed) {
            *a += b;
        }
    }

    /// IoU per class (`None` where the class is absent from both ground truth and predictions).
    pub fn iou(&self) -> Vec<Option<f64>> {
        (0..NUM_CLASSES)
            .map(|j| {
                let tp = self.counts[j * NUM_CLASSES + j];
                let gt: u64 = (0..NUM_CLASSES).map(|p| self.counts[j * NUM_CLASSES + p]).sum::<u64>() + self.missed[j];
                let pr: u64 = (0..NUM_CLASSES).map(|g| self.counts[g * NUM_CLASSES + j]).sum();
                let union = gt + pr - tp;
                (gt > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes present in the ground truth.
    pub fn miou(&self) -> Option<f64> {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Fraction of labelled points predicted right.
    pub fn accuracy(&self) -> f64 {
        let tp: u64 = (0..NUM_CLASSES).map(|j| self.counts[j * NUM_CLASSES + j]).sum();
        let all: u64 = self.counts.iter().sum::<u64>() + self.missed.iter().sum::<u64>();
        if all == 0 {
            0.0
        } else {
            tp as f64 / all as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_by_hand() {
        // gt:   1 1 2 2 0 3
        // pred: 1 2 2 2 5 0
        let c = Confusion::from_labels(&[1, 2, 2, 2, 5, 0], &[1, 1, 2, 2, 0, 3]).unwrap();
        let iou = c.iou();
        assert_eq!(iou[0], Some(0.5)); // class 1: tp 1, gt 2, pred 1
        assert_eq!(iou[1], Some(2.0 / 3.0)); // class 2: tp 2, gt 2, pred 3
        assert_eq!(iou[2], Some(0.0)); // class 3: predicted unlabeled
        assert_eq!(iou[4], None); // class 5 only predicted on an ignored point
        assert!((c.miou().unwrap() - (0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((c.accuracy() - 3.0 / 5.0).abs() < 1e-12);
        assert!(Confusion::from_labels(&[1], &[1, 2]).is_err());
    }
}
