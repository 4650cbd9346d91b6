//! Paths inside a project: refuse anything that would leave it.

use std::path::{Component, Path, PathBuf};

use cocalc_core::StorageError;

/// Checks that `rel` is a relative path that stays inside its root
/// lexically: not empty, not absolute, no `..`, no NUL. `.` components are
/// dropped. Returns the cleaned relative path.
///
/// ```
/// use cocalc_storage::paths::clean_relative;
/// assert_eq!(clean_relative("a/./b").unwrap(), std::path::PathBuf::from("a/b"));
/// assert!(clean_relative("../etc").is_err());
/// assert!(clean_relative("/etc").is_err());
/// ```
pub fn clean_relative(rel: &str) -> Result<PathBuf, StorageError> {
    let escape = || StorageError::PathEscape(rel.to_string());
    if rel.contains('\0') {
        return Err(escape());
    }
    let mut out = PathBuf::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(escape())
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(escape());
    }
    Ok(out)
}

/// Resolves `rel` (already [`clean_relative`]) under `root` so that no
/// symlink among its *parent* directories leads outside `root`. The last
/// component is not followed (a symlink there is copied as a link). Returns
/// the absolute path; parents that do not exist yet are allowed.
pub fn resolve_inside(root: &Path, rel: &Path, shown: &str) -> Result<PathBuf, StorageError> {
    let escape = || StorageError::PathEscape(shown.to_string());
    let root = root
        .canonicalize()
        .map_err(|e| StorageError::Io(format!("{}: {e}", root.display())))?;
    let mut cur = root.clone();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        if i + 1 == comps.len() {
            break;
        }
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let real = cur.canonicalize().map_err(|_| escape())?;
                if !real.starts_with(&root) {
                    return Err(escape());
                }
                cur = real;
            }
            Ok(m) if !m.is_dir() => return Err(escape()),
            Ok(_) => {}
            Err(_) => {
                // Does not exist: the rest is created fresh, no links to follow.
                for rest in &comps[i + 1..] {
                    cur.push(rest);
                }
                break;
            }
        }
    }
    if !cur.starts_with(&root) {
        return Err(escape());
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_escapes_are_refused() {
        for bad in ["", ".", "..", "a/../../b", "a/..", "/abs", "a\0b"] {
            assert!(
                matches!(clean_relative(bad), Err(StorageError::PathEscape(_))),
                "{bad:?}"
            );
        }
        assert_eq!(clean_relative("./x/y/").unwrap(), PathBuf::from("x/y"));
    }

    #[test]
    fn symlinked_parents_must_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        std::os::unix::fs::symlink("real", root.join("in")).unwrap();
        let r = resolve_inside(&root, Path::new("out/passwd"), "out/passwd");
        assert!(matches!(r, Err(StorageError::PathEscape(_))), "{r:?}");
        let ok = resolve_inside(&root, Path::new("in/f"), "in/f").unwrap();
        assert!(ok.ends_with("real/f"));
        let new = resolve_inside(&root, Path::new("new/dir/f"), "new/dir/f").unwrap();
        assert!(new.ends_with("root/new/dir/f"));
        // The last component is never followed.
        let last = resolve_inside(&root, Path::new("out"), "out").unwrap();
        assert!(last.ends_with("root/out"));
    }
}
