//! Every typed payload decoder (LINK_INIT with its pool extension, CONN_INIT to the broker,
//! CONN_OPTION, LISTEN_STATE in its 1- and 9-byte forms,
//! selective acks, token, reason) on arbitrary bytes (see `checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared checks; the other is dead code here.
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_payloads(data));
