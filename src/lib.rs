//! wick: a training host for language models. Lua recipes decide the data schedule; the host
//! owns the model, the training and the promise that a final checkpoint is written however the
//! run ends. See ARCHITECTURE.md for the map; data flows one way:
//! recipe → `api` (bindings) → `run` (context, per-step policy, guard) → `data` / `model` /
//! `train` / `ckpt`. `host` is the process around it (Lua state, signals, output); `setup` wires
//! a run together for every entry point in `cmd`.

pub mod api;
pub mod ckpt;
pub mod cmd;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod host;
pub mod model;
pub mod run;
pub mod setup;
pub mod train;
pub mod util;

pub use error::{Error, Result};
