//! Sampling text from a model: temperature, top-k, a seed of its own.

use super::Llama;
use crate::util::rng::Rng;
use candle_core::Result;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Generation ends early when this token is drawn (the end-of-document token).
    pub stop_token: Option<u32>,
    /// Keep keys and values between tokens (off: recompute the window for every token, the
    /// reference the cache is checked against).
    pub cache: bool,
}

/// Continue `prompt` by up to `max_tokens` tokens. `should_stop` is polled between tokens so a
/// Ctrl+C does not wait for a long generation to finish.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &SampleOptions,
    should_stop: &dyn Fn() -> bool,
) -> Result<Vec<u32>> {
    let mut rng = Rng::new(opts.seed);
    let mut tokens: Vec<u32> = prompt.to_vec();
    if tokens.is_empty() {
        // An empty prompt starts a fresh document.
        tokens.push(opts.stop_token.unwrap_or(0));
    }
    let prompt_len = tokens.len();
    let window = model.config.seq_len;
    // A key/value cache: each new token costs one token's pass, not the window's. The CPU has
    // its own; other devices keep tensors.
    let mut cpu_cache =
        (opts.cache && model.has_cpu_step()).then(|| super::cpu::decode::KvCache::new(model));
    let mut tensor_cache =
        (opts.cache && !model.has_cpu_step()).then(|| super::KvTensors::new(model));
    let mut fed = 0;
    for _ in 0..opts.max_tokens {
        if should_stop() {
            candle_core::bail!("interrupted");
        }
        let last = match (cpu_cache.as_mut(), tensor_cache.as_mut()) {
            (Some(c), _) => super::cpu::decode::next_logits(model, c, &tokens[fed..])?,
            (None, Some(c)) => model.next_logits_cached(c, &tokens[fed..])?,
            (None, None) => {
                let start = tokens.len().saturating_sub(window);
                model.logits(&tokens[start..], 1)?
            }
        };
        fed = tokens.len();
        let next = sample(last, opts, &mut rng)?;
        if Some(next) == opts.stop_token {
            break;
        }
        tokens.push(next);
    }
    Ok(tokens[prompt_len.min(tokens.len())..].to_vec())
}

fn sample(logits: Vec<f32>, opts: &SampleOptions, rng: &mut Rng) -> Result<u32> {
    if opts.temperature <= 0.0 {
        // The first of equal maxima, as candle's argmax picks.
        let best = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            });
        return Ok(best.0 as u32);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if let Some(k) = opts.top_k.filter(|&k| k > 0 && k < logits.len()) {
        // Stable order (ties by index) keeps sampling deterministic.
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    let max = idx
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) as f64) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.next_f64() * total;
    for (w, &i) in weights.iter().zip(&idx) {
        if r < *w {
            return Ok(i as u32);
        }
        r -= w;
    }
    Ok(*idx.last().unwrap_or(&0) as u32)
}
