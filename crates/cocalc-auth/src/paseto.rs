//! PASETO v4.public: the wire format of connect tokens.
//!
//! Implemented from the PASETO specification (version 4, purpose `public`):
//!
//! ```text
//! sign:   m2  = PAE("v4.public.", m, f, i)
//!         sig = Ed25519-Sign(sk, m2)
//!         token = "v4.public." || b64url(m || sig) [ || "." || b64url(f) ]
//! verify: the same PAE over the received payload, footer and the caller's
//!         implicit assertion i, then Ed25519 verification (strict).
//! ```
//!
//! `b64url` is unpadded base64url; decoding refuses padding and non-canonical
//! trailing bits, so every token has exactly one spelling. The test vectors of
//! the PASETO standard (`4-S-*`, `4-F-*`) run against this module in
//! `tests/paseto_vectors.rs`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cocalc_core::TokenError;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The header of every token this module makes or accepts.
pub const HEADER: &str = "v4.public.";

const SIG_LEN: usize = 64;

/// Pre-authentication encoding (PAE) of `pieces`, appended to `out`.
pub fn pae_into(out: &mut Vec<u8>, pieces: &[&[u8]]) {
    out.extend_from_slice(&le64(pieces.len() as u64));
    for p in pieces {
        out.extend_from_slice(&le64(p.len() as u64));
        out.extend_from_slice(p);
    }
}

fn le64(n: u64) -> [u8; 8] {
    // The spec clears the most significant bit for interoperability.
    (n & (u64::MAX >> 1)).to_le_bytes()
}

/// Signs `message` with `footer` and `implicit` assertion; returns the token.
pub fn sign(key: &SigningKey, message: &[u8], footer: &[u8], implicit: &[u8]) -> String {
    let mut m2 =
        Vec::with_capacity(48 + HEADER.len() + message.len() + footer.len() + implicit.len());
    pae_into(&mut m2, &[HEADER.as_bytes(), message, footer, implicit]);
    let sig = key.sign(&m2);
    let mut body = Vec::with_capacity(message.len() + SIG_LEN);
    body.extend_from_slice(message);
    body.extend_from_slice(&sig.to_bytes());
    let mut token = String::with_capacity(HEADER.len() + (body.len() + footer.len()) * 4 / 3 + 4);
    token.push_str(HEADER);
    URL_SAFE_NO_PAD.encode_string(&body, &mut token);
    if !footer.is_empty() {
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(footer, &mut token);
    }
    token
}

/// A token split into its parts, signature not yet checked.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// The base64url payload segment (message and signature).
    body_b64: &'a str,
    /// The decoded footer (empty if there is none).
    pub footer: Vec<u8>,
}

/// Splits a token and decodes its footer. Checks the header and the
/// base64url of the footer only; [`Unverified::verify`] does the rest.
pub fn parse(token: &str) -> Result<Unverified<'_>, TokenError> {
    let Some(rest) = token.strip_prefix(HEADER) else {
        return Err(header_error(token));
    };
    let mut parts = rest.split('.');
    let body_b64 = parts.next().unwrap_or("");
    let footer_b64 = parts.next();
    if parts.next().is_some() {
        return Err(TokenError::Malformed("too many '.'-separated segments"));
    }
    if body_b64.is_empty() {
        return Err(TokenError::Malformed("empty payload segment"));
    }
    let footer = match footer_b64 {
        None => Vec::new(),
        Some("") => return Err(TokenError::Malformed("empty footer segment after '.'")),
        Some(f) => URL_SAFE_NO_PAD
            .decode(f)
            .map_err(|_| TokenError::Base64 { segment: "footer" })?,
    };
    Ok(Unverified { body_b64, footer })
}

fn header_error(token: &str) -> TokenError {
    // Report the header as seen (`v4.local.`, `v3.public.`), bounded in length
    // and cut on a character boundary.
    let end = token
        .char_indices()
        .filter(|(_, c)| *c == '.')
        .nth(1)
        .map(|(i, _)| i + 1)
        .unwrap_or(token.len());
    let mut found: String = token[..end].chars().take(16).collect();
    if found.is_empty() {
        found.push_str("(empty)");
    }
    if found.starts_with("v") && found.contains('.') {
        TokenError::WrongHeader { found }
    } else {
        TokenError::Malformed("not a PASETO token (expected \"v4.public.\" header)")
    }
}

impl Unverified<'_> {
    /// Checks the signature with `key` and the `implicit` assertion; returns
    /// the signed message.
    pub fn verify(&self, key: &VerifyingKey, implicit: &[u8]) -> Result<Vec<u8>, TokenError> {
        let mut body = URL_SAFE_NO_PAD
            .decode(self.body_b64)
            .map_err(|_| TokenError::Base64 { segment: "payload" })?;
        if body.len() < SIG_LEN {
            return Err(TokenError::Malformed("payload shorter than a signature"));
        }
        let split = body.len() - SIG_LEN;
        let mut sig = [0u8; SIG_LEN];
        sig.copy_from_slice(&body[split..]);
        body.truncate(split);
        let mut m2 =
            Vec::with_capacity(48 + HEADER.len() + body.len() + self.footer.len() + implicit.len());
        pae_into(&mut m2, &[HEADER.as_bytes(), &body, &self.footer, implicit]);
        key.verify_strict(&m2, &Signature::from_bytes(&sig))
            .map_err(|_| TokenError::BadSignature)?;
        Ok(body)
    }
}

/// Verifies a whole token with one key: header, segments, signature.
/// Returns `(message, footer)`.
pub fn verify(
    key: &VerifyingKey,
    token: &str,
    implicit: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), TokenError> {
    let u = parse(token)?;
    let m = u.verify(key, implicit)?;
    Ok((m, u.footer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_spec_examples() {
        // From the PASETO spec's PAE section.
        let mut out = Vec::new();
        pae_into(&mut out, &[]);
        assert_eq!(out, b"\x00\x00\x00\x00\x00\x00\x00\x00");
        out.clear();
        pae_into(&mut out, &[b""]);
        assert_eq!(out, b"\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        out.clear();
        pae_into(&mut out, &[b"test"]);
        assert_eq!(out, b"\x01\0\0\0\0\0\0\0\x04\0\0\0\0\0\0\0test");
    }

    #[test]
    fn round_trip_and_tamper() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let t = sign(&sk, b"{\"a\":1}", b"foot", b"");
        let (m, f) = verify(&sk.verifying_key(), &t, b"").unwrap();
        assert_eq!(
            (m.as_slice(), f.as_slice()),
            (&b"{\"a\":1}"[..], &b"foot"[..])
        );
        assert_eq!(
            verify(&sk.verifying_key(), &t, b"other").unwrap_err(),
            TokenError::BadSignature
        );
        let other_footer = format!(
            "{}.{}",
            t.rsplit_once('.').unwrap().0,
            URL_SAFE_NO_PAD.encode("fool")
        );
        assert_eq!(
            verify(&sk.verifying_key(), &other_footer, b"").unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn header_errors_are_specific() {
        assert!(
            matches!(parse("v4.local.abc"), Err(TokenError::WrongHeader { found }) if found == "v4.local.")
        );
        assert!(
            matches!(parse("v3.public.abc"), Err(TokenError::WrongHeader { found }) if found == "v3.public.")
        );
        assert!(matches!(parse("garbage"), Err(TokenError::Malformed(_))));
        assert!(matches!(parse(""), Err(TokenError::Malformed(_))));
        assert!(matches!(parse("v4.public."), Err(TokenError::Malformed(_))));
        assert!(matches!(
            parse("v4.public.a.b.c"),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            parse("v4.public.aaaa."),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            parse("v4.public.aaaa.a==="),
            Err(TokenError::Base64 { segment: "footer" })
        ));
        // Multi-byte characters in the header never split a char.
        assert!(parse("vé.public.x").is_err());
    }
}
