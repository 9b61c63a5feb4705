//! One file per subcommand: each turns its parsed arguments into running services under
//! one `Supervisor` and returns when they have stopped. The services themselves live in
//! the library crates; a command only wires them together, in the order they stop.

pub(crate) mod compact;
pub(crate) mod history;
pub(crate) mod ingest;
pub(crate) mod loadgen;
pub(crate) mod process;
pub(crate) mod run;
pub(crate) mod simulate;
pub(crate) mod sql;
pub(crate) mod sql_server;
