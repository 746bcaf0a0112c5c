//! Ed25519 signatures over a domain-separated canonical byte string, never over a
//! serialised map. A worker's key is its identity.

use crate::error::IoContext;
use crate::job::JobResult;
use crate::{Error, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

/// Domain separator of result manifests.
pub const RESULT_DOMAIN: &[u8] = b"nexa/v1/result";

fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// The canonical bytes a worker signs for a result: the domain, then job id, generation,
/// attempt, outcome, exit code, every output (name, path, size, digest) in order, start
/// and end. Free-text error messages are not signed.
pub fn result_message(r: &JobResult) -> Vec<u8> {
    let mut b = Vec::with_capacity(128 + r.outputs.len() * 96);
    field(&mut b, RESULT_DOMAIN);
    field(&mut b, r.job_id.as_bytes());
    b.extend_from_slice(&r.generation.to_le_bytes());
    b.extend_from_slice(&r.attempt.to_le_bytes());
    field(&mut b, r.outcome.as_str().as_bytes());
    match r.exit_code {
        Some(c) => {
            b.push(1);
            b.extend_from_slice(&c.to_le_bytes());
        }
        None => b.push(0),
    }
    b.extend_from_slice(&(r.outputs.len() as u64).to_le_bytes());
    for o in &r.outputs {
        field(&mut b, o.output.as_bytes());
        field(&mut b, o.path.as_bytes());
        b.extend_from_slice(&o.size.to_le_bytes());
        field(&mut b, o.digest.as_bytes());
    }
    b.extend_from_slice(&r.started_ms.to_le_bytes());
    b.extend_from_slice(&r.ended_ms.to_le_bytes());
    b
}

/// A worker's signing identity.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", hex::encode(self.public_key()))
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Loads the key at `path`, or creates it there with mode 0600.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    Error::Signature(format!("{} is not a 32-byte Ed25519 key", path.display()))
                })?;
                Ok(Self {
                    key: SigningKey::from_bytes(&arr),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let id = Self::generate();
                let dir = path.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir).ctx("create", dir)?;
                // Written whole under a private name, then linked into place (atomic, and
                // refused if the name exists): two processes creating the key at once
                // both end up with the one that won, never a partial or a "File exists".
                let tmp = dir.join(format!(
                    ".{}.{}.tmp",
                    path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
                    hex::encode(Self::generate().public_key())
                ));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .ctx("create", &tmp)?;
                f.write_all(&id.key.to_bytes()).ctx("write", &tmp)?;
                f.sync_all().ctx("fsync", &tmp)?;
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(id),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(e) => Err(Error::io("create", path, e)),
                }
            }
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `result` in place (sets key and signature).
    pub fn sign_result(&self, result: &mut JobResult) {
        result.worker_key = self.public_key();
        result.signature = self.key.sign(&result_message(result)).to_bytes().to_vec();
    }
}

/// Domain separator of enrolment challenges.
pub const ENROL_DOMAIN: &[u8] = b"nexa/v1/enrol";

fn enrol_message(nonce: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    field(&mut b, ENROL_DOMAIN);
    field(&mut b, nonce);
    b
}

impl Identity {
    /// Signs a coordinator's enrolment challenge, proving possession of the key.
    pub fn sign_enrolment(&self, nonce: &[u8]) -> Vec<u8> {
        self.key.sign(&enrol_message(nonce)).to_bytes().to_vec()
    }
}

/// Checks that `signature` over the challenge `nonce` was made with `public_key`.
pub fn verify_enrolment(public_key: &[u8], nonce: &[u8], signature: &[u8]) -> Result<[u8; 32]> {
    let key: [u8; 32] = public_key
        .try_into()
        .map_err(|_| Error::Signature("a public key is 32 bytes".into()))?;
    let vk =
        VerifyingKey::from_bytes(&key).map_err(|e| Error::Signature(format!("bad key: {e}")))?;
    let sig = Signature::from_slice(signature)
        .map_err(|e| Error::Signature(format!("malformed signature: {e}")))?;
    vk.verify(&enrol_message(nonce), &sig)
        .map_err(|_| Error::Signature("the challenge was not signed with this key".into()))?;
    Ok(key)
}

/// Verifies a result's signature against `enrolled`, the key the coordinator knows for
/// this worker (never the key the result carries on its own).
pub fn verify_result(enrolled: &[u8; 32], result: &JobResult) -> Result<()> {
    if &result.worker_key != enrolled {
        return Err(Error::Signature(
            "result names a key that is not the worker's enrolled key".into(),
        ));
    }
    let key = VerifyingKey::from_bytes(enrolled)
        .map_err(|e| Error::Signature(format!("bad key: {e}")))?;
    let sig = Signature::from_slice(&result.signature)
        .map_err(|e| Error::Signature(format!("malformed signature: {e}")))?;
    key.verify(&result_message(result), &sig)
        .map_err(|_| Error::Signature("signature does not match the result".into()))
}

/// [`verify_result`] for many results of one worker at once, one verdict each, in
/// order: the well-formed signatures are checked together with `ed25519-dalek`'s
/// `verify_batch` (about twice as fast as one by one), and only when the batch fails is
/// each checked alone, so that one bad result costs the others nothing but time.
///
/// What it accepts is what [`verify_result`] accepts, forgery for forgery: a signature
/// passes only when made with the enrolled key's secret. (The batch equation, with its
/// random coefficients, may also pass a signature whose point carries a small torsion
/// component that the single check refuses; only the key's holder can make one, over a
/// message it chose to sign, so it is not a forgery.)
pub fn verify_results(enrolled: &[u8; 32], results: &[&JobResult]) -> Vec<Result<()>> {
    let key = match VerifyingKey::from_bytes(enrolled) {
        Ok(k) => k,
        Err(e) => {
            return results
                .iter()
                .map(|_| Err(Error::Signature(format!("bad key: {e}"))))
                .collect();
        }
    };
    let mut verdicts: Vec<Result<()>> = Vec::with_capacity(results.len());
    let mut batch: Vec<(usize, Vec<u8>, Signature)> = Vec::with_capacity(results.len());
    for (i, r) in results.iter().enumerate() {
        if &r.worker_key != enrolled {
            verdicts.push(Err(Error::Signature(
                "result names a key that is not the worker's enrolled key".into(),
            )));
            continue;
        }
        match Signature::from_slice(&r.signature) {
            Ok(sig) => {
                batch.push((i, result_message(r), sig));
                verdicts.push(Ok(()));
            }
            Err(e) => verdicts.push(Err(Error::Signature(format!("malformed signature: {e}")))),
        }
    }
    let messages: Vec<&[u8]> = batch.iter().map(|(_, m, _)| m.as_slice()).collect();
    let signatures: Vec<Signature> = batch.iter().map(|(_, _, s)| *s).collect();
    let keys = vec![key; batch.len()];
    if batch.len() > 1 && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return verdicts;
    }
    for (i, message, sig) in &batch {
        if key.verify(message, sig).is_err() {
            verdicts[*i] = Err(Error::Signature(
                "signature does not match the result".into(),
            ));
        }
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Outcome, OutputFile};

    fn result() -> JobResult {
        JobResult {
            job_id: "r/s".into(),
            generation: 3,
            attempt: 1,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            outputs: vec![OutputFile {
                output: "out".into(),
                path: "a.txt".into(),
                size: 3,
                digest: "blake3:00".into(),
            }],
            started_ms: 1,
            ended_ms: 2,
            error: String::new(),
            staging: None,
            log: None,
            progress: None,
            worker_key: [0; 32],
            signature: Vec::new(),
        }
    }

    #[test]
    fn signed_results_verify_and_tampering_is_caught() {
        let id = Identity::generate();
        let mut r = result();
        id.sign_result(&mut r);
        let key = id.public_key();
        verify_result(&key, &r).expect("valid");
        let mut t = r.clone();
        t.outputs[0].digest = "blake3:01".into();
        assert!(verify_result(&key, &t).is_err());
        let mut t = r.clone();
        t.generation = 4;
        assert!(verify_result(&key, &t).is_err());
        let other = Identity::generate();
        assert!(verify_result(&other.public_key(), &r).is_err());
    }

    #[test]
    fn a_batch_gets_the_verdict_each_result_gets_alone() {
        let id = Identity::generate();
        let key = id.public_key();
        let other = Identity::generate();
        let signed = |generation: u64, by: &Identity| {
            let mut r = result();
            r.generation = generation;
            by.sign_result(&mut r);
            r
        };
        let good: Vec<JobResult> = (0..5).map(|g| signed(g, &id)).collect();
        let mut tampered = signed(7, &id);
        tampered.outputs[0].digest = "blake3:01".into();
        // Signed by another key but naming the enrolled one.
        let mut foreign = signed(8, &other);
        foreign.worker_key = key;
        let mut malformed = signed(9, &id);
        malformed.signature.truncate(10);
        let naming_other = signed(10, &other);
        let mut all: Vec<&JobResult> = good.iter().collect();
        all.insert(2, &tampered);
        all.insert(4, &foreign);
        all.push(&malformed);
        all.push(&naming_other);
        let batch = verify_results(&key, &all);
        let alone: Vec<bool> = all.iter().map(|r| verify_result(&key, r).is_ok()).collect();
        assert_eq!(batch.iter().map(Result::is_ok).collect::<Vec<_>>(), alone);
        assert_eq!(alone.iter().filter(|ok| **ok).count(), 5, "{alone:?}");
        // All good: the batch alone decides, and accepts them all.
        let good_refs: Vec<&JobResult> = good.iter().collect();
        assert!(verify_results(&key, &good_refs).iter().all(Result::is_ok));
        assert!(verify_results(&key, &[]).is_empty());
    }

    #[test]
    fn key_file_is_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("k/worker.key");
        let a = Identity::load_or_create(&p).expect("create");
        let b = Identity::load_or_create(&p).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn processes_creating_the_key_at_once_all_get_the_same_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("worker.key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|_| s.spawn(|| Identity::load_or_create(&p).expect("no race").public_key()))
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        let left: Vec<_> = std::fs::read_dir(d.path()).expect("dir").collect();
        assert_eq!(left.len(), 1, "no temp files left: {left:?}");
    }
}
