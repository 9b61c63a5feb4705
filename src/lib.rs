//! The `dronedelivery` package's library side: what the binary shares with the programs
//! that start it (the integration tests, the end-to-end benchmark) and with the benches
//! that measure its parts as it runs them. It holds no service logic; the services live
//! in their own crates.

pub mod announce;
pub mod huge_pages;
