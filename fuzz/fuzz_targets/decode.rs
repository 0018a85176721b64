//! The envelope decoder on arbitrary bytes: it must never panic, and a
//! refusal must quote at most `QUOTE_LIMIT` characters of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::{Codec, QUOTE_LIMIT};

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Probe {
    #[allow(dead_code)]
    n: u32,
    #[allow(dead_code)]
    s: String,
}

impl switchboard::Event for Probe {
    const TYPE: &'static str = "fuzz.probe";
    const VERSION: &'static str = "1.0";
}

fuzz_target!(|bytes: &[u8]| {
    let codec = Codec::default();
    if let Err(error) = codec.decode::<Probe>(bytes) {
        assert!(error.to_string().chars().count() <= 4 * QUOTE_LIMIT + 200);
    }
    let _ = codec.decode_value(bytes);
});
