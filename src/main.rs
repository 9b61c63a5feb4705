//! `dronedelivery`: parses the command line, sets up logs, and dispatches to the
//! subcommand's file under `commands/`. Nothing here decides anything about deliveries,
//! and nothing here starts a service.
#![allow(clippy::print_stdout)]

mod backpressure;
mod broker;
mod cli;
mod commands;
mod diagnostics;
mod history_sql;
mod listeners;
mod supervisor;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command};

// mimalloc: the pipeline allocates per record (headers, keys, JSON); glibc's allocator
// took about a third of the processors' CPU in a profile, and mimalloc made them 10-20%
// faster (`cargo bench --bench processors`). Its `override` feature (in the workspace's
// Cargo.toml) makes it C's malloc too, for librdkafka's per-message allocations: the
// ingestion tier accepted 37% more records per second with it. Transparent huge pages
// are turned off (`huge_pages.rs`): clearing them took 12% of `run`'s CPU in a profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        // Everything is typed, so parsing was the check.
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    diagnostics::init_logging(&cli.log, cli.log_format);
    dronedelivery::huge_pages::turn_off();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => commands::run::run(*args).await,
            Command::Ingest(args) => commands::ingest::run(*args).await,
            Command::Process(args) => commands::process::run(*args).await,
            Command::History(args) => commands::history::run(*args).await,
            Command::SqlServer(args) => commands::sql_server::run(*args).await,
            Command::Sql(args) => commands::sql::run(args).await,
            Command::Compact(args) => commands::compact::run(args).await,
            Command::Simulate(args) => commands::simulate::run(*args).await,
            Command::Loadgen(config) => commands::loadgen::run(*config).await,
        }
    });
    // librdkafka and DataFusion may leave blocking threads behind; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
