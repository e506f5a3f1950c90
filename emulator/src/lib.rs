//! dcs-emulator: a local, faithful server for the Dedalus Machines API.
//!
//! Module map:
//! - [`options`]: flags, timing knobs, duration/autosleep parsing
//! - [`server`]: the shared application object, persistence, change
//!   notification
//! - [`state`]: durable model, per-machine indexes, retention
//! - [`store`]: one file per record under `records/`
//! - [`prune`]: the retention ticker
//! - [`lifecycle`]: phase transitions, hold window, autosleep
//! - [`exec`]: execution processes
//! - [`terminal`]: PTY sessions
//! - [`sandbox`]: one isolated sandbox per awake machine
//! - [`proc`]: signals to machine processes (the only `unsafe`)
//! - [`routes`]: HTTP routes; [`auth`], [`drift`], [`idempotency`], [`faults`],
//!   [`reqlog`]: the `/v1` middleware stack
//! - [`errors`], [`views`], [`pagination`], [`util`]: shapes and helpers

pub mod auth;
pub mod drift;
pub mod errors;
pub mod exec;
pub mod faults;
pub mod idempotency;
pub mod lifecycle;
pub mod options;
pub mod pagination;
pub mod proc;
pub mod prune;
pub mod reqlog;
pub mod routes;
pub mod sandbox;
pub mod server;
pub mod state;
pub mod store;
pub mod terminal;
pub mod util;
pub mod views;

use axum::serve::ListenerExt as _;
use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use crate::options::{Args, Isolation, Timing};
use crate::server::App;

/// Loads state, binds, prints the listening line, and serves until SIGINT
/// or SIGTERM; then ends every machine process.
pub async fn run(args: Args) -> Result<(), String> {
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("machines"))
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let (mut state, migrated) = load_state(&data_dir)?;
    let recovered = state.recover_after_restart(Timing::from_args(&args).hold_window_ms);
    let known: HashSet<String> = state.machines.keys().cloned().collect();
    // Processes do not survive a restart (sandboxes included).
    if !known.is_empty() {
        let _ = tokio::task::spawn_blocking(move || proc::kill_marked(|v| known.contains(v), None))
            .await;
    }
    let sandboxes = sandbox::from_flag(args.isolation, &data_dir).await?;
    announce_isolation(args.isolation);

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let app = Arc::new(App::new(args, state, addr, sandboxes));
    if recovered || migrated {
        app.persist().await;
    }
    if migrated {
        store::retire_legacy(&data_dir).map_err(|e| e.to_string())?;
        tracing::info!("migrated state.json to records/");
    }

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "dcs-emulator listening on http://{addr}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    tracing::info!(%addr, data_dir = %data_dir.display(), "serving");

    lifecycle::spawn_autosleep(app.clone());
    prune::spawn_pruner(app.clone());
    // Nagle off on every accepted connection: a terminal's output goes out
    // as many small WebSocket frames, and with Nagle on each one after the
    // first waits for the client's delayed ACK (about 40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, routes::router(app.clone()));
    tokio::select! {
        r = server => r.map_err(|e| format!("server error: {e}"))?,
        () = shutdown_signal() => tracing::info!("shutting down"),
    }
    app.sandboxes.stop_all().await;
    let ids: HashSet<String> = app.state().machines.keys().cloned().collect();
    let _ = tokio::task::spawn_blocking(move || proc::kill_marked(|v| ids.contains(v), None)).await;
    app.persist().await;
    Ok(())
}

/// One line on stderr when machines are not isolated.
fn announce_isolation(isolation: Isolation) {
    match isolation {
        Isolation::Namespaces => {
            tracing::info!("isolation: one sandbox per machine (bubblewrap namespaces)");
        }
        Isolation::None => eprintln!(
            "dcs-emulator: --isolation none: machine commands run directly on this host, \
             unisolated"
        ),
    }
}

/// The records under `records/`, or an earlier version's `state.json`
/// (then `true`: it is to be written as records and retired).
fn load_state(data_dir: &std::path::Path) -> Result<(state::State, bool), String> {
    store::create_dirs(data_dir).map_err(|e| e.to_string())?;
    if let Some(legacy) = store::load_legacy(data_dir).map_err(|e| e.to_string())? {
        return Ok((legacy, true));
    }
    Ok((store::load(data_dir).map_err(|e| e.to_string())?, false))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
