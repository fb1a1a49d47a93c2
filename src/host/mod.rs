//! The process around a run: the Lua state a recipe runs in, signals, and human output.
//! The host knows nothing of the `wick` API or of runs: `setup` wires them together.

pub mod lua;
pub mod output;
pub mod progress;
pub mod signals;
pub mod threads;
