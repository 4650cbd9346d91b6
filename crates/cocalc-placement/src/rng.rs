//! A small seedable random source for strategies and jitter, so that the
//! simulator (and tests) can fix every random choice with a seed.

use std::sync::atomic::{AtomicU64, Ordering};

/// SplitMix64 over an atomic counter: thread-safe, lock-free, and fully
/// determined by its seed (for a given sequence of calls).
#[derive(Debug)]
pub struct SeededRng(AtomicU64);

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(AtomicU64::new(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`), by Lemire's multiply-shift.
    pub fn below(&self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// A float in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_in_range() {
        let (a, b) = (SeededRng::new(7), SeededRng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let r = SeededRng::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let x = r.below(10);
            seen[x] += 1;
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
