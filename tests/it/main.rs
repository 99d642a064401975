//! The integration tests, as one binary (one link of the crate instead of one per file): each
//! module is one area of the hub, tested through its public API, stock clients and real sockets
//! or ptys. Tests that must run alone (`crash`, `soak`: the hub binary under SIGKILL, long runs;
//! `replay_bench`: measurements) stay separate binaries.
//!
//! Run one area: `cargo test --test it serial::` (module path filter).

#[path = "../common/mod.rs"]
mod common;

mod compat;
mod device_cli;
mod doctor;
mod downlink;
mod emulator;
mod emulator_fidelity;
mod hostile;
mod hub;
mod layout;
mod local_front;
mod mode_fidelity;
mod ops;
mod ops_limits;
mod page;
mod reload;
mod serial;
mod serial_line_props;
mod store_forward;
