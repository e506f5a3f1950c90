//! `dcs-emulator` binary: parses flags, sets up logging (stderr), runs.

use std::process::ExitCode;

use clap::Parser;
use dcs_emulator::options::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match dcs_emulator::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dcs-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
