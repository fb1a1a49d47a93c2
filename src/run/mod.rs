//! A run: what the host knows beyond the Lua state (options, the session and loaders to
//! checkpoint, metrics), the one path every training step goes through (`step`), what a resume
//! must match (`resume`), deciding and doing saves (`checkpointing`) and the guard that writes
//! the final checkpoint however the script ends (`guard`).

pub mod checkpointing;
pub mod context;
pub mod golden;
pub mod guard;
pub mod lock;
pub mod metrics;
pub mod resume;
pub mod step;
pub mod tensorboard;

pub use context::{RunContext, RunOptions, SharedContext};
