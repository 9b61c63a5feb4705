//! The lines the binary prints on stdout once a listener is bound, one per listener:
//! the prefix below, then the address. Whatever starts the binary (a test harness, the
//! benchmark, a script) waits for these lines to learn where each service listens,
//! so the binary and its readers share these strings rather than repeating them.

/// The HTTP API of `run` and `ingest`: followed by `host:port`.
pub const API: &str = "dronedelivery listening on http://";

/// The HTTP API of `sql-server`: followed by `host:port`.
pub const SQL_SERVER: &str = "sql server listening on http://";

/// Arrow Flight SQL: followed by `host:port`.
pub const FLIGHT_SQL: &str = "flight sql on grpc://";

/// The health listener of `process`, `history` and `simulate`: followed by `host:port`.
pub const HEALTH: &str = "health on http://";

/// The embedded broker of `run`: followed by its bootstrap servers.
pub const EMBEDDED_BROKER: &str = "embedded broker on ";

/// The line `what` prints for `address`.
pub fn line(what: &str, address: impl std::fmt::Display) -> String {
    format!("{what}{address}")
}
