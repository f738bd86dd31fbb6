//! Deterministic test data and hashing.

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Size of the chunks [`SeededBytes::write_to`] generates and writes at a time.
pub const WRITE_CHUNK: usize = 64 * 1024;

/// An endless pseudo-random byte stream fully determined by its seed (xorshift64* over u64
/// words, little-endian). The same seed gives the same bytes however the stream is sliced
/// into `fill` calls, so a receiver can recompute what a sender sent.
#[derive(Debug, Clone)]
pub struct SeededBytes {
    state: u64,
    /// Bytes of the current word not handed out yet: `word[pending_from..]`.
    word: [u8; 8],
    pending_from: usize,
}

impl SeededBytes {
    pub fn new(seed: u64) -> SeededBytes {
        // xorshift must not start at zero; mixing also spreads nearby seeds apart.
        let state = splitmix64(seed) | 1;
        SeededBytes {
            state,
            word: [0; 8],
            pending_from: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut out = buf;
        // Finish the partly used word first.
        let pending = (8 - self.pending_from).min(out.len());
        out[..pending].copy_from_slice(&self.word[self.pending_from..self.pending_from + pending]);
        self.pending_from += pending;
        out = &mut out[pending..];
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            rest.copy_from_slice(&self.word[..rest.len()]);
            self.pending_from = rest.len();
        }
    }

    /// The next `len` bytes as a vector.
    pub fn take_vec(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }

    /// Writes the next `len` bytes to `writer` in [`WRITE_CHUNK`] pieces and returns their
    /// SHA-256. Does not flush or shut down.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        len: u64,
    ) -> std::io::Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut left = len;
        while left > 0 {
            let n = left.min(WRITE_CHUNK as u64) as usize;
            self.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            writer.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        Ok(hasher.finalize().into())
    }
}

/// The SHA-256 of the first `len` bytes of the stream seeded with `seed`.
pub fn seeded_sha256(seed: u64, len: u64) -> [u8; 32] {
    let mut gen = SeededBytes::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(WRITE_CHUNK as u64) as usize;
        gen.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    hasher.finalize().into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex of a digest, for messages.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_whatever_the_slicing() {
        let whole = SeededBytes::new(42).take_vec(1000);
        let mut gen = SeededBytes::new(42);
        let mut pieces = Vec::new();
        for size in [1usize, 3, 8, 13, 0, 7, 64, 904] {
            pieces.extend(gen.take_vec(size));
        }
        assert_eq!(pieces, whole);
    }

    #[test]
    fn different_seeds_differ_and_bytes_are_not_constant() {
        let a = SeededBytes::new(1).take_vec(64);
        let b = SeededBytes::new(2).take_vec(64);
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
        // Seed 0 must not produce the all-zero stream of a zero xorshift state.
        assert!(SeededBytes::new(0).take_vec(64).iter().any(|&x| x != 0));
    }

    #[test]
    fn seeded_sha256_matches_hash_of_generated_bytes() {
        let len = 200_003;
        let data = SeededBytes::new(9).take_vec(len);
        assert_eq!(seeded_sha256(9, len as u64), sha256(&data));
    }

    #[tokio::test]
    async fn write_to_writes_the_stream_and_returns_its_hash() {
        let mut out = Vec::new();
        let digest = SeededBytes::new(5)
            .write_to(&mut out, 150_000)
            .await
            .unwrap();
        assert_eq!(out, SeededBytes::new(5).take_vec(150_000));
        assert_eq!(digest, sha256(&out));
    }
}
