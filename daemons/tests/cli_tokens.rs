//! The `cocalc` binary's key and token commands, run as a user would.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const USER: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const PROJECT: &str = "7ba7b810-9dad-41d1-80b4-00c04fd430c8";
const HOST: &str = "8ba7b810-9dad-41d1-80b4-00c04fd430c8";
const OTHER_HOST: &str = "9ba7b810-9dad-41d1-80b4-00c04fd430c8";

fn cocalc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cocalc"))
        .args(args)
        .output()
        .expect("run cocalc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

fn keygen(dir: &Path) -> String {
    let o = cocalc(&["keygen", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

fn secret_file(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "secret"))
        .expect("a .secret file")
        .to_string_lossy()
        .into_owned()
}

fn mint(key: &str, host: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "token",
        "mint",
        "--key",
        key,
        "--user",
        USER,
        "--project",
        PROJECT,
        "--host",
        host,
    ];
    args.extend_from_slice(extra);
    cocalc(&args)
}

#[test]
fn keygen_mint_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let kid = keygen(dir.path());
    assert!(kid.starts_with("k4.pid."), "{kid}");
    let secret = secret_file(dir.path());
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key file mode");

    let o = mint(
        &secret,
        HOST,
        &["--perm", "read", "--ttl", "5m", "--generation", "3"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let token = stdout(&o);
    assert!(token.starts_with("v4.public."));

    let keys = dir.path().to_str().unwrap();
    let o = cocalc(&["token", "verify", "--keys", keys, "--host", HOST, &token]);
    assert!(o.status.success(), "{}", stderr(&o));
    let claims: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(claims["user"], USER);
    assert_eq!(claims["project"], PROJECT);
    assert_eq!(claims["host"], HOST);
    assert_eq!(claims["permission"], "read");
    assert_eq!(claims["generation"], 3);
    assert_eq!(claims["key_id"], kid.as_str());
    let ttl = claims["expires"].as_i64().unwrap() - claims["issued_at"].as_i64().unwrap();
    assert_eq!(ttl, 300_000);

    // A key directory works for minting too (its newest key signs).
    let o = mint(keys, HOST, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn verify_refusals_exit_nonzero_with_one_precise_line() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let keys = dir.path().to_str().unwrap();
    let token = stdout(&mint(&secret_file(dir.path()), HOST, &[]));

    let cases: Vec<(String, &str, &str)> = vec![
        (token.clone(), OTHER_HOST, "token_wrong_host"),
        ("v4.local.abc".into(), HOST, "token_wrong_header"),
        ("hello".into(), HOST, "token_malformed"),
        (format!("{token}="), HOST, "token_bad_base64"),
        (
            "v4.public.".to_string() + &"A".repeat(5000),
            HOST,
            "token_too_long",
        ),
    ];
    for (tok, host, code) in cases {
        let o = cocalc(&["token", "verify", "--keys", keys, "--host", host, &tok]);
        assert_eq!(o.status.code(), Some(3), "{code}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(code), "{code} in {err}");
        assert!(o.stdout.is_empty());
    }

    // Keys from another directory: unknown key id.
    let other = tempfile::tempdir().unwrap();
    keygen(other.path());
    let o = cocalc(&[
        "token",
        "verify",
        "--keys",
        other.path().to_str().unwrap(),
        "--host",
        HOST,
        &token,
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("token_unknown_key"), "{}", stderr(&o));
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let secret = secret_file(dir.path());

    let o = cocalc(&[
        "token",
        "mint",
        "--key",
        &secret,
        "--user",
        "bob",
        "--project",
        PROJECT,
        "--host",
        HOST,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid user id"), "{}", stderr(&o));

    let o = mint(&secret, HOST, &["--ttl", "1h"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("outside allowed 60..=1800 s"),
        "{}",
        stderr(&o)
    );

    let o = mint(&secret, HOST, &["--perm", "owner"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown permission"), "{}", stderr(&o));

    let o = cocalc(&[
        "token",
        "verify",
        "--keys",
        "/nonexistent/keys",
        "--host",
        HOST,
        "x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/keys"), "{}", stderr(&o));
}
