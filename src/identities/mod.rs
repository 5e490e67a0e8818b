//! Managed finAPI identities (issue 12): the durable ledger of every finAPI user the broker
//! creates, and (later) the flows that reuse and delete them.

pub mod store;

pub use store::*;
