//! Wharf's integration tests: real hosts on ephemeral ports, real HTTP, real
//! guests built from `guests/`. One test binary; modules by area.

mod support;

mod cli;
mod embed;
mod reload;
mod serving;
