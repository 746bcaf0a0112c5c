//! What is read back from disk and trusted only after checking: an artifact's
//! `meta.json` and the signed fields in its labels, a split's `parts.json`, and names,
//! digests, sizes and durations that came from outside.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<nexa_shared::artifact::Meta>(data);
    let _ = serde_json::from_slice::<nexa_shared::shard::Split>(data);
    // The signed fields an artifact's labels carry, as `nexa verify` reads them.
    if let Ok(s) = serde_json::from_slice::<nexa_shared::provenance::Signed>(data) {
        let _ = s.verify();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = nexa_shared::paths::check_relative_name(s);
        let _ = nexa_shared::paths::contained(std::path::Path::new("/root/project"), s);
        let _ = nexa_shared::paths::safe_component(s);
        let _ = nexa_shared::digest::parse(s);
        let _ = nexa_shared::units::parse_size(s);
        let _ = nexa_shared::units::parse_duration(s);
    }
});
