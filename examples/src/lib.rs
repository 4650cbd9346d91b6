//! Examples only: see `examples/*.rs` and the README beside them.
