pub mod keys;
pub mod store;
pub use store::*;
