//! The broker link's messages: LINK_INIT with and without its pool extension (instance id,
//! keepalive, capacity) and LISTEN_STATE in its 1- and 9-byte forms, on arbitrary bytes (see
//! `checks.rs`). `decode_payloads` runs the same check among all the others; this target gives
//! the link's decoders fuzzing time of their own.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared checks; the others are dead code here.
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_link(data));
