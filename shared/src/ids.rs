//! Typed ids for what crosses module and process boundaries: jobs, runs, workers, cache
//! keys. Each is a string on the wire and in the store (`serde(transparent)`), but the
//! compiler keeps them apart, and job ids are built and taken apart only here.

use std::borrow::Borrow;
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
            serde::Serialize, serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        // Lookups by a plain string key (`map.get(&s)`) still find the typed id.
        impl Borrow<String> for $name {
            fn borrow(&self) -> &String {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == &other.0
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id!(
    /// A job: `<run>/<step>`, `<run>/<step>/<shard>`, and for a replica of a replicated
    /// unit `<unit>~r<k>`.
    JobId
);
string_id!(
    /// A run: `YYYYMMDDTHHMMSS-xxxx` (UTC), sortable by start time.
    RunId
);
string_id!(
    /// A worker: the first 8 bytes of its public key, in hex (or `local` embedded).
    WorkerId
);
string_id!(
    /// A step's or shard's cache key (a content digest over its inputs and parameters).
    CacheKey
);

string_id!(
    /// A content digest, `blake3:<hex>` (see `digest::format` and `digest::parse`).
    Digest
);

impl Digest {
    /// The digest of content that hashed to `hash`.
    pub fn of(hash: &blake3::Hash) -> Self {
        Self(crate::digest::format(hash))
    }
}

/// Marks a replica job within its unit.
const REPLICA: &str = "~r";

impl JobId {
    /// The job of an unsharded step of `run`.
    pub fn for_step(run: &str, step: &str) -> Self {
        Self(format!("{run}/{step}"))
    }

    /// The job of shard `index` of a step of `run`.
    pub fn for_shard(run: &str, step: &str, index: impl fmt::Display) -> Self {
        Self(format!("{run}/{step}/{index}"))
    }

    /// Replica `k` of the replicated unit `unit` (itself a step's or shard's job id).
    pub fn replica(unit: &str, k: u32) -> Self {
        Self(format!("{unit}{REPLICA}{k}"))
    }

    /// For a replica job, its unit and replica number.
    pub fn as_replica(&self) -> Option<(&str, u32)> {
        let (unit, k) = self.0.rsplit_once(REPLICA)?;
        Some((unit, k.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_built_and_taken_apart_in_one_place() {
        let step = JobId::for_step("r1", "train");
        assert_eq!(step, "r1/train");
        assert_eq!(JobId::for_shard("r1", "infer", 7), "r1/infer/7");
        let rep = JobId::replica(&step, 2);
        assert_eq!(rep, "r1/train~r2");
        assert_eq!(rep.as_replica(), Some(("r1/train", 2)));
        assert_eq!(step.as_replica(), None);
        assert_eq!(JobId::from("a~rx").as_replica(), None);
        // On the wire and in the store an id is its text.
        assert_eq!(
            serde_json::to_string(&rep).expect("json"),
            "\"r1/train~r2\""
        );
        let back: JobId = serde_json::from_str("\"r1/train~r2\"").expect("json");
        assert_eq!(back, rep);
    }
}
