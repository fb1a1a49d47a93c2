//! The host: the Lua state a recipe runs in, signals, the run context and the guard that
//! writes the final checkpoint however the script ends.

pub mod checkpointing;
pub mod context;
pub mod guard;
pub mod lua;
pub mod signals;

/// Resuming was refused (the checkpoint does not fit the recipe): exit 2, nothing written.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for Refused {}

/// Training diverged; the diverged state was already written beside the good checkpoint.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for Diverged {}

/// Exit codes of DESIGN.md §3.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const PANIC: i32 = 101;
    pub const SAVE_FAILED: i32 = 74;
}
