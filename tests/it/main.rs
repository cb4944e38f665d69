//! The one integration-test binary. Each module covers one boundary; `support` has
//! the helpers (temp dirs, the CLI runner, fakes).

mod actions;
mod cli;
mod connectors;
mod service;
mod support;
