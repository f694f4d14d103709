//! Running a request in a guest: the wasmtime engines and the linker
//! (`engine`), Cranelift's per-function code kept between compiles
//! (`function_cache`), the per-request store data (`state`), a compiled guest ready
//! to run (`Guest`), instances fresh per request (`instance`) or waiting for
//! the next one (`pools`: the warm pool and the workers), the
//! call itself with its deadline and the mapping of every failure to an HTTP
//! answer (`invoke`), the instances of WASI 0.3 services, which may serve
//! several requests at once (`worker`), request and response bodies (`body`) and the guest's
//! stdout and stderr (`stdio`).
//!
//! Uses: `capabilities`, `base`. Used by: `deploy` and everything above it.

pub(crate) mod body;
pub(crate) mod compiled;
pub mod engine;
pub(crate) mod failure;
pub mod function_cache;
pub(crate) mod instance;
pub mod invoke;
pub(crate) mod pools;
pub mod scheduler;
pub mod source_map;
pub mod state;
pub mod stdio;
pub(crate) mod worker;

pub use compiled::{Guest, GuestExports, GuestPolicy};
