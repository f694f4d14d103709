//! Wharf's integration tests: real hosts on ephemeral ports, real HTTP, real
//! guests built from `guests/`. One test binary; modules by area.

mod support;

mod cache;
mod calls;
mod cli;
mod cluster;
mod commands;
mod dashboard;
mod docs;
mod embed;
mod encryption;
mod hostile;
mod javascript;
mod kafka;
mod keyvalue;
mod languages;
mod least_privilege;
mod manifest;
mod messaging;
mod observability;
mod redundancy;
mod reload;
mod reuse;
mod serving;
mod tiers;
mod uploads;
mod wasi_p3;
