//! The `wharf` command's own room: one module per subcommand that is more
//! than a call into the library. It uses only the library's public API.

pub mod dev;
