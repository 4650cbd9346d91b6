//! Boxed async streams used across trait boundaries.

use std::pin::Pin;

use bytes::Bytes;
use futures_core::Stream;

/// A stream of byte chunks that may fail part-way (a `btrfs send` stream, a
/// terminal's output). A stream that ends with `Err` was cut: consumers must
/// treat everything received so far as incomplete.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + 'static>>;

/// A boxed stream of arbitrary items.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send + 'static>>;
