//! Identifiers: [`ProjectId`], [`HostId`], [`UserId`].
//!
//! All three are UUIDs written in the canonical form only: 36 characters,
//! lowercase hexadecimal, hyphens after the 8th, 12th, 16th and 20th digit
//! (`6ba7b810-9dad-11d1-80b4-00c04fd430c8`). Parsing refuses anything else —
//! uppercase digits, braces, `urn:uuid:` prefixes, missing hyphens, extra
//! characters — with an [`IdError`] that says what was wrong and where. One
//! spelling per id means an id can be compared, logged and used in a path
//! without normalisation, and a path segment that parses is exactly 36 bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length in bytes of a canonical UUID string.
pub const UUID_STR_LEN: usize = 36;

/// Why a string is not a canonical UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string does not have exactly 36 bytes.
    #[error("invalid {kind} id: expected 36 characters (canonical lowercase UUID), got {len}")]
    Length {
        /// Which kind of id was being parsed (`project`, `host`, `user`).
        kind: &'static str,
        /// The length that was seen.
        len: usize,
    },
    /// A hyphen is missing or misplaced.
    #[error("invalid {kind} id: expected '-' at position {pos}")]
    Hyphen {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// Zero-based byte offset where a hyphen was expected.
        pos: usize,
    },
    /// A byte that is not a lowercase hexadecimal digit.
    #[error("invalid {kind} id: character at position {pos} is not a lowercase hex digit")]
    Digit {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// Zero-based byte offset of the offending byte.
        pos: usize,
    },
}

const HYPHENS: [usize; 4] = [8, 13, 18, 23];

/// Each byte's value as a lowercase hex digit, or 0xff.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Where each byte's two digits start in a canonical UUID string (no
/// pair straddles a hyphen: the groups have 8, 4, 4, 4 and 12 digits).
const PAIRS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// Parses a canonical lowercase hyphenated UUID into its 16 bytes.
pub fn parse_uuid(kind: &'static str, s: &str) -> Result<[u8; 16], IdError> {
    let b = s.as_bytes();
    if b.len() != UUID_STR_LEN {
        return Err(IdError::Length { kind, len: b.len() });
    }
    // Fast path: decode every pair, note any bad byte, and only if there
    // was one walk the string again to say where.
    let mut out = [0u8; 16];
    let mut bad = HYPHENS.iter().any(|&p| b[p] != b'-');
    for (byte, &p) in out.iter_mut().zip(PAIRS.iter()) {
        let (hi, lo) = (HEX_VALUE[b[p] as usize], HEX_VALUE[b[p + 1] as usize]);
        bad |= (hi | lo) > 0xf;
        *byte = (hi << 4) | (lo & 0xf);
    }
    if !bad {
        return Ok(out);
    }
    for (pos, &c) in b.iter().enumerate() {
        if HYPHENS.contains(&pos) {
            if c != b'-' {
                return Err(IdError::Hyphen { kind, pos });
            }
        } else if HEX_VALUE[c as usize] > 0xf {
            return Err(IdError::Digit { kind, pos });
        }
    }
    unreachable_bad_uuid(kind)
}

/// The fast path saw a bad byte that the precise walk did not find; the
/// two agree by construction, so this only keeps the function total.
#[cold]
fn unreachable_bad_uuid(kind: &'static str) -> Result<[u8; 16], IdError> {
    Err(IdError::Digit { kind, pos: 0 })
}

fn write_uuid(bytes: &[u8; 16], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(encoded_str(&encode_uuid(bytes)))
}

/// The canonical form of `bytes`: lowercase hex digits and hyphens.
const fn encode_uuid(bytes: &[u8; 16]) -> [u8; UUID_STR_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; UUID_STR_LEN];
    let (mut n, mut i) = (0, 0);
    while n < 16 {
        if matches!(n, 4 | 6 | 8 | 10) {
            buf[i] = b'-';
            i += 1;
        }
        buf[i] = HEX[(bytes[n] >> 4) as usize];
        buf[i + 1] = HEX[(bytes[n] & 0xf) as usize];
        i += 2;
        n += 1;
    }
    buf
}

/// [`encode_uuid`]'s bytes as text (they are ASCII).
fn encoded_str(buf: &[u8; UUID_STR_LEN]) -> &str {
    std::str::from_utf8(buf).unwrap_or_default()
}

/// The OpenAPI schema of every id: a canonical lowercase UUID string.
#[cfg(feature = "openapi")]
pub(crate) fn uuid_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".into())))
        .pattern(Some(
            "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        ))
        .into()
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// The id with these 16 bytes, taken as they are.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// A version-4 (random) id from 16 random bytes: the version and
            /// variant bits are set, the other 122 bits are kept. The caller
            /// supplies the randomness, so a seeded RNG gives repeatable ids.
            pub const fn new_v4(mut random: [u8; 16]) -> Self {
                random[6] = (random[6] & 0x0f) | 0x40;
                random[8] = (random[8] & 0x3f) | 0x80;
                Self(random)
            }

            /// The 16 bytes of the id.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses the canonical form (see the [module docs](crate::id)).
            pub fn parse(s: &str) -> Result<Self, IdError> {
                parse_uuid($kind, s).map(Self)
            }

            /// The canonical form as ASCII bytes (what `Display` writes),
            /// without allocating or going through a formatter.
            pub const fn encode(&self) -> [u8; UUID_STR_LEN] {
                encode_uuid(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_uuid(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                write_uuid(&self.0, f)?;
                f.write_str(")")
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                crate::id::uuid_schema()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(encoded_str(&self.encode()))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// A project: one home directory plus the container that runs its programs.
    ProjectId,
    "project"
);
uuid_id!(
    /// A project-host: one machine (or one agent) that runs projects.
    HostId,
    "host"
);
uuid_id!(
    /// A user (account) known to the master.
    UserId,
    "user"
);

impl UserId {
    /// The master acting for itself, not for a user: the subject of the
    /// tokens it mints for the host calls of a move. It is the nil UUID,
    /// which no user has (user ids are random, version 4). A host grants
    /// such a token the permission it carries without an ACL lookup, and
    /// only such a token may make the calls reserved to the master.
    pub const MASTER: UserId = UserId([0; 16]);

    /// True for [`UserId::MASTER`].
    pub const fn is_master(&self) -> bool {
        u128::from_be_bytes(self.0) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    #[test]
    fn canonical_round_trips() {
        let id = ProjectId::parse(OK).unwrap();
        assert_eq!(id.to_string(), OK);
        assert_eq!(format!("{id:?}"), format!("ProjectId({OK})"));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{OK}\""));
        assert_eq!(serde_json::from_str::<ProjectId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_non_canonical_forms_with_precise_errors() {
        let upper = OK.to_uppercase();
        assert_eq!(
            HostId::parse(&upper),
            Err(IdError::Digit {
                kind: "host",
                pos: 1
            })
        );
        assert_eq!(
            UserId::parse(&OK[..35]),
            Err(IdError::Length {
                kind: "user",
                len: 35
            })
        );
        assert_eq!(
            ProjectId::parse(&format!("{OK}0")),
            Err(IdError::Length {
                kind: "project",
                len: 37
            })
        );
        let no_hyphen = OK.replacen('-', "0", 1);
        assert_eq!(
            ProjectId::parse(&no_hyphen),
            Err(IdError::Hyphen {
                kind: "project",
                pos: 8
            })
        );
        assert!(ProjectId::parse(&format!("{{{}}}", &OK[..34])).is_err());
        assert!(ProjectId::parse("6ba7b810-9dad-11d1-80b4-00c04fd430cg").is_err());
        // A multi-byte character must not be sliced into or accepted.
        assert!(ProjectId::parse("6ba7b810-9dad-11d1-80b4-00c04fd430é").is_err());
        assert!(serde_json::from_str::<ProjectId>("\"not-a-uuid\"").is_err());
    }

    #[test]
    fn every_byte_at_every_position_is_judged_by_its_place() {
        for pos in 0..UUID_STR_LEN {
            for c in 0u8..128 {
                let mut b = OK.as_bytes().to_vec();
                b[pos] = c;
                let s = std::str::from_utf8(&b).unwrap();
                let r = ProjectId::parse(s);
                if HYPHENS.contains(&pos) {
                    match c {
                        b'-' => assert!(r.is_ok(), "{s}"),
                        _ => assert_eq!(
                            r,
                            Err(IdError::Hyphen {
                                kind: "project",
                                pos
                            }),
                            "{s}"
                        ),
                    }
                } else if c.is_ascii_digit() || (b'a'..=b'f').contains(&c) {
                    assert_eq!(r.unwrap().to_string(), s);
                } else {
                    assert_eq!(
                        r,
                        Err(IdError::Digit {
                            kind: "project",
                            pos
                        }),
                        "{s}"
                    );
                }
            }
        }
        for seed in 0u8..=255 {
            let id = ProjectId::from_bytes(std::array::from_fn(|i| {
                (i as u8)
                    .wrapping_mul(seed)
                    .wrapping_add(seed.rotate_left(3))
            }));
            assert_eq!(ProjectId::parse(&id.to_string()), Ok(id));
        }
    }

    #[test]
    fn new_v4_sets_version_and_variant() {
        let id = UserId::new_v4([0xff; 16]);
        let s = id.to_string();
        assert_eq!(&s[14..15], "4");
        assert_eq!(&s[19..20], "b");
        assert_eq!(UserId::parse(&s).unwrap(), id);
    }
}
