//! Serial-number arithmetic on 32-bit sequence numbers (RFC 1982): numbers wrap around, and
//! `a` is "before" `b` when the forward distance from `a` to `b` is less than 2^31. Used for
//! the per-direction sequence numbers and acks of docs/protocol.md §4.

/// Forward distance from `from` to `to`, wrapping.
#[inline]
pub fn distance(from: u32, to: u32) -> u32 {
    to.wrapping_sub(from)
}

/// `a < b` in serial-number order.
#[inline]
pub fn lt(a: u32, b: u32) -> bool {
    a != b && distance(a, b) < 0x8000_0000
}

/// `a <= b` in serial-number order.
#[inline]
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_wraps() {
        assert!(lt(1, 2));
        assert!(!lt(2, 1));
        assert!(lt(u32::MAX, 0));
        assert!(lt(u32::MAX - 5, 3));
        assert!(!lt(3, u32::MAX - 5));
        assert!(le(7, 7));
        assert!(!lt(7, 7));
        assert_eq!(distance(u32::MAX, 1), 2);
    }
}
