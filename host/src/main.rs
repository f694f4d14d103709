//! The `wharf` command line: a thin shell over the library (see `cli/`).

use anyhow::Result;
use clap::Parser as _;

mod cli;

fn main() -> Result<()> {
    // Errors that are expected on the request path (a client's malformed
    // body, a guest's failed read) must not capture a backtrace each: with
    // RUST_BACKTRACE=1, anyhow and wasmtime errors did, and the first one
    // formatted loaded the debug info for good (175 MiB of RSS). Panics keep
    // their backtraces (they follow RUST_BACKTRACE alone); set
    // RUST_LIB_BACKTRACE=1 to have error backtraces too.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    cli::run(cli::Cli::parse())
}
