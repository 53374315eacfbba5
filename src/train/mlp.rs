//! Small fully connected networks (ReLU hidden layers) with their backward pass and Adam: the
//! actor and critic of AMC's DDPG agent (`prune::ddpg`). Built on the same ops as network
//! training ([`crate::cpu::elementwise::linear`], [`super::ops::linear_backward`],
//! [`super::optim::step`]), so they are deterministic for any thread count.

use super::data::Rng;
use super::ops::{linear_backward, relu_backward};
use super::optim::{step, ParamState, Rule};
use crate::cpu::elementwise::linear;
use crate::error::{Error, Result};

/// What the last layer's output goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Nothing (a critic's Q value).
    Linear,
    /// The logistic function (an actor's keep ratio in (0, 1)).
    Sigmoid,
}

/// A multilayer perceptron: `sizes[0]` inputs, ReLU after every hidden layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Widths from input to output.
    pub sizes: Vec<usize>,
    /// Per layer, `[out, in]` weights.
    pub weights: Vec<Vec<f32>>,
    /// Per layer, `[out]` biases.
    pub biases: Vec<Vec<f32>>,
    output: Output,
    /// Adam state: weights and biases of each layer, in that order.
    states: Vec<ParamState>,
    steps: usize,
}

/// What a forward pass keeps for its backward pass: every layer's input, and the output.
#[derive(Debug, Clone)]
pub struct Cache {
    acts: Vec<Vec<f32>>,
    rows: usize,
}

/// Gradients of every weight and bias, in [`Mlp`] order.
pub type Grads = Vec<Vec<f32>>;

impl Mlp {
    /// Seeded initialization: hidden layers uniform in ±1/√fan_in (PyTorch's default), the last
    /// layer uniform in ±`last_init` (DDPG's small final layer, Lillicrap et al. 2016).
    pub fn new(sizes: &[usize], output: Output, last_init: f32, seed: u64) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::invalid("mlp", "needs at least an input and an output width, none zero"));
        }
        let mut rng = Rng::new(seed);
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let last = sizes.len() - 2;
        for (l, w) in sizes.windows(2).enumerate() {
            let bound = if l == last { last_init } else { 1.0 / (w[0] as f32).sqrt() };
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) as f32) * bound).collect() };
            weights.push(draw(w[0] * w[1]));
            biases.push(draw(w[1]));
        }
        let states = weights
            .iter()
            .zip(&biases)
            .flat_map(|(w, b)| [ParamState::new(w.len()), ParamState::new(b.len())])
            .collect();
        Ok(Self { sizes: sizes.to_vec(), weights, biases, output, states, steps: 0 })
    }

    /// Inputs per row.
    pub fn inputs(&self) -> usize {
        self.sizes[0]
    }

    /// Outputs per row.
    pub fn outputs(&self) -> usize {
        self.sizes[self.sizes.len() - 1]
    }

    /// Outputs for `x` (`rows × inputs`), and what backward needs.
    pub fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Cache)> {
        let cin = self.inputs();
        if x.is_empty() || !x.len().is_multiple_of(cin) {
            return Err(Error::invalid("mlp", format!("{} inputs is not a whole number of rows of {cin}", x.len())));
        }
        let rows = x.len() / cin;
        let mut acts = vec![x.to_vec()];
        let last = self.weights.len() - 1;
        for l in 0..self.weights.len() {
            let (i, o) = (self.sizes[l], self.sizes[l + 1]);
            let mut y = linear(&acts[l], i, &self.weights[l], &self.biases[l], o);
            if l < last {
                y.iter_mut().for_each(|v| *v = v.max(0.0));
            } else if self.output == Output::Sigmoid {
                y.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
            }
            acts.push(y);
        }
        let out = acts.pop().unwrap_or_default();
        acts.push(out.clone());
        Ok((out, Cache { acts, rows }))
    }

    /// Gradients of the weights and of the input, given the gradient of the outputs.
    pub fn backward(&self, cache: &Cache, dy: &[f32]) -> Result<(Vec<f32>, Grads)> {
        let n = self.weights.len();
        let out = &cache.acts[n];
        if dy.len() != out.len() || cache.rows * self.outputs() != dy.len() {
            return Err(Error::invalid("mlp", "output gradient and forward pass differ in size"));
        }
        let mut d: Vec<f32> = match self.output {
            Output::Linear => dy.to_vec(),
            Output::Sigmoid => dy.iter().zip(out).map(|(&g, &y)| g * y * (1.0 - y)).collect(),
        };
        let mut grads = vec![Vec::new(); 2 * n];
        for l in (0..n).rev() {
            if l < n - 1 {
                d = relu_backward(&cache.acts[l + 1], &d);
            }
            let (dx, dw, db) = linear_backward(&cache.acts[l], self.sizes[l], &self.weights[l], self.sizes[l + 1], &d);
            grads[2 * l] = dw;
            grads[2 * l + 1] = db;
            d = dx;
        }
        Ok((d, grads))
    }

    /// One Adam step (no weight decay) with learning rate `lr`.
    pub fn adam(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        if grads.len() != self.states.len() {
            return Err(Error::invalid("mlp", "one gradient per weight and bias expected"));
        }
        self.steps += 1;
        let rule = Rule::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        for (l, g) in grads.iter().enumerate() {
            let p = if l % 2 == 0 { &mut self.weights[l / 2] } else { &mut self.biases[l / 2] };
            step(rule, p, g, &mut self.states[l], lr, 0.0, self.steps)?;
        }
        Ok(())
    }

    /// Move every parameter a fraction `tau` of the way to `src`'s (a DDPG target network).
    pub fn soft_update(&mut self, src: &Mlp, tau: f32) {
        let mix = |dst: &mut Vec<f32>, s: &Vec<f32>| {
            for (d, &v) in dst.iter_mut().zip(s) {
                *d = (1.0 - tau) * *d + tau * v;
            }
        };
        for (d, s) in self.weights.iter_mut().zip(&src.weights) {
            mix(d, s);
        }
        for (d, s) in self.biases.iter_mut().zip(&src.biases) {
            mix(d, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gradient against central finite differences of `L = Σ c_i · y_i` (f64 sums).
    #[test]
    fn backward_matches_finite_differences() {
        for output in [Output::Linear, Output::Sigmoid] {
            let mut m = Mlp::new(&[5, 7, 6, 2], output, 0.5, 3).unwrap();
            let x: Vec<f32> = (0..15).map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0).collect();
            let c: Vec<f32> = (0..6).map(|i| (i as f32 - 2.5) / 3.0).collect();
            let loss = |m: &Mlp, x: &[f32]| -> f64 {
                let (y, _) = m.forward(x).unwrap();
                y.iter().zip(&c).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let (_, cache) = m.forward(&x).unwrap();
            let (dx, grads) = m.backward(&cache, &c).unwrap();
            let h = 1e-3f32;
            let check = |analytic: f32, plus: f64, minus: f64, what: &str| {
                let numeric = (plus - minus) / (2.0 * h as f64);
                assert!(
                    (numeric - analytic as f64).abs() < 2e-3 + 2e-2 * numeric.abs(),
                    "{output:?} {what}: numeric {numeric} analytic {analytic}"
                );
            };
            for i in 0..x.len() {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                check(dx[i], loss(&m, &xp), loss(&m, &xm), &format!("dx[{i}]"));
            }
            for l in 0..m.weights.len() {
                for j in (0..m.weights[l].len()).step_by(3) {
                    let v = m.weights[l][j];
                    m.weights[l][j] = v + h;
                    let p = loss(&m, &x);
                    m.weights[l][j] = v - h;
                    let q = loss(&m, &x);
                    m.weights[l][j] = v;
                    check(grads[2 * l][j], p, q, &format!("w{l}[{j}]"));
                }
                for j in 0..m.biases[l].len() {
                    let v = m.biases[l][j];
                    m.biases[l][j] = v + h;
                    let p = loss(&m, &x);
                    m.biases[l][j] = v - h;
                    let q = loss(&m, &x);
                    m.biases[l][j] = v;
                    check(grads[2 * l + 1][j], p, q, &format!("b{l}[{j}]"));
                }
            }
        }
    }

    #[test]
    fn adam_fits_a_function_and_soft_update_mixes() {
        // y = sin(x0) + x1² on a grid: the loss must fall by 10×.
        let mut m = Mlp::new(&[2, 32, 32, 1], Output::Linear, 3e-3, 1).unwrap();
        let xs: Vec<f32> = (0..64).flat_map(|i| [(i % 8) as f32 / 4.0 - 1.0, (i / 8) as f32 / 4.0 - 1.0]).collect();
        let ys: Vec<f32> = xs.chunks(2).map(|p| p[0].sin() + p[1] * p[1]).collect();
        let mse = |m: &Mlp| -> (f64, Vec<f32>, Cache) {
            let (y, c) = m.forward(&xs).unwrap();
            let d: Vec<f32> = y.iter().zip(&ys).map(|(a, b)| 2.0 * (a - b) / ys.len() as f32).collect();
            (y.iter().zip(&ys).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / ys.len() as f64, d, c)
        };
        let first = mse(&m).0;
        for _ in 0..400 {
            let (_, d, c) = mse(&m);
            let (_, g) = m.backward(&c, &d).unwrap();
            m.adam(&g, 1e-2).unwrap();
        }
        let last = mse(&m).0;
        assert!(last < first / 10.0, "loss {first} -> {last}");
        let mut t = Mlp::new(&[2, 32, 32, 1], Output::Linear, 3e-3, 9).unwrap();
        let before = t.weights[0][0];
        t.soft_update(&m, 0.25);
        assert!((t.weights[0][0] - (0.75 * before + 0.25 * m.weights[0][0])).abs() < 1e-6);
        assert!(m.forward(&[1.0, 2.0, 3.0]).is_err(), "ragged input refused");
    }
}
