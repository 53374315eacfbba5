//! Optimizers (SGD with momentum and weight decay, AdamW) and learning-rate schedules
//! (warm-up, cosine, step), with per-tensor masks held at zero for pruning.

use crate::error::{Error, Result};

/// A learning-rate schedule over optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Constant rate.
    Constant,
    /// Cosine decay from the base rate to `min_factor · base` at `total` steps.
    Cosine {
        /// Steps to the end of the decay.
        total: usize,
        /// Final rate as a fraction of the base rate.
        min_factor: f64,
    },
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Period in steps.
        every: usize,
        /// Factor per period.
        gamma: f64,
    },
}

/// Learning rate at `step` (0-based): linear warm-up over `warmup` steps, then `schedule`.
pub fn learning_rate(base: f64, step: usize, warmup: usize, schedule: Schedule) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let s = step - warmup;
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine { total, min_factor } => {
            let t = (s as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0);
            base * (min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
        }
        Schedule::Step { every, gamma } => base * gamma.powi((s / every.max(1)) as i32),
    }
}

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// SGD with (optionally Nesterov) momentum and L2 weight decay added to the gradient.
    Sgd {
        /// Momentum.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// AdamW (decoupled weight decay).
    AdamW {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// ε.
        eps: f64,
    },
}

/// Optimizer state of one parameter tensor.
#[derive(Debug, Clone)]
pub struct ParamState {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Optional mask: where 0, the parameter is held at exactly zero through every step.
    pub mask: Option<Vec<u8>>,
}

impl ParamState {
    /// Fresh state for a tensor of `n` values.
    pub fn new(n: usize) -> Self {
        Self { m: vec![0.0; n], v: vec![0.0; n], mask: None }
    }

    /// First and second moments (SGD uses only the first: its momentum buffer).
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Restore saved moments (sizes must match, or the state stays as it is).
    pub fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>) {
        if m.len() == self.m.len() && v.len() == self.v.len() {
            self.m = m;
            self.v = v;
        }
    }
}

/// One optimizer step on `param` with gradient `grad` at learning rate `lr` (step is 1-based
/// for Adam's bias correction).
pub fn step(
    rule: Rule,
    param: &mut [f32],
    grad: &[f32],
    state: &mut ParamState,
    lr: f64,
    weight_decay: f64,
    t: usize,
) -> Result<()> {
    if grad.len() != param.len()
        || state.m.len() != param.len()
        || state.mask.as_ref().is_some_and(|m| m.len() != param.len())
    {
        return Err(Error::invalid("optimizer", "parameter, gradient and state sizes differ"));
    }
    match rule {
        Rule::Sgd { momentum, nesterov } => {
            for i in 0..param.len() {
                let g = grad[i] as f64 + weight_decay * param[i] as f64;
                let m = momentum * state.m[i] as f64 + g;
                state.m[i] = m as f32;
                let d = if nesterov { g + momentum * m } else { m };
                param[i] = (param[i] as f64 - lr * d) as f32;
            }
        }
        Rule::AdamW { beta1, beta2, eps } => {
            let t = t.max(1) as i32;
            let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
            for i in 0..param.len() {
                let g = grad[i] as f64;
                let m = beta1 * state.m[i] as f64 + (1.0 - beta1) * g;
                let v = beta2 * state.v[i] as f64 + (1.0 - beta2) * g * g;
                state.m[i] = m as f32;
                state.v[i] = v as f32;
                let p = param[i] as f64 * (1.0 - lr * weight_decay);
                param[i] = (p - lr * (m / c1) / ((v / c2).sqrt() + eps)) as f32;
            }
        }
    }
    if let Some(mask) = &state.mask {
        for (p, &k) in param.iter_mut().zip(mask) {
            if k == 0 {
                *p = 0.0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(0.1, 0, 4, Schedule::Constant), 0.025);
        assert_eq!(learning_rate(0.1, 3, 4, Schedule::Constant), 0.1);
        let c = Schedule::Cosine { total: 104, min_factor: 0.0 };
        assert!((learning_rate(0.1, 4, 4, c) - 0.1).abs() < 1e-12);
        assert!((learning_rate(0.1, 54, 4, c) - 0.05).abs() < 1e-12);
        assert!(learning_rate(0.1, 104, 4, c).abs() < 1e-12);
        assert!((learning_rate(1.0, 25, 0, Schedule::Step { every: 10, gamma: 0.5 }) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn sgd_and_adamw_minimise_a_quadratic_and_masks_hold() {
        // f(p) = Σ (p - 3)², gradient 2(p - 3).
        for rule in [Rule::Sgd { momentum: 0.9, nesterov: true }, Rule::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 }] {
            let mut p = vec![0.0f32, 10.0, -4.0];
            let mut st = ParamState::new(3);
            st.mask = Some(vec![1, 1, 0]);
            let lr = if matches!(rule, Rule::Sgd { .. }) { 0.02 } else { 0.1 };
            for t in 1..=500 {
                let g: Vec<f32> = p.iter().map(|&x| 2.0 * (x - 3.0)).collect();
                step(rule, &mut p, &g, &mut st, lr, 0.0, t).unwrap();
            }
            assert!((p[0] - 3.0).abs() < 1e-2 && (p[1] - 3.0).abs() < 1e-2, "{rule:?}: {p:?}");
            assert_eq!(p[2], 0.0, "masked weight stays exactly zero");
        }
        // Decoupled weight decay shrinks a zero-gradient weight by lr * wd per step.
        let mut p = vec![1.0f32];
        let mut st = ParamState::new(1);
        step(Rule::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, &mut p, &[0.0], &mut st, 0.1, 0.5, 1).unwrap();
        assert!((p[0] - 0.95).abs() < 1e-6);
    }
}
