//! [`KeySet`]: the signing keys of a master (or the public keys a host
//! trusts), by key id, with rotation and retirement.
//!
//! Rotation needs no cutover: [`KeySet::rotate`] adds a new key, which signs
//! from then on, while older keys still verify until an operator retires
//! them (once every token they signed has expired, i.e. after the maximum
//! token TTL). A retired key verifies nothing.
//!
//! ## On disk
//!
//! A key directory holds one file per key and kind, named after the time the
//! key was created so that "newest" survives a copy:
//!
//! ```text
//! k4-<created unix ms>.secret    "k4.secret.…" (mode 0600; only where minting happens)
//! k4-<created unix ms>.public    "k4.public.…"
//! k4-<created unix ms>.retired   "k4.public.…" of a retired key
//! ```
//!
//! Files are written to a temporary name and renamed into place, so a crash
//! never leaves a half-written key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cocalc_core::Timestamp;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::paserk::{self, PaserkError};

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file holds something that is not a valid PASERK key.
    #[error("{path}: {source}")]
    Paserk {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: PaserkError,
    },
    /// The secret and public files of one key disagree.
    #[error("{path}: public key does not match the secret key beside it")]
    Mismatch {
        /// The public key file.
        path: PathBuf,
    },
    /// The directory holds no usable key.
    #[error("no keys in {0}")]
    Empty(PathBuf),
    /// No key has this id.
    #[error("unknown key id {0}")]
    UnknownKey(String),
    /// Signing needs a secret key and none is present (or all are retired).
    #[error("no unretired secret key available for signing")]
    NoSigningKey,
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

/// One key of a set.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// PASERK `k4.pid` of the public key.
    pub kid: String,
    /// The public key.
    pub public: VerifyingKey,
    /// The secret key, where this set may sign.
    pub secret: Option<SigningKey>,
    /// When the key was created (orders keys: newest signs).
    pub created: Timestamp,
    /// A retired key verifies nothing and signs nothing.
    pub retired: bool,
}

impl KeyEntry {
    fn new(public: VerifyingKey, secret: Option<SigningKey>, created: Timestamp) -> Self {
        KeyEntry {
            kid: paserk::pid(&public),
            public,
            secret,
            created,
            retired: false,
        }
    }
}

/// Several keys by key id. Oldest first; the newest unretired key with a
/// secret signs.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<KeyEntry>,
}

/// Fills a 32-byte seed from the operating system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(b)
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        KeySet::default()
    }

    /// A set holding one freshly generated key, created at `now`.
    pub fn generate(now: Timestamp) -> Result<Self, KeyError> {
        let mut s = KeySet::new();
        s.rotate(now)?;
        Ok(s)
    }

    /// Adds a freshly generated key that signs from now on; returns its id.
    pub fn rotate(&mut self, now: Timestamp) -> Result<String, KeyError> {
        let sk = SigningKey::from_bytes(&random_bytes::<32>()?);
        Ok(self.insert_secret(sk, now))
    }

    /// Adds a secret key (idempotent per key id); returns its id.
    pub fn insert_secret(&mut self, sk: SigningKey, created: Timestamp) -> String {
        let entry = KeyEntry::new(sk.verifying_key(), Some(sk), created);
        self.insert(entry)
    }

    /// Adds a public key that verifies only (idempotent); returns its id.
    pub fn insert_public(&mut self, pk: VerifyingKey, created: Timestamp) -> String {
        self.insert(KeyEntry::new(pk, None, created))
    }

    fn insert(&mut self, entry: KeyEntry) -> String {
        let kid = entry.kid.clone();
        match self.keys.iter_mut().find(|k| k.kid == kid) {
            Some(existing) => {
                if existing.secret.is_none() {
                    existing.secret = entry.secret;
                }
            }
            None => {
                self.keys.push(entry);
                self.keys.sort_by_key(|k| k.created);
            }
        }
        kid
    }

    /// Marks a key retired.
    pub fn retire(&mut self, kid: &str) -> Result<(), KeyError> {
        let k = self
            .keys
            .iter_mut()
            .find(|k| k.kid == kid)
            .ok_or_else(|| KeyError::UnknownKey(kid.to_string()))?;
        k.retired = true;
        Ok(())
    }

    /// The key with this id, retired or not.
    pub fn get(&self, kid: &str) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// All keys, oldest first.
    pub fn keys(&self) -> &[KeyEntry] {
        &self.keys
    }

    /// The key that signs: the newest unretired key with a secret.
    pub fn signing_key(&self) -> Result<&KeyEntry, KeyError> {
        self.keys
            .iter()
            .rev()
            .find(|k| !k.retired && k.secret.is_some())
            .ok_or(KeyError::NoSigningKey)
    }

    /// The same set without secrets (what hosts receive).
    pub fn public_only(&self) -> KeySet {
        KeySet {
            keys: self
                .keys
                .iter()
                .map(|k| KeyEntry {
                    secret: None,
                    ..k.clone()
                })
                .collect(),
        }
    }

    /// Unretired public keys as PASERK `k4.public`, newest first.
    pub fn public_paserks(&self) -> Vec<String> {
        self.keys
            .iter()
            .rev()
            .filter(|k| !k.retired)
            .map(|k| paserk::encode_public(&k.public))
            .collect()
    }

    /// Loads every key file in `dir` (see the [module docs](self)).
    pub fn load_dir(dir: &Path) -> Result<KeySet, KeyError> {
        let io = |path: &Path, source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut set = KeySet::new();
        let mut names: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for path in names {
            let Some((created, kind)) = parse_key_file_name(&path) else {
                continue;
            };
            let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let bad = |source| KeyError::Paserk {
                path: path.clone(),
                source,
            };
            match kind {
                "secret" => {
                    let sk = paserk::decode_secret(&text).map_err(bad)?;
                    set.insert_secret(sk, created);
                }
                "public" | "retired" => {
                    let pk = paserk::decode_public(&text).map_err(bad)?;
                    let kid = set.insert_public(pk, created);
                    if kind == "retired" {
                        set.retire(&kid)?;
                    }
                }
                _ => {}
            }
        }
        if set.keys.is_empty() {
            return Err(KeyError::Empty(dir.to_path_buf()));
        }
        // Files of one key share a creation stamp; two keys under one stamp
        // means a secret and a public file that do not belong together.
        if let Some(w) = set.keys.windows(2).find(|w| w[0].created == w[1].created) {
            return Err(KeyError::Mismatch {
                path: dir.join(format!("k4-{}.public", w[0].created.as_millis())),
            });
        }
        Ok(set)
    }

    /// Writes every key to `dir` (created if missing): `.secret` files with
    /// mode 0600 where the set holds secrets, `.public` or `.retired` for
    /// every key. Files of keys not in the set are left alone.
    pub fn save_dir(&self, dir: &Path) -> Result<(), KeyError> {
        fs::create_dir_all(dir).map_err(|e| KeyError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        for k in &self.keys {
            let stem = dir.join(format!("k4-{}", k.created.as_millis()));
            if let Some(sk) = &k.secret {
                write_atomic(
                    &stem.with_extension("secret"),
                    &paserk::encode_secret(sk),
                    0o600,
                )?;
            }
            let (keep, drop) = if k.retired {
                ("retired", "public")
            } else {
                ("public", "retired")
            };
            write_atomic(
                &stem.with_extension(keep),
                &paserk::encode_public(&k.public),
                0o644,
            )?;
            let stale = stem.with_extension(drop);
            if stale.exists() {
                fs::remove_file(&stale).map_err(|e| KeyError::Io {
                    path: stale.clone(),
                    source: e,
                })?;
            }
        }
        Ok(())
    }
}

/// `k4-<ms>.<kind>` → (created, kind).
fn parse_key_file_name(path: &Path) -> Option<(Timestamp, &str)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("k4-")?;
    let (ms, kind) = rest.split_once('.')?;
    let ms: i64 = ms.parse().ok()?;
    matches!(kind, "secret" | "public" | "retired").then_some((Timestamp(ms), kind))
}

/// Writes `text` to `path` through a temporary file created with `mode`,
/// synced, then renamed into place.
pub(crate) fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)
}

/// Reads one secret key file (`k4.secret.…`).
pub fn load_secret_file(path: &Path) -> Result<KeyEntry, KeyError> {
    let text = fs::read_to_string(path).map_err(|e| KeyError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let sk = paserk::decode_secret(&text).map_err(|source| KeyError::Paserk {
        path: path.to_path_buf(),
        source,
    })?;
    let created = parse_key_file_name(path).map_or(Timestamp::EPOCH, |(t, _)| t);
    Ok(KeyEntry::new(sk.verifying_key(), Some(sk), created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotation_signs_with_newest_and_keeps_old_for_verification() {
        let mut set = KeySet::generate(Timestamp(1_000)).unwrap();
        let first = set.signing_key().unwrap().kid.clone();
        let second = set.rotate(Timestamp(2_000)).unwrap();
        assert_ne!(first, second);
        assert_eq!(set.signing_key().unwrap().kid, second);
        assert!(!set.get(&first).unwrap().retired);
        set.retire(&second).unwrap();
        assert_eq!(set.signing_key().unwrap().kid, first);
        set.retire(&first).unwrap();
        assert!(matches!(set.signing_key(), Err(KeyError::NoSigningKey)));
        assert!(set.public_paserks().is_empty());
        assert!(matches!(
            set.retire("k4.pid.nope"),
            Err(KeyError::UnknownKey(_))
        ));
    }

    #[test]
    fn save_and_load_round_trip_with_private_files_0600() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = KeySet::generate(Timestamp(1_000)).unwrap();
        let old = set.signing_key().unwrap().kid.clone();
        let new = set.rotate(Timestamp(2_000)).unwrap();
        set.retire(&old).unwrap();
        set.save_dir(dir.path()).unwrap();

        let secret = dir.path().join("k4-2000.secret");
        let mode = fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(dir.path().join("k4-1000.retired").exists());
        assert!(!dir.path().join("k4-1000.public").exists());

        let loaded = KeySet::load_dir(dir.path()).unwrap();
        assert_eq!(loaded.signing_key().unwrap().kid, new);
        assert!(loaded.get(&old).unwrap().retired);

        // Public-only copy: verifies, cannot sign.
        let pubdir = tempfile::tempdir().unwrap();
        set.public_only().save_dir(pubdir.path()).unwrap();
        let pubset = KeySet::load_dir(pubdir.path()).unwrap();
        assert!(pubset.get(&new).unwrap().secret.is_none());
        assert!(matches!(pubset.signing_key(), Err(KeyError::NoSigningKey)));
        assert!(!pubdir.path().join("k4-2000.secret").exists());
    }

    #[test]
    fn load_refuses_garbage_and_empty_dirs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            KeySet::load_dir(dir.path()),
            Err(KeyError::Empty(_))
        ));
        fs::write(dir.path().join("k4-5.public"), "k4.secret.AAAA").unwrap();
        let e = KeySet::load_dir(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("expected a k4.public. PASERK"),
            "{e}"
        );
        fs::remove_file(dir.path().join("k4-5.public")).unwrap();
        let a = KeySet::generate(Timestamp(5)).unwrap();
        let b = KeySet::generate(Timestamp(5)).unwrap();
        a.save_dir(dir.path()).unwrap();
        let b_pub = paserk::encode_public(&b.keys()[0].public);
        fs::write(dir.path().join("k4-5.public"), b_pub).unwrap();
        assert!(matches!(
            KeySet::load_dir(dir.path()),
            Err(KeyError::Mismatch { .. })
        ));
        assert!(matches!(
            KeySet::load_dir(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }
}
