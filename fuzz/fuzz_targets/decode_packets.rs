//! The packet decoders on arbitrary bytes: `Decoder` fed in chunks whose size comes from the
//! input, and `decode_all` on the whole. Neither may panic; both must agree; every packet they
//! accept must re-encode to exactly the bytes it was decoded from (see `checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared checks; the other is dead code here.
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_packets(data));
