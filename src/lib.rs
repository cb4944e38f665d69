//! klantreis: an open-source marketing-automation rules engine.
//!
//! Customers (attributes plus events) live in a [`store::Store`]; per journey a Rhai
//! rule in `rules/` maps each customer to a phase ([`rules`]); a [`nurture`] sweep
//! evaluates every customer and records the transitions. Every "now" comes from one
//! [`clock::Clock`], so tests and `--now` are deterministic.
//!
//! See `ARCHITECTURE.md` for the code map and its invariants.

pub mod actions;
pub mod clock;
pub mod config;
pub mod connectors;
pub mod diag;
pub mod explain;
#[cfg(feature = "fakes")]
pub mod fakes;
pub mod import;
pub mod model;
pub mod nurture;
pub mod outbox;
pub mod rules;
pub mod ruletest;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
pub mod time;
