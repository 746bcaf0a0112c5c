//! Hashing a job's outputs into the manifest the worker signs.

use nexa_shared::digest;
use nexa_shared::job::OutputFile;
use std::path::Path;

/// Hashes every file under `<out_root>/<name>` for each output name, sorted.
/// Symlinks and special files are refused: outputs must be plain files.
pub fn hash_outputs(out_root: &Path, names: &[String]) -> Result<Vec<OutputFile>, String> {
    let mut files = Vec::new();
    for name in names {
        let dir = out_root.join(name);
        if !dir.exists() {
            continue;
        }
        let listed = digest::list_files(&dir, &[]).map_err(|e| format!("output '{name}': {e}"))?;
        for (rel, path, _) in listed {
            let (h, size) = digest::hash_file(&path).map_err(|e| e.to_string())?;
            files.push(OutputFile {
                output: name.clone(),
                path: rel,
                size,
                digest: nexa_shared::ids::Digest::of(&h),
            });
        }
    }
    files.sort_by(|a, b| (&a.output, &a.path).cmp(&(&b.output, &b.path)));
    Ok(files)
}
