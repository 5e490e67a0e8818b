//! A local simulator of the finAPI endpoints the broker uses (see `finapi-reference.md`).
