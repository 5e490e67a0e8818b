//! Managed finAPI identities: the durable ledger of every finAPI user the broker creates
//! ([`store`]) and the keys their credentials are derived from ([`keys`]). The flows that
//! create, reuse and delete them are in `crate::flows::identities`.

pub mod keys;
pub mod store;
mod writer;

pub use store::*;
