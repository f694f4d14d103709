//! What a guest may reach beyond its own memory, each capability behind the
//! grant in its manifest and nothing granted by default: today outbound HTTP
//! (`capabilities::outbound`), which also carries in-process calls to other
//! services at `http://NAME.internal`.
//!
//! Each capability is one module (with its backends beside it) holding its
//! policy, its per-request context and its host-side implementation, generic
//! over the store the way wasmtime's WASI crates are; the guest layer puts
//! the contexts into its store and the bindings into its linker.
//!
//! Uses: `base`. Used by: `guest` and everything above it.

pub mod outbound;
