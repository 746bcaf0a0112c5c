//! The model registry: the seeds' `core/registry.py` (`register`, `resolve`, `promote`)
//! kept in the [`Store`].
//!
//! Each model is one record (its versions, its tags and its promotion history) under
//! one key, and every change is a compare-and-swap of that record: concurrent
//! registrations get distinct versions, concurrent promotions of a tag end with exactly
//! one winner per round and a complete history, and a tag can never point at a deleted
//! version (deleting a tagged version is refused inside the same swap).

use crate::{Error, Result, Store};
pub use nexa_shared::models::{Model, Promotion, Tag, Version};
use nexa_shared::{artifact, provenance};
use std::path::{Path, PathBuf};

/// The store tree holding models, keyed by name.
pub const REGISTRY_TREE: &str = "registry";

/// Which part of the version a registration bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bump {
    /// `1.2.3` → `1.2.4` (the default).
    #[default]
    Patch,
    /// `1.2.3` → `1.3.0`.
    Minor,
    /// `1.2.3` → `2.0.0`.
    Major,
}

impl std::str::FromStr for Bump {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "patch" => Ok(Bump::Patch),
            "minor" => Ok(Bump::Minor),
            "major" => Ok(Bump::Major),
            other => Err(Error::Registry(format!(
                "bump must be patch, minor or major, not '{other}'"
            ))),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Registry(format!(
            "{what} '{s}' must be 1-128 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
        )))
    }
}

/// The artifact directory a registry URI names.
pub fn uri_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

/// The version a new registration gets. Deleted versions count too: a version number
/// is never handed out twice.
fn next_version(model: &Model, bump: Bump) -> String {
    let highest = model
        .versions
        .keys()
        .filter_map(|v| semver::Version::parse(v).ok())
        .max();
    let next = match (highest, bump) {
        (None, Bump::Patch) => semver::Version::new(0, 1, 0),
        (None, Bump::Minor) => semver::Version::new(0, 1, 0),
        (None, Bump::Major) => semver::Version::new(1, 0, 0),
        (Some(h), Bump::Patch) => semver::Version::new(h.major, h.minor, h.patch + 1),
        (Some(h), Bump::Minor) => semver::Version::new(h.major, h.minor + 1, 0),
        (Some(h), Bump::Major) => semver::Version::new(h.major + 1, 0, 0),
    };
    next.to_string()
}

/// The registry over a store.
pub struct Registry<'a> {
    store: &'a dyn Store,
    mirror: Option<PathBuf>,
}

/// Serialises mirror writes, so that the last one written is the store's latest.
static MIRROR_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl<'a> Registry<'a> {
    /// A registry kept in `store`.
    pub fn new(store: &'a dyn Store) -> Self {
        Self {
            store,
            mirror: None,
        }
    }

    /// Also mirrors every model, after each change, to `<dir>/<name>.json` (what
    /// `nexa-coordinator store recover` rebuilds the registry from).
    pub fn mirrored_in(mut self, dir: Option<PathBuf>) -> Self {
        self.mirror = dir;
        self
    }

    /// Rewrites `name`'s mirror from the store (a failure is logged: the store is the
    /// truth, the mirror its copy for recovery).
    fn write_mirror(&self, name: &str) {
        let Some(dir) = &self.mirror else {
            return;
        };
        let _one = MIRROR_WRITES.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.store.get(REGISTRY_TREE, name).and_then(|raw| {
            let Some(bytes) = raw else {
                return Ok(());
            };
            let path = mirror_path(dir, name);
            crate::mirror::write_atomic(&path, &bytes)
                .map_err(|e| Error::Domain(nexa_shared::Error::io("write", &path, e)))
        });
        if let Err(e) = written {
            tracing::warn!(model = name, error = %e, "writing the registry mirror");
        }
    }

    fn load(&self, name: &str) -> Result<(Option<Vec<u8>>, Model)> {
        let raw = self.store.get(REGISTRY_TREE, name)?;
        let model = match &raw {
            Some(b) => serde_json::from_slice(b)?,
            None => Model {
                name: name.to_string(),
                ..Model::default()
            },
        };
        Ok((raw, model))
    }

    /// Reads the model, lets `change` edit it, and swaps it in; repeats from a fresh
    /// read when another writer changed it in between.
    fn update<T>(&self, name: &str, mut change: impl FnMut(&mut Model) -> Result<T>) -> Result<T> {
        loop {
            let (raw, mut model) = self.load(name)?;
            let out = change(&mut model)?;
            let bytes = serde_json::to_vec(&model)?;
            if self
                .store
                .compare_and_swap(REGISTRY_TREE, name, raw.as_deref(), Some(&bytes))?
            {
                self.store.flush()?;
                self.write_mirror(name);
                return Ok(out);
            }
        }
    }

    /// Registers `uri` as the next version of `name` (a patch bump unless told).
    /// A local artifact must be sealed; its hash is recorded.
    pub fn register(
        &self,
        name: &str,
        uri: &str,
        meta: serde_json::Value,
        bump: Bump,
    ) -> Result<Version> {
        check_name("model name", name)?;
        let (uri, hash) = canonical_artifact(uri)?;
        self.update(name, |m| {
            let version = next_version(m, bump);
            let v = Version {
                name: name.to_string(),
                version: version.clone(),
                uri: uri.clone(),
                hash: hash.clone(),
                meta: meta.clone(),
                registered_at: now(),
                deleted_at: None,
            };
            m.versions.insert(version, v.clone());
            Ok(v)
        })
    }

    /// [`Registry::register`], except that an artifact that already is the latest
    /// version (same URI and hash) is not registered again: pipelines that re-run keep
    /// one version per distinct artifact.
    pub fn register_once(
        &self,
        name: &str,
        uri: &str,
        meta: serde_json::Value,
        bump: Bump,
    ) -> Result<(Version, bool)> {
        check_name("model name", name)?;
        let (canon, hash) = canonical_artifact(uri)?;
        if let (Some(_), m) = self.load(name)?
            && let Some(latest) = m.latest()
            && latest.uri == canon
            && hash.is_some()
            && latest.hash == hash
        {
            return Ok((latest.clone(), false));
        }
        Ok((self.register(name, uri, meta, bump)?, true))
    }

    /// Resolves `name`, `name:latest`, `name:1.2.0` or `name:TAG` to a live version.
    pub fn resolve(&self, reference: &str) -> Result<Version> {
        let (name, which) = reference.split_once(':').unwrap_or((reference, "latest"));
        check_name("model name", name)?;
        let (raw, m) = self.load(name)?;
        if raw.is_none() {
            return Err(Error::NotFound(format!("no model named '{name}'")));
        }
        let found = if which == "latest" {
            m.latest()
        } else if let Some(v) = m.versions.get(which) {
            Some(v)
        } else {
            m.tags.get(which).and_then(|t| m.versions.get(&t.version))
        };
        match found {
            Some(v) if v.deleted_at.is_none() => Ok(v.clone()),
            Some(v) => Err(Error::NotFound(format!(
                "{name}:{} was deleted at {}",
                v.version,
                v.deleted_at.as_deref().unwrap_or("?")
            ))),
            None => Err(Error::NotFound(format!(
                "'{reference}' names no version or tag of '{name}'"
            ))),
        }
    }

    /// Points `tag` at `version` (a version, or `latest`), after checking the artifact:
    /// it must be sealed (`COMPLETE`), its payload must match its `meta.json` and the
    /// hash registered, and every signature in it must verify. Returns the new stretch.
    pub fn promote(&self, name: &str, version: &str, tag: &str) -> Result<Promotion> {
        check_name("model name", name)?;
        check_name("tag", tag)?;
        if tag == "latest" || semver::Version::parse(tag).is_ok() {
            return Err(Error::Registry(format!(
                "'{tag}' cannot be a tag: it would read as a version"
            )));
        }
        let target = if version == "latest" {
            self.resolve(name)?
        } else {
            self.resolve(&format!("{name}:{version}"))?
        };
        if target.version != version && version != "latest" {
            return Err(Error::Registry(format!(
                "'{version}' is not a version of '{name}' (promote takes a version, not a tag)"
            )));
        }
        check_artifact(&target)?;
        self.update(name, |m| {
            match m.versions.get(&target.version) {
                Some(v) if v.deleted_at.is_none() => {}
                _ => {
                    return Err(Error::Registry(format!(
                        "{name}:{} was deleted meanwhile",
                        target.version
                    )));
                }
            }
            // Promoting the current holder again changes nothing.
            if m.tags.get(tag).is_some_and(|t| t.version == target.version)
                && let Some(open) = m
                    .history
                    .iter()
                    .rev()
                    .find(|p| p.tag == tag && p.to.is_none())
            {
                return Ok(open.clone());
            }
            let at = now();
            for p in m.history.iter_mut() {
                if p.tag == tag && p.to.is_none() {
                    p.to = Some(at.clone());
                }
            }
            let p = Promotion {
                tag: tag.to_string(),
                version: target.version.clone(),
                from: at.clone(),
                to: None,
            };
            m.history.push(p.clone());
            m.tags.insert(
                tag.to_string(),
                Tag {
                    version: target.version.clone(),
                    since: at,
                },
            );
            Ok(p)
        })
    }

    /// Deletes a version. Refused while a tag names it: move or drop the tag first.
    pub fn delete(&self, name: &str, version: &str) -> Result<()> {
        check_name("model name", name)?;
        self.update(name, |m| {
            let tags: Vec<&str> = m
                .tags
                .iter()
                .filter(|(_, t)| t.version == version)
                .map(|(k, _)| k.as_str())
                .collect();
            if !tags.is_empty() {
                return Err(Error::Registry(format!(
                    "{name}:{version} holds tag(s) {}: promote another version first",
                    tags.join(", ")
                )));
            }
            match m.versions.get_mut(version) {
                Some(v) if v.deleted_at.is_none() => {
                    v.deleted_at = Some(now());
                    Ok(())
                }
                Some(_) => Err(Error::Registry(format!(
                    "{name}:{version} is already deleted"
                ))),
                None => Err(Error::NotFound(format!("no version {version} of '{name}'"))),
            }
        })
    }

    /// One model, whole.
    pub fn show(&self, name: &str) -> Result<Model> {
        check_name("model name", name)?;
        match self.load(name)? {
            (Some(_), m) => Ok(m),
            (None, _) => Err(Error::NotFound(format!("no model named '{name}'"))),
        }
    }

    /// Every model, by name.
    pub fn list(&self) -> Result<Vec<Model>> {
        self.store
            .scan_prefix(REGISTRY_TREE, "")?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }
}

/// A model's mirror file in `dir`.
pub fn mirror_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.json", nexa_shared::paths::safe_component(name)))
}

/// `file://` + absolute path for a local artifact, with its hash when it is sealed.
/// Other URIs (`s3://`, `hf://`, ...) are recorded as given.
fn canonical_artifact(uri: &str) -> Result<(String, Option<String>)> {
    if uri.contains("://") && !uri.starts_with("file://") {
        return Ok((uri.to_string(), None));
    }
    let path = uri_path(uri);
    let abs = std::path::absolute(&path)
        .map_err(|e| Error::Registry(format!("resolving {}: {e}", path.display())))?;
    if !abs.exists() {
        return Err(Error::Registry(format!("{} does not exist", abs.display())));
    }
    if !artifact::is_complete(&abs) {
        return Err(Error::Registry(format!(
            "{} is not a sealed artifact (no COMPLETE)",
            abs.display()
        )));
    }
    let meta = artifact::read_meta(&abs)?;
    Ok((format!("file://{}", abs.display()), Some(meta.hash)))
}

/// A promotion's checks on the artifact behind a version.
fn check_artifact(v: &Version) -> Result<()> {
    if v.uri.contains("://") && !v.uri.starts_with("file://") {
        return Err(Error::Registry(format!(
            "{}:{} is at {}, which this coordinator cannot check; only local artifacts can be promoted",
            v.name, v.version, v.uri
        )));
    }
    let path = uri_path(&v.uri);
    check_sealed_and_signed(&path).map_err(|e| {
        Error::Registry(format!("refusing to promote {}:{}: {e}", v.name, v.version))
    })?;
    let meta = artifact::read_meta(&path)?;
    if let Some(h) = &v.hash
        && &meta.hash != h
    {
        return Err(Error::Registry(format!(
            "refusing to promote {}:{}: the artifact now hashes to {} but {} was registered",
            v.name, v.version, meta.hash, h
        )));
    }
    Ok(())
}

fn check_sealed_and_signed(path: &Path) -> std::result::Result<(), String> {
    if !artifact::is_complete(path) {
        return Err(format!("{} has no COMPLETE marker", path.display()));
    }
    provenance::verify_artifact(path).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests;

/// Runs a `core.registry.*` pipeline step against `store`. `inputs` are the step's
/// resolved inputs as (name, path as written, path on disk). Returns what it did, and
/// whether that changed the registry (a re-run that finds its work done changes nothing).
pub fn run_step(
    store: &dyn Store,
    mirror: Option<PathBuf>,
    project: &Path,
    params: &nexa_shared::handlers::RegistryParams,
    inputs: &[(String, String, PathBuf)],
) -> Result<(String, bool)> {
    use nexa_shared::handlers::RegistryParams;
    let r = Registry::new(store).mirrored_in(mirror);
    match params {
        RegistryParams::Register {
            name,
            uri,
            meta,
            bump,
        } => {
            let input = match uri {
                None => inputs.first(),
                Some(u) => inputs.iter().find(|(n, w, _)| n == u || w == u),
            }
            .ok_or_else(|| Error::Registry("the input to register is missing".into()))?;
            // A file inside an artifact registers the artifact that holds it.
            let dir = crate::sealing::lineage::producer_of(&input.2).ok_or_else(|| {
                Error::Registry(format!("{} is not in a sealed artifact", input.1))
            })?;
            let meta = match meta {
                None => serde_json::Value::Null,
                Some(serde_json::Value::String(file)) => {
                    let p = crate::sealing::lineage::input_path(project, file);
                    let text = std::fs::read_to_string(&p).map_err(|e| {
                        Error::Registry(format!("reading meta {}: {e}", p.display()))
                    })?;
                    serde_json::from_str(&text).map_err(|e| {
                        Error::Registry(format!("meta {} is not JSON: {e}", p.display()))
                    })?
                }
                Some(inline) => inline.clone(),
            };
            let (v, new) =
                r.register_once(name, &dir.display().to_string(), meta, bump.parse()?)?;
            Ok(if new {
                (format!("registered {}:{}", v.name, v.version), true)
            } else {
                (
                    format!("{}:{} is already this artifact", v.name, v.version),
                    false,
                )
            })
        }
        RegistryParams::Promote { name, version, tag } => {
            let before = r.show(name).ok().and_then(|m| m.tags.get(tag).cloned());
            let p = r.promote(name, version, tag)?;
            let changed = before.is_none_or(|t| t.version != p.version);
            Ok((format!("{name}:{} is {tag}", p.version), changed))
        }
    }
}
