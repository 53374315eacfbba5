//! DDPG (Lillicrap et al., ICLR 2016) as AMC uses it (He et al., ECCV 2018): a deterministic
//! actor μ(s) → one continuous action in (0, 1), a critic Q(s, a), slowly tracking target
//! copies of both, a replay buffer, and truncated-normal exploration whose width decays after
//! each episode. AMC's variant of the Bellman target: every transition of an episode carries
//! the episode's final reward, a moving-average baseline is subtracted from it, and the
//! discount is 1 (`y = r − b + Q'(s', μ'(s'))`).

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::train::data::Rng;
use crate::train::mlp::{Mlp, Output};

/// Knobs of the agent (AMC's values as defaults).
#[derive(Debug, Clone)]
pub struct DdpgOptions {
    /// Units in each of the two hidden layers of the actor and the critic.
    pub hidden: usize,
    /// Actor learning rate (Adam).
    pub lr_actor: f64,
    /// Critic learning rate (Adam).
    pub lr_critic: f64,
    /// Target networks move this fraction towards the trained ones per update.
    pub tau: f32,
    /// Discount of the next state's value.
    pub discount: f32,
    /// Transitions per update.
    pub batch: usize,
    /// Replay buffer capacity (transitions; the oldest are dropped).
    pub replay: usize,
    /// Weight of the newest batch in the moving-average reward baseline.
    pub baseline_alpha: f64,
}

impl Default for DdpgOptions {
    fn default() -> Self {
        Self {
            hidden: 300,
            lr_actor: 1e-4,
            lr_critic: 1e-3,
            tau: 0.01,
            discount: 1.0,
            batch: 64,
            replay: 2000,
            baseline_alpha: 0.5,
        }
    }
}

/// One step of an episode.
#[derive(Debug, Clone)]
pub struct Transition {
    /// State.
    pub state: Vec<f32>,
    /// Action taken (after clipping: what the environment did).
    pub action: f32,
    /// Reward (the episode's final reward).
    pub reward: f32,
    /// Next state.
    pub next: Vec<f32>,
    /// Last step of the episode.
    pub done: bool,
}

/// Losses of one update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateReport {
    /// Critic mean squared TD error.
    pub critic_loss: f64,
    /// Mean Q of the actor's actions (the actor maximizes it).
    pub q: f64,
}

/// The agent.
#[derive(Debug, Clone)]
pub struct Ddpg {
    actor: Mlp,
    critic: Mlp,
    actor_target: Mlp,
    critic_target: Mlp,
    replay: VecDeque<Transition>,
    rng: Rng,
    baseline: Option<f64>,
    state_dim: usize,
    o: DdpgOptions,
}

impl Ddpg {
    /// A fresh agent for states of `state_dim` features.
    pub fn new(state_dim: usize, o: DdpgOptions, seed: u64) -> Result<Self> {
        if o.hidden == 0 || o.batch == 0 || o.replay < o.batch {
            return Err(Error::invalid("ddpg", "hidden units and batch must be positive, the replay at least a batch"));
        }
        let actor = Mlp::new(&[state_dim, o.hidden, o.hidden, 1], Output::Sigmoid, 3e-3, seed)?;
        let critic = Mlp::new(&[state_dim + 1, o.hidden, o.hidden, 1], Output::Linear, 3e-3, seed ^ 0x5EED)?;
        Ok(Self {
            actor_target: actor.clone(),
            critic_target: critic.clone(),
            actor,
            critic,
            replay: VecDeque::new(),
            rng: Rng::new(seed.wrapping_mul(31).wrapping_add(7)),
            baseline: None,
            state_dim,
            o,
        })
    }

    /// μ(s), the greedy action.
    pub fn act(&self, state: &[f32]) -> Result<f32> {
        if state.len() != self.state_dim {
            return Err(Error::invalid(
                "ddpg",
                format!("state has {} features, expected {}", state.len(), self.state_dim),
            ));
        }
        Ok(self.actor.forward(state)?.0[0])
    }

    /// μ(s) plus normal noise of width `sigma`, truncated to `[lo, hi]` by redrawing (clipped
    /// after 64 draws, which only a σ far wider than the interval reaches).
    pub fn explore(&mut self, state: &[f32], sigma: f64, lo: f64, hi: f64) -> Result<f32> {
        let mu = self.act(state)? as f64;
        for _ in 0..64 {
            let a = mu + sigma * self.rng.normal();
            if (lo..=hi).contains(&a) {
                return Ok(a as f32);
            }
        }
        Ok(mu.clamp(lo, hi) as f32)
    }

    /// Uniform in `[lo, hi]` (warm-up episodes).
    pub fn random(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.rng.uniform()) as f32
    }

    /// Store a transition, dropping the oldest beyond capacity.
    pub fn remember(&mut self, t: Transition) {
        if self.replay.len() == self.o.replay {
            self.replay.pop_front();
        }
        self.replay.push_back(t);
    }

    /// Transitions stored.
    pub fn stored(&self) -> usize {
        self.replay.len()
    }

    /// Rows of `[state, action]` for the critic.
    fn joined(&self, states: &[f32], actions: &[f32]) -> Vec<f32> {
        let mut x = Vec::with_capacity(states.len() + actions.len());
        for (s, &a) in states.chunks_exact(self.state_dim).zip(actions) {
            x.extend_from_slice(s);
            x.push(a);
        }
        x
    }

    /// One update of critic, actor and targets from a random batch (`None` until the buffer
    /// holds a batch).
    pub fn update(&mut self) -> Result<Option<UpdateReport>> {
        let n = self.o.batch;
        if self.replay.len() < n {
            return Ok(None);
        }
        let batch: Vec<usize> = (0..n).map(|_| (self.rng.next_u64() % self.replay.len() as u64) as usize).collect();
        let (mut s, mut s2, mut a, mut r, mut done) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in &batch {
            let t = &self.replay[i];
            s.extend_from_slice(&t.state);
            s2.extend_from_slice(&t.next);
            a.push(t.action);
            r.push(t.reward as f64);
            done.push(t.done);
        }
        let mean = r.iter().sum::<f64>() / n as f64;
        let alpha = self.o.baseline_alpha;
        let b = self.baseline.map_or(mean, |b| (1.0 - alpha) * b + alpha * mean);
        self.baseline = Some(b);
        // Critic: regress Q(s, a) on r − b + γ Q'(s', μ'(s')).
        let (a2, _) = self.actor_target.forward(&s2)?;
        let (q2, _) = self.critic_target.forward(&self.joined(&s2, &a2))?;
        let y: Vec<f32> =
            (0..n).map(|i| (r[i] - b) as f32 + if done[i] { 0.0 } else { self.o.discount * q2[i] }).collect();
        let (q, cache) = self.critic.forward(&self.joined(&s, &a))?;
        let critic_loss = q.iter().zip(&y).map(|(&q, &y)| ((q - y) as f64).powi(2)).sum::<f64>() / n as f64;
        let dq: Vec<f32> = q.iter().zip(&y).map(|(&q, &y)| 2.0 * (q - y) / n as f32).collect();
        let (_, g) = self.critic.backward(&cache, &dq)?;
        self.critic.adam(&g, self.o.lr_critic)?;
        // Actor: ascend Q(s, μ(s)); the critic's input gradient at the action column.
        let (mu, actor_cache) = self.actor.forward(&s)?;
        let (qa, cache) = self.critic.forward(&self.joined(&s, &mu))?;
        let (dx, _) = self.critic.backward(&cache, &vec![-1.0 / n as f32; n])?;
        let da: Vec<f32> = dx.chunks_exact(self.state_dim + 1).map(|row| row[self.state_dim]).collect();
        let (_, g) = self.actor.backward(&actor_cache, &da)?;
        self.actor.adam(&g, self.o.lr_actor)?;
        self.actor_target.soft_update(&self.actor, self.o.tau);
        self.critic_target.soft_update(&self.critic, self.o.tau);
        Ok(Some(UpdateReport { critic_loss, q: qa.iter().map(|&v| v as f64).sum::<f64>() / n as f64 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-step task whose reward peaks at an action that depends on the state: the agent
    /// must learn the mapping, not a constant.
    #[test]
    fn learns_a_state_dependent_optimum() {
        let o =
            DdpgOptions { hidden: 32, lr_actor: 3e-3, lr_critic: 1e-2, batch: 32, replay: 512, ..Default::default() };
        let mut agent = Ddpg::new(1, o, 4).unwrap();
        let best = |s: f32| 0.25 + 0.5 * s;
        let mut rng = Rng::new(11);
        for episode in 0..600 {
            let s = rng.uniform() as f32;
            let a = if episode < 100 { agent.random(0.0, 1.0) } else { agent.explore(&[s], 0.2, 0.0, 1.0).unwrap() };
            let reward = -(a - best(s)).powi(2) * 10.0;
            agent.remember(Transition { state: vec![s], action: a, reward, next: vec![s], done: true });
            if episode >= 100 {
                agent.update().unwrap();
            }
        }
        for s in [0.1f32, 0.5, 0.9] {
            let a = agent.act(&[s]).unwrap();
            assert!((a - best(s)).abs() < 0.1, "state {s}: action {a}, best {}", best(s));
        }
        assert!(agent.act(&[0.1, 0.2]).is_err(), "wrong state size refused");
    }

    #[test]
    fn same_seed_same_agent() {
        let run = |seed| {
            let mut agent =
                Ddpg::new(2, DdpgOptions { hidden: 16, batch: 8, replay: 64, ..Default::default() }, seed).unwrap();
            for i in 0..40 {
                let a = agent.explore(&[0.3, i as f32 / 40.0], 0.5, 0.2, 1.0).unwrap();
                assert!((0.2..=1.0).contains(&a), "truncated to the interval");
                agent.remember(Transition {
                    state: vec![0.3, i as f32 / 40.0],
                    action: a,
                    reward: -a,
                    next: vec![0.3, (i + 1) as f32 / 40.0],
                    done: i % 10 == 9,
                });
                agent.update().unwrap();
            }
            agent.act(&[0.5, 0.5]).unwrap().to_bits()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
