//! Cache keys: SHA-256 over a canonical encoding of what determines a step's result.
//!
//! In the key: `uses`, `backend`, `params`, output names, `cache_hint`, the shard spec,
//! and the CONTENT digest of every input. Not in the key: paths (so moved data still hits
//! and changed data at the same path misses), `scheduler` (so moving a pipeline from
//! embedded to the mesh or Slurm keeps its cache), retries, timeout and resources.

use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// Version of the key encoding; bump to invalidate every cache.
pub const KEY_VERSION: u32 = 1;

/// Everything a cache key is made of.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyMaterial<'a> {
    /// Handler name.
    pub uses: &'a str,
    /// Backend, if any.
    pub backend: Option<&'a str>,
    /// Params as JSON (objects serialise with sorted keys).
    pub params: &'a serde_json::Value,
    /// Output names, sorted.
    pub outputs: Vec<&'a str>,
    /// Free-form hint.
    pub cache_hint: Option<&'a str>,
    /// Input name → content digest.
    pub inputs: BTreeMap<&'a str, &'a str>,
    /// `(over, count)` for sharded steps (count 0 when the step cuts by records or
    /// size: then `cut` says how).
    pub shards: Option<(&'a str, u32)>,
    /// How a step cut by records or size is cut (`r200`, `b67108864`); absent for
    /// `count`, so that those keys are what they always were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<String>,
    /// `(index, count)` when this key is for one shard.
    pub shard: Option<(u32, u32)>,
}

impl KeyMaterial<'_> {
    /// The canonical bytes that are hashed.
    pub fn canonical(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("v".into(), KEY_VERSION.into());
        }
        // serde_json's default map is ordered, so this is canonical.
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The key: lowercase hex SHA-256 of [`Self::canonical`].
    pub fn key(&self) -> crate::ids::CacheKey {
        crate::ids::CacheKey::from(hex::encode(Sha256::digest(self.canonical())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base<'a>(params: &'a serde_json::Value, digest: &'a str) -> KeyMaterial<'a> {
        KeyMaterial {
            uses: "exec",
            backend: None,
            params,
            outputs: vec!["out"],
            cache_hint: None,
            inputs: [("data", digest)].into_iter().collect(),
            shards: None,
            cut: None,
            shard: None,
        }
    }

    #[test]
    fn key_depends_on_content_and_params_not_map_order() {
        let p1 = serde_json::json!({"a": 1, "b": [1, 2]});
        let p2: serde_json::Value = serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).expect("json");
        assert_eq!(base(&p1, "blake3:aa").key(), base(&p2, "blake3:aa").key());
        assert_ne!(base(&p1, "blake3:aa").key(), base(&p1, "blake3:ab").key());
        let p3 = serde_json::json!({"a": 2, "b": [1, 2]});
        assert_ne!(base(&p1, "blake3:aa").key(), base(&p3, "blake3:aa").key());
        let mut hinted = base(&p1, "blake3:aa");
        hinted.cache_hint = Some("v2");
        assert_ne!(hinted.key(), base(&p1, "blake3:aa").key());
        assert_eq!(base(&p1, "blake3:aa").key().len(), 64);
    }

    #[test]
    fn a_cut_by_records_or_size_is_in_the_key_and_a_count_keeps_its_old_key() {
        let p = serde_json::json!({});
        let mut count = base(&p, "blake3:aa");
        count.shards = Some(("data", 4));
        // The encoding of a `count` shard spec, as before `cut` existed.
        let canon = String::from_utf8(count.canonical()).expect("utf8");
        assert!(
            canon.contains(r#""shards":["data",4]"#) && !canon.contains("cut"),
            "{canon}"
        );
        let mut records = base(&p, "blake3:aa");
        records.shards = Some(("data", 0));
        records.cut = Some("r200".into());
        let mut size = records.clone();
        size.cut = Some("b1024".into());
        assert_ne!(records.key(), size.key());
        assert_ne!(records.key(), count.key());
    }
}
