//! tokenvault: a privacy data vault.
//!
//! Internal services send sensitive values (e-mail addresses, card numbers,
//! ...) over mutual-TLS gRPC and get opaque tokens back; the values are
//! encrypted with AES-256-GCM-SIV under envelope keys and stored in an
//! embedded RocksDB. Reading a value back needs a scope for its field type
//! and an allowed purpose, both granted to the caller's certificate identity.
//!
//! # Module map
//!
//! Layers call downwards only: `api` → `authz` → `vault` → `crypto` + `store`.
//!
//! - [`server`]: wiring and lifecycle: TLS termination, listeners, health, drain.
//! - [`api`]: gRPC handlers; the only place errors become `tonic::Status`.
//! - [`authz`]: scopes, purposes, the policy, and [`authz::Permit`]s.
//! - [`audit`]: audit events, signed checkpoints, offline verification.
//! - [`report`]: the records of processing (Art. 30) from the config, the
//!   store and the audit trail; JSON, Markdown, HTML with an SVG chart.
//! - [`identity`]: the caller's [`identity::ClientId`] from its certificate.
//! - [`vault`]: tokenize and detokenize over any [`store::Store`].
//! - [`crypto`]: AES-256-GCM-SIV envelope encryption and secret types.
//! - [`store`]: the storage trait and its RocksDB engine.
//! - [`layout`]: every storage key the vault writes, and its on-disk name.
//! - [`fields`]: field types: validation, normalisation, token formats, masks.
//! - [`token`]: the [`token::Token`] and [`token::FieldType`] types.
//! - [`config`]: figment layers into a validated [`config::Config`].
//! - [`client`], [`dev`], [`pki`], [`cli`]: the command-line tool's parts.
//! - [`shared`]: values a reload replaces while requests run.
//! - [`metrics`]: Prometheus counters and histograms, served on the metrics port.
//! - [`hardening`]: no core dumps, optional locked memory.
//! - [`bench`]: `tokenvault bench`, load over real mTLS next to its ceilings.
//! - [`fuzzing`]: the fuzz targets' bodies (cargo-fuzz in `fuzz/`, corpus replay in the tests).
//!
//! # Invariants
//!
//! - The vault core never sees tonic or prost types.
//! - Plaintext never reaches the store, and lives only in
//!   [`crypto::SecretValue`], which zeroizes and never prints.
//! - No vault operation runs without a [`authz::Permit`].
//! - Nothing above `store` names RocksDB, except the `server` wiring.

/// The commit this binary was built from (`git describe --always --dirty`
/// at build time), or `unknown` outside a git checkout.
pub const BUILD_COMMIT: &str = env!("TV_BUILD_COMMIT");

pub mod api;
pub mod audit;
pub mod authz;
#[cfg(feature = "testkit")]
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod fields;
#[cfg(feature = "testkit")]
pub mod fuzzing;
pub mod hardening;
pub mod identity;
pub mod layout;
pub mod metrics;
pub mod pki;
pub mod proto;
pub mod report;
pub mod server;
pub mod shared;
pub mod store;
pub mod token;
pub mod vault;

#[cfg(test)]
#[cfg(feature = "testkit")]
mod robustness_tests;
