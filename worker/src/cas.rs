//! The worker's content-addressed input cache: each input is fetched once per digest,
//! verified against it, made read-only, and reused across jobs.

use crate::{CoordinatorLink, Error, Result};
use nexa_shared::job::JobInput;
use nexa_shared::{digest, paths};
use std::path::{Path, PathBuf};

/// The cache directory.
#[derive(Debug)]
pub struct Cas {
    root: PathBuf,
}

impl Cas {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where an input lives once staged: `<root>/<hex>/<name>`; the last component keeps
    /// the input's own file name so programs that look at extensions still work.
    fn entry(&self, input: &JobInput) -> Result<(PathBuf, PathBuf)> {
        let hex = digest::parse(&input.digest)?.to_hex().to_string();
        let base = input
            .source
            .file_name()
            .and_then(|n| n.to_str())
            .map(paths::safe_component)
            .unwrap_or_else(|| "input".into());
        let dir = self.root.join(hex);
        Ok((dir.clone(), dir.join(base)))
    }

    /// Stages `input`, fetching it through `link` unless cached. Returns its local path.
    pub async fn stage<L: CoordinatorLink>(&self, link: &L, input: &JobInput) -> Result<PathBuf> {
        let (dir, path) = self.entry(input)?;
        if path.exists() {
            return Ok(path);
        }
        let stage_err = |reason: String| Error::Stage {
            name: input.name.clone(),
            reason,
        };
        // A private temp directory inside the entry's digest directory: two slots
        // staging at once never share it, and the final rename stays on one file system.
        let mut rnd = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
        let tmp_dir = dir.join(format!(".tmp-{}", hex::encode(rnd)));
        let tmp_path = tmp_dir.join(path.file_name().unwrap_or_default());
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|e| stage_err(format!("create {}: {e}", tmp_dir.display())))?;
        if let Err(e) = link.fetch_input(input, &tmp_path).await {
            let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
            return Err(stage_err(e));
        }
        let check = tmp_path.clone();
        let hashed = tokio::task::spawn_blocking(move || digest::hash_path(&check))
            .await
            .map_err(|e| stage_err(e.to_string()))
            .and_then(|r| r.map_err(|e| stage_err(e.to_string())));
        let got = match hashed {
            Ok((got, _, _)) => got,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
                return Err(e);
            }
        };
        if got != input.digest {
            let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
            return Err(stage_err(format!(
                "content is {got}, expected {} (did the input change during the run?)",
                input.digest
            )));
        }
        make_read_only(&tmp_path);
        // Entries are keyed by digest and named by the input's own name: the same content
        // under two names is two entries of one digest directory.
        let renamed = tokio::fs::rename(&tmp_path, &path).await;
        let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
        match renamed {
            Ok(()) => {}
            // Another slot staged the same entry first (a directory cannot be renamed
            // over a full one): same digest, same content.
            Err(_) if path.exists() => {}
            Err(e) => return Err(stage_err(format!("rename into cache: {e}"))),
        }
        Ok(path)
    }
}

fn make_read_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if path.is_dir() {
        if let Ok(files) = digest::list_files(path, &[]) {
            for (_, p, _) in files {
                if let Ok(m) = std::fs::metadata(&p) {
                    let mut perm = m.permissions();
                    perm.set_mode(perm.mode() & 0o555);
                    let _ = std::fs::set_permissions(&p, perm);
                }
            }
        }
    } else if let Ok(m) = std::fs::metadata(path) {
        let mut perm = m.permissions();
        perm.set_mode(perm.mode() & 0o555);
        let _ = std::fs::set_permissions(path, perm);
    }
}

/// Copies a local file or directory tree to `dest` (the embedded link's fetch).
pub fn copy_local(src: &Path, dest: &Path) -> std::result::Result<(), String> {
    if src.is_dir() {
        let files = nexa_shared::artifact::input_files(src).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        for (rel, p, _) in files {
            let to = dest.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("create {}: {e}", parent.display()))?;
            }
            std::fs::copy(&p, &to).map_err(|e| format!("copy {}: {e}", p.display()))?;
        }
        Ok(())
    } else {
        std::fs::copy(src, dest)
            .map(|_| ())
            .map_err(|e| format!("copy {}: {e}", src.display()))
    }
}
