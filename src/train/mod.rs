//! Training: the session that owns model + optimizer state, and the optimizer itself.
pub mod optim;
pub mod session;

pub use optim::{AdamW, AdamWConfig};
pub use session::{Session, StepError, Windows};
