//! The pipeline loader and validator on arbitrary text: every input gets a list of
//! diagnostics or a pipeline, never a panic, and never more memory than the caps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = nexa_shared::spec::check_str("fuzz.yaml", text, std::path::Path::new("/nonexistent"));
});
