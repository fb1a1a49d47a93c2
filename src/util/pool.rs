//! Running compute on rayon's pool.

/// Run `work` on one of rayon's threads (in place when already on one), returning its result.
///
/// A training step forks and joins a few hundred times. Called from outside the pool, every
/// one of those hands a job over and puts the caller to sleep until it is done — a futex wait
/// and wake each time, with three threads taking turns on the cores; from inside the pool
/// each is a plain join that the other worker steals from. Measured on the small-bytes step
/// (2 cores, bf16): +5–14 % tokens/s.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
