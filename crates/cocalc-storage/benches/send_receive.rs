//! Placeholder: the send/receive benchmark lands in a later commit.
fn main() {}
