//! The signed envelopes: results and enrolment answers with arbitrary fields verify or
//! fail, never panic, and a forged one never verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexa_proto::v1;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if data.len() < 64 {
        return;
    }
    let (key, rest) = data.split_at(32);
    let key: [u8; 32] = key.try_into().unwrap_or([0; 32]);
    let (nonce, sig) = rest.split_at(32);
    assert!(nexa_shared::signing::verify_enrolment(&key, nonce, sig).is_err() || sig.len() == 64);
    if let Ok(m) = v1::JobResult::decode(rest)
        && let Ok(r) = nexa_shared::job::JobResult::try_from(m)
    {
        let _ = nexa_shared::signing::verify_result(&key, &r);
    }
});
