//! Small pieces shared by the reference daemons' configs.

use std::path::Path;

/// A secret a config gives inline (`api_key = "…"`) or as a file
/// (`api_key_file = "/etc/cocalc/…"`): the inline value when set, else
/// the file's contents. Both are trimmed, so a file's trailing newline is
/// not part of the secret. `Ok(None)` when neither is set; an unreadable
/// file is an error that names the file.
pub fn inline_or_file(inline: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(s.trim().to_string())),
        (None, Some(p)) => std::fs::read_to_string(p)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| format!("{}: {e}", p.display())),
        (None, None) => Ok(None),
    }
}

/// Replaces the file at `path` with `bytes` so that a reader (or a crash)
/// sees the old content or the new, never a part: written beside it
/// (`<name>.new`, after creating the directory), flushed to disk, then
/// renamed over it. For the state daemons keep between restarts.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn atomic_writes_replace_whole_files_and_make_their_directory() {
        let dir = std::env::temp_dir().join(format!("cocalc-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("state.json");
        super::write_file_atomically(&path, b"first").unwrap();
        super::write_file_atomically(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert!(!dir.join("sub").join("state.json.new").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    #[test]
    fn inline_wins_files_are_trimmed_and_missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("cocalc-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, "  s3cret\n").unwrap();
        assert_eq!(
            inline_or_file(Some(" a "), Some(&f)).unwrap(),
            Some("a".into())
        );
        assert_eq!(
            inline_or_file(None, Some(&f)).unwrap(),
            Some("s3cret".into())
        );
        assert_eq!(inline_or_file(None, None).unwrap(), None);
        let missing = dir.join("nope");
        let e = inline_or_file(None, Some(&missing)).unwrap_err();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
