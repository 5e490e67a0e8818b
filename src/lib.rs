//! giroident-broker: hands out finAPI user access tokens for GiroIdent KYC checks while
//! keeping the finAPI client secrets on the server.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod demo;
pub mod finapi;
pub mod flows;
pub mod healthcheck;
pub mod identities;
pub mod random;
pub mod reload;
pub mod resilience;
pub mod sim;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod token_cache;
