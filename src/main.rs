//! wick's command line: parse, dispatch, print the one error line, exit with its code.

use clap::Parser;
use std::process::ExitCode;
use wick::cmd::{dispatch, Cli};

fn main() -> ExitCode {
    // Rust backtraces belong in bug reports, not in messages about a user's recipe.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    wick::host::threads::init_compute_threads();
    let code = match dispatch(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            wick::host::progress::error(&e.message);
            e.exit_code()
        }
    };
    // A launcher reports ranks that exit without leaving the MPI group as failures.
    wick::dist::finish();
    ExitCode::from(code.clamp(0, 255) as u8)
}
