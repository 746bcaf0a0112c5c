//! Path hygiene: lexical normalisation, containment checks and safe names.

use crate::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// Lexically normalises `path` (removes `.`, folds `..`) without touching the disk.
/// Returns `None` when a relative path climbs above its start.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in path.components() {
        match c {
            Component::Prefix(p) => out.push(p.as_os_str()),
            Component::RootDir => out.push(Component::RootDir.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    if path.is_absolute() {
                        continue;
                    }
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
        }
    }
    Some(out)
}

/// Resolves a path written in a pipeline against `root`, refusing anything that would end
/// up outside it. Returns the path relative to `root`.
pub fn contained(root: &Path, written: &str) -> Result<PathBuf> {
    let p = Path::new(written);
    if written.is_empty() {
        return Err(Error::UnsafePath(written.into(), "empty path"));
    }
    if p.is_absolute() {
        let n = normalize(p).ok_or(Error::UnsafePath(written.into(), "invalid path"))?;
        let root = normalize(root).unwrap_or_else(|| root.to_path_buf());
        return n
            .strip_prefix(&root)
            .map(Path::to_path_buf)
            .map_err(|_| {
                Error::UnsafePath(written.into(), "absolute path outside the artifact root")
            })
            .and_then(|rel| {
                if rel.as_os_str().is_empty() {
                    Err(Error::UnsafePath(
                        written.into(),
                        "is the artifact root itself",
                    ))
                } else {
                    Ok(rel)
                }
            });
    }
    let n = normalize(p).ok_or(Error::UnsafePath(
        written.into(),
        "escapes the project with '..'",
    ))?;
    if n.as_os_str().is_empty() {
        return Err(Error::UnsafePath(
            written.into(),
            "is the project root itself",
        ));
    }
    Ok(n)
}

/// Checks a relative file name that came from outside (a worker, an upload): no absolute
/// paths, no `..`, no empty components.
pub fn check_relative_name(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::UnsafePath(name.into(), "empty or NUL"));
    }
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(Error::UnsafePath(
                    name.into(),
                    "must be relative without '..'",
                ));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Error::UnsafePath(name.into(), "names no file"));
    }
    Ok(out)
}

/// Turns any text into a string safe as one path component (`[A-Za-z0-9._-]`).
pub fn safe_component(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        format!("_{s}")
    } else {
        s
    }
}

/// The environment-variable form of a name: upper case, non-alphanumerics as `_`.
pub fn env_name(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment() {
        let root = Path::new("/proj");
        assert_eq!(
            contained(root, "artifacts/x").ok(),
            Some(PathBuf::from("artifacts/x"))
        );
        assert_eq!(contained(root, "./a/../b").ok(), Some(PathBuf::from("b")));
        assert!(contained(root, "../x").is_err());
        assert!(contained(root, "a/../../x").is_err());
        assert!(contained(root, "/etc/passwd").is_err());
        assert_eq!(
            contained(root, "/proj/artifacts/y").ok(),
            Some(PathBuf::from("artifacts/y"))
        );
        assert!(contained(root, "/proj").is_err());
    }

    #[test]
    fn relative_names() {
        assert!(check_relative_name("a/b.txt").is_ok());
        assert!(check_relative_name("../b").is_err());
        assert!(check_relative_name("/etc/x").is_err());
        assert!(check_relative_name("a/../../b").is_err());
        assert_eq!(safe_component("a/b c"), "a_b_c");
        assert_eq!(safe_component(".."), "_..");
        assert_eq!(env_name("my-input.1"), "MY_INPUT_1");
    }
}
