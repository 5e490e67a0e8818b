//! giroident-broker: hands out finAPI user access tokens for GiroIdent KYC checks while
//! keeping the finAPI client secrets on the server.
#![forbid(unsafe_code)]

pub mod sim;
