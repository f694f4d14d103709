//! How a version is built: compiled in lanes ([`compiler`]) or loaded
//! from the compiled-code cache ([`cache`]), Winch first with Cranelift in
//! the background ([`tiering`]), then linked, checked and probed
//! ([`link`]) into a [`Deployment`](deployment::Deployment).

pub mod cache;
pub(crate) mod compiler;
pub mod deployment;
pub(crate) mod link;
pub(crate) mod tiering;
