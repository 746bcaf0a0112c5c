//! Registered models as they are reported: a model's versions, tags and promotion
//! history. The coordinator's registry keeps and changes them (`registry.rs`); the CLI
//! and the wire show them.

use std::collections::BTreeMap;

/// A registered model: its versions, tags and promotion history.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Model {
    /// The model's name.
    pub name: String,
    /// Versions by their semantic version string.
    pub versions: BTreeMap<String, Version>,
    /// Tags (`prod`, `staging`, ...) and the version each names now.
    pub tags: BTreeMap<String, Tag>,
    /// Every promotion: which version held which tag, from when to when.
    pub history: Vec<Promotion>,
}

/// One registered version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    /// The model's name.
    pub name: String,
    /// Semantic version (`1.2.0`).
    pub version: String,
    /// Where the artifact is (`file://` + absolute path).
    pub uri: String,
    /// The artifact's payload hash at registration (from its `meta.json`).
    pub hash: Option<String>,
    /// Free-form metadata given at registration.
    pub meta: serde_json::Value,
    /// RFC 3339.
    pub registered_at: String,
    /// RFC 3339, once deleted (the record is kept for the history).
    pub deleted_at: Option<String>,
}

/// A tag's current holder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tag {
    /// The version it names.
    pub version: String,
    /// Since when (RFC 3339).
    pub since: String,
}

/// One stretch of a tag on a version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Promotion {
    /// The tag.
    pub tag: String,
    /// The version that held it.
    pub version: String,
    /// From (RFC 3339).
    pub from: String,
    /// Until (RFC 3339); `None` while it still holds the tag.
    pub to: Option<String>,
}

impl Model {
    /// Live (not deleted) versions, oldest first by semantic version.
    pub fn live_versions(&self) -> Vec<&Version> {
        let mut v: Vec<(semver::Version, &Version)> = self
            .versions
            .values()
            .filter(|v| v.deleted_at.is_none())
            .filter_map(|v| semver::Version::parse(&v.version).ok().map(|s| (s, v)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, v)| v).collect()
    }

    /// The highest live version.
    pub fn latest(&self) -> Option<&Version> {
        self.live_versions().pop()
    }
}

/// What the registry answers an operator's query (`nexa models` against a coordinator).
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryAnswer {
    /// Every model (`list`).
    List(Vec<Model>),
    /// One model (`show`).
    Model(Model),
    /// The version a reference names (`resolve`).
    Version(Version),
    /// A tag moved (`promote`).
    Promotion(Promotion),
}
