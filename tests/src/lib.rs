//! Whole-system tests live in `tests/*.rs` of this package; this library is empty.
