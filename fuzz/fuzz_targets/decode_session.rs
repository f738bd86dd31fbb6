//! The session's messages: the client's SESSION_INIT request and ATTACH, on arbitrary bytes
//! (see `checks.rs`). `decode_payloads` runs the same check among all the others; this target
//! gives the session's decoders fuzzing time of their own.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared checks; the others are dead code here.
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_session(data));
