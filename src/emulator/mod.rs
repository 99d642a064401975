//! MODE cloud emulator: a stand-in for MODE's device-facing cloud (REST, command WebSocket and
//! device MQTT) used by tests, benchmarks and `modehub demo`/`modehub emulator`. This file holds
//! the public surface: the seed (projects, homes, devices, keys), the configuration and the
//! [`Behaviour`] choices made where MODE's real behaviour is unconfirmed, run-time [`Faults`],
//! the [`Emulator`] that owns the listeners, the cloneable [`EmulatorHandle`] used to inspect
//! and steer it, and the CLI entry [`run_cli`]. It must not contain wire-protocol code (that is
//! in `mqtt.rs` and `http.rs`) and it must never be used by the hub's production code paths:
//! it is a test tool that trusts its seed, keeps everything in memory and never logs API keys.

mod cli;
mod config;
mod handle;
mod http;
mod mqtt;
mod records;
mod seed;
mod shared;
mod state;

pub use cli::{run_cli, EmulatorArgs};
pub use config::{Behaviour, DeactivatedHome, EmulatorConfig, Faults, ASSUMED_ENV};
pub use handle::{Emulator, EmulatorHandle};
pub use records::{CommandError, DeviceStatus, KvError, RecordedEvent, Stats, Transport};
pub use seed::{Permission, Seed, SeedDevice, SeedHome, SeedProjectKey, SeedUser};
pub(crate) use shared::Shared;
