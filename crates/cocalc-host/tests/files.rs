//! `ProjectFiles`: round trips of every operation, and every way out of the
//! home refused with nothing outside touched.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cocalc_host::files::{FileError, FileKind, ProjectFiles, MAX_PATH_BYTES};

/// A temp root holding `home/` (the project), `other/` (another project's
/// home) and `outside/` (anything else on the host), each with a file.
struct Fixture {
    _root: tempfile::TempDir,
    home: PathBuf,
    other: PathBuf,
    outside: PathBuf,
    files: ProjectFiles,
}

const SECRET: &[u8] = b"outside secret";
const OTHER_SECRET: &[u8] = b"other project's secret";

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        let other = root.path().join("other");
        let outside = root.path().join("outside");
        for d in [&home, &other, &outside] {
            fs::create_dir(d).unwrap();
        }
        fs::write(outside.join("secret"), SECRET).unwrap();
        fs::write(other.join("secret"), OTHER_SECRET).unwrap();
        let files = ProjectFiles::open(&home).unwrap();
        Fixture {
            _root: root,
            home,
            other,
            outside,
            files,
        }
    }

    /// Everything outside the home is as the fixture made it.
    fn assert_outside_untouched(&self) {
        assert_eq!(names(&self.outside), vec!["secret"]);
        assert_eq!(fs::read(self.outside.join("secret")).unwrap(), SECRET);
        assert_eq!(names(&self.other), vec!["secret"]);
        assert_eq!(fs::read(self.other.join("secret")).unwrap(), OTHER_SECRET);
        let root = self.home.parent().unwrap();
        assert_eq!(names(root), vec!["home", "other", "outside"]);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[track_caller]
fn assert_escape<T: std::fmt::Debug>(r: Result<T, FileError>) {
    match r {
        Err(FileError::Escape(_)) => {}
        other => panic!("expected Escape, got {other:?}"),
    }
}

/// Runs every operation on `path` (as source and as destination) and
/// asserts each is refused with `Escape`.
async fn assert_all_ops_escape(f: &Fixture, path: &str) {
    fs::write(f.home.join("here"), b"here").unwrap();
    assert_escape(f.files.list(path).await);
    assert_escape(f.files.read(path, 1 << 20).await);
    assert_escape(f.files.write(path, b"pwned".to_vec()).await);
    assert_escape(f.files.mkdir(path).await);
    assert_escape(f.files.rename(path, "stolen").await);
    assert_escape(f.files.rename("here", path).await);
    assert_escape(f.files.remove(path).await);
    assert!(
        f.home.join("here").exists(),
        "{path}: source of a refused rename is gone"
    );
    assert!(!f.home.join("stolen").exists());
    f.assert_outside_untouched();
}

#[tokio::test]
async fn write_read_stat_list_round_trip() {
    let f = Fixture::new();
    f.files.write("a.txt", b"hello".to_vec()).await.unwrap();
    assert_eq!(f.files.read("a.txt", 100).await.unwrap(), b"hello");
    assert_eq!(fs::read(f.home.join("a.txt")).unwrap(), b"hello");

    // Replace.
    f.files.write("a.txt", b"bye".to_vec()).await.unwrap();
    assert_eq!(f.files.read("./a.txt", 100).await.unwrap(), b"bye");

    f.files.mkdir("sub").await.unwrap();
    f.files.write("sub/b", Vec::new()).await.unwrap();
    assert_eq!(f.files.read("sub//b", 0).await.unwrap(), b"");

    let st = f.files.stat("a.txt").await.unwrap();
    assert_eq!(st.name, "a.txt");
    assert_eq!(st.kind, FileKind::File);
    assert_eq!(st.size, 3);
    assert!(st.modified_ms.unwrap() > 1_600_000_000_000);
    assert_eq!(st.mode.unwrap() & !0o022, 0o644);

    let home = f.files.stat("").await.unwrap();
    assert_eq!((home.name.as_str(), home.kind), (".", FileKind::Dir));
    assert_eq!(f.files.stat(".").await.unwrap(), home);
    assert_eq!(f.files.stat("sub/").await.unwrap().kind, FileKind::Dir);

    symlink("a.txt", f.home.join("link")).unwrap();
    let list = f.files.list("").await.unwrap();
    let got: Vec<_> = list.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        got,
        vec![
            ("a.txt", FileKind::File),
            ("link", FileKind::Symlink),
            ("sub", FileKind::Dir)
        ]
    );
    assert_eq!(f.files.list(".").await.unwrap(), list);
    assert_eq!(f.files.list("sub").await.unwrap()[0].name, "b");
    // A symlink that stays inside the home is followed by read.
    assert_eq!(f.files.read("link", 100).await.unwrap(), b"bye");
    assert_eq!(f.files.stat("link").await.unwrap().kind, FileKind::Symlink);

    // Serde shape.
    let json = serde_json::to_value(&list[2]).unwrap();
    assert_eq!(json["kind"], "dir");
    assert_eq!(json["name"], "sub");
}

#[tokio::test]
async fn list_and_stat_errors() {
    let f = Fixture::new();
    f.files.write("file", b"x".to_vec()).await.unwrap();
    assert!(matches!(
        f.files.list("nope").await,
        Err(FileError::NotFound(_))
    ));
    assert!(matches!(
        f.files.stat("nope").await,
        Err(FileError::NotFound(_))
    ));
    assert!(matches!(
        f.files.list("file").await,
        Err(FileError::NotADirectory(_))
    ));
    assert!(matches!(
        f.files.read("nope", 1).await,
        Err(FileError::NotFound(_))
    ));
    assert!(matches!(
        f.files.read("", 1).await,
        Err(FileError::IsADirectory(_))
    ));
    f.files.mkdir("d").await.unwrap();
    assert!(matches!(
        f.files.read("d", 1).await,
        Err(FileError::IsADirectory(_))
    ));
    assert!(matches!(
        f.files.read("file/x", 1).await,
        Err(FileError::NotADirectory(_))
    ));
}

#[tokio::test]
async fn read_size_cap() {
    let f = Fixture::new();
    f.files.write("ten", vec![7; 10]).await.unwrap();
    assert_eq!(f.files.read("ten", 10).await.unwrap().len(), 10);
    match f.files.read("ten", 9).await {
        Err(FileError::TooLarge { path, size, max }) => {
            assert_eq!((path.as_str(), size, max), ("ten", 10, 9));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        f.files.read("ten", 0).await,
        Err(FileError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn read_of_a_fifo_is_refused_without_hanging() {
    let f = Fixture::new();
    nix::unistd::mkfifo(
        &f.home.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        f.files.read("fifo", 100),
    )
    .await
    .expect("read of a FIFO hung");
    assert!(matches!(r, Err(FileError::Invalid(_))), "{r:?}");
    assert_eq!(f.files.stat("fifo").await.unwrap().kind, FileKind::Other);
}

#[tokio::test]
async fn atomic_write_leaves_no_temp_files() {
    let f = Fixture::new();
    f.files.mkdir("d").await.unwrap();
    for i in 0..20u8 {
        f.files.write("d/f", vec![i; 1000]).await.unwrap();
    }
    f.files.write("top", b"x".to_vec()).await.unwrap();
    assert_eq!(names(&f.home.join("d")), vec!["f"]);
    assert_eq!(names(&f.home), vec!["d", "top"]);
    assert_eq!(fs::read(f.home.join("d/f")).unwrap(), vec![19; 1000]);

    // Failures leave nothing behind either.
    assert!(matches!(
        f.files.write("d", b"x".to_vec()).await,
        Err(FileError::IsADirectory(_))
    ));
    assert!(matches!(
        f.files.write("missing/f", b"x".to_vec()).await,
        Err(FileError::NotFound(_))
    ));
    assert!(matches!(
        f.files.write("top/f", b"x".to_vec()).await,
        Err(FileError::NotADirectory(_))
    ));
    assert!(matches!(
        f.files.write("", b"x".to_vec()).await,
        Err(FileError::IsADirectory(_))
    ));
    assert_eq!(names(&f.home.join("d")), vec!["f"]);
    assert_eq!(names(&f.home), vec!["d", "top"]);
}

#[tokio::test]
async fn concurrent_writes_leave_one_whole_version() {
    let f = Fixture::new();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let files = f.files.clone();
        tasks.push(tokio::spawn(async move {
            files.write("f", vec![i; 64 * 1024]).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let data = f.files.read("f", 1 << 20).await.unwrap();
    assert_eq!(data.len(), 64 * 1024);
    assert!(data.iter().all(|b| *b == data[0]));
    assert_eq!(names(&f.home), vec!["f"]);
}

#[tokio::test]
async fn replacing_a_file_keeps_its_mode() {
    let f = Fixture::new();
    f.files
        .write("script", b"#!/bin/sh\n".to_vec())
        .await
        .unwrap();
    fs::set_permissions(f.home.join("script"), fs::Permissions::from_mode(0o750)).unwrap();
    f.files
        .write("script", b"#!/bin/sh\necho\n".to_vec())
        .await
        .unwrap();
    let meta = fs::metadata(f.home.join("script")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!(f.files.stat("script").await.unwrap().mode, Some(0o750));
}

#[tokio::test]
async fn new_files_and_dirs_take_their_parents_owner_when_root() {
    let f = Fixture::new();
    if fs::metadata(&f.home).unwrap().uid() != 0 {
        eprintln!("not root: skipping the ownership check");
        return;
    }
    std::os::unix::fs::chown(&f.home, Some(4242), Some(4343)).unwrap();
    f.files.write("new", b"x".to_vec()).await.unwrap();
    f.files.mkdir("a/b").await.unwrap();
    for p in ["new", "a", "a/b"] {
        let m = fs::metadata(f.home.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
    }
    // A replaced file keeps its own owner.
    std::os::unix::fs::chown(f.home.join("new"), Some(1111), Some(2222)).unwrap();
    f.files.write("new", b"y".to_vec()).await.unwrap();
    let m = fs::metadata(f.home.join("new")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1111, 2222));
}

#[tokio::test]
async fn mkdir_has_create_dir_all_semantics() {
    let f = Fixture::new();
    f.files.mkdir("a/b/c").await.unwrap();
    assert!(f.home.join("a/b/c").is_dir());
    f.files.mkdir("a/b/c").await.unwrap();
    f.files.mkdir("a").await.unwrap();
    f.files.mkdir("").await.unwrap();
    f.files.mkdir(".").await.unwrap();
    f.files.write("a/file", b"x".to_vec()).await.unwrap();
    assert!(matches!(
        f.files.mkdir("a/file").await,
        Err(FileError::AlreadyExists(_))
    ));
    assert!(matches!(
        f.files.mkdir("a/file/sub").await,
        Err(FileError::AlreadyExists(_) | FileError::NotADirectory(_))
    ));
    // Through a symlink that stays inside.
    symlink("a", f.home.join("to-a")).unwrap();
    f.files.mkdir("to-a/new").await.unwrap();
    assert!(f.home.join("a/new").is_dir());
}

#[tokio::test]
async fn rename_round_trip() {
    let f = Fixture::new();
    f.files.write("a", b"1".to_vec()).await.unwrap();
    f.files.mkdir("d").await.unwrap();
    f.files.rename("a", "d/b").await.unwrap();
    assert_eq!(f.files.read("d/b", 10).await.unwrap(), b"1");
    assert!(matches!(
        f.files.stat("a").await,
        Err(FileError::NotFound(_))
    ));
    f.files.rename("d", "e").await.unwrap();
    assert_eq!(f.files.read("e/b", 10).await.unwrap(), b"1");
    // Replaces a file, POSIX style.
    f.files.write("c", b"2".to_vec()).await.unwrap();
    f.files.rename("c", "e/b").await.unwrap();
    assert_eq!(f.files.read("e/b", 10).await.unwrap(), b"2");

    assert!(matches!(
        f.files.rename("nope", "x").await,
        Err(FileError::NotFound(_))
    ));
    f.files.mkdir("full/x").await.unwrap();
    f.files.mkdir("empty").await.unwrap();
    assert!(matches!(
        f.files.rename("empty", "full").await,
        Err(FileError::AlreadyExists(_))
    ));
    assert!(matches!(
        f.files.rename("full", "full/x/in-itself").await,
        Err(FileError::Invalid(_))
    ));
    for (from, to) in [("", "x"), (".", "x"), ("e", ""), ("e", ".")] {
        assert!(matches!(
            f.files.rename(from, to).await,
            Err(FileError::Invalid(_))
        ));
    }
    assert!(f.home.join("e/b").exists());
}

#[tokio::test]
async fn remove_files_symlinks_and_trees() {
    let f = Fixture::new();
    f.files.mkdir("tree/a/b").await.unwrap();
    f.files.write("tree/a/b/f", b"x".to_vec()).await.unwrap();
    f.files.write("file", b"x".to_vec()).await.unwrap();
    symlink("file", f.home.join("link")).unwrap();
    // A symlink inside the tree to a directory outside: removing the tree
    // removes the link, not what it points at.
    symlink(&f.outside, f.home.join("tree/a/out")).unwrap();

    f.files.remove("link").await.unwrap();
    assert!(f.home.join("file").exists());
    f.files.remove("file").await.unwrap();
    f.files.remove("tree").await.unwrap();
    assert!(names(&f.home).is_empty());
    assert!(matches!(
        f.files.remove("tree").await,
        Err(FileError::NotFound(_))
    ));
    f.assert_outside_untouched();
}

#[tokio::test]
async fn remove_refuses_the_home_itself() {
    let f = Fixture::new();
    f.files.write("keep", b"x".to_vec()).await.unwrap();
    for p in ["", ".", "./", "/", "//", "./."] {
        let r = f.files.remove(p).await;
        assert!(
            matches!(r, Err(FileError::Invalid(_) | FileError::Escape(_))),
            "{p:?}: {r:?}"
        );
    }
    assert!(f.home.join("keep").exists());
}

#[tokio::test]
async fn dotdot_is_refused_before_touching_the_disk() {
    let f = Fixture::new();
    f.files.mkdir("a").await.unwrap();
    for p in [
        "..",
        "../outside/secret",
        "../other/secret",
        "a/../../outside/secret",
        // Even when it would stay inside.
        "a/..",
        "a/../here",
        "./..",
    ] {
        assert_all_ops_escape(&f, p).await;
        assert_escape(f.files.stat(p).await);
    }
}

#[tokio::test]
async fn absolute_paths_are_refused() {
    let f = Fixture::new();
    let secret = f.outside.join("secret");
    let other = f.other.join("secret");
    let home_abs = f.home.join("here");
    for p in [
        "/etc/passwd",
        "/",
        secret.to_str().unwrap(),
        other.to_str().unwrap(),
        home_abs.to_str().unwrap(),
        f.outside.to_str().unwrap(),
    ] {
        assert_all_ops_escape(&f, p).await;
        match f.files.read(p, 1 << 20).await {
            Err(e @ FileError::Escape(_)) => {
                assert!(
                    e.to_string().contains("absolute paths are not allowed"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn nul_and_over_long_paths_are_invalid() {
    let f = Fixture::new();
    let long = "a/".repeat(MAX_PATH_BYTES / 2 + 1);
    for p in ["a\0b", "\0", "../\0", long.as_str()] {
        assert!(matches!(f.files.list(p).await, Err(FileError::Invalid(_))));
        assert!(matches!(f.files.stat(p).await, Err(FileError::Invalid(_))));
        assert!(matches!(
            f.files.read(p, 1).await,
            Err(FileError::Invalid(_))
        ));
        assert!(matches!(
            f.files.write(p, vec![]).await,
            Err(FileError::Invalid(_))
        ));
        assert!(matches!(f.files.mkdir(p).await, Err(FileError::Invalid(_))));
        assert!(matches!(
            f.files.rename(p, "x").await,
            Err(FileError::Invalid(_))
        ));
        assert!(matches!(
            f.files.rename("x", p).await,
            Err(FileError::Invalid(_))
        ));
        assert!(matches!(
            f.files.remove(p).await,
            Err(FileError::Invalid(_))
        ));
    }
    // One over-long name (the OS limit is 255 bytes) is Invalid too.
    let name = "n".repeat(300);
    assert!(matches!(
        f.files.write(&name, vec![]).await,
        Err(FileError::Invalid(_))
    ));
    assert!(names(&f.home).is_empty());
}

#[tokio::test]
async fn symlink_to_etc_passwd_is_not_followed() {
    let f = Fixture::new();
    symlink("/etc/passwd", f.home.join("passwd")).unwrap();
    let passwd_before = fs::read("/etc/passwd").ok();
    assert_escape(f.files.read("passwd", 1 << 20).await);
    assert_escape(f.files.list("passwd").await);
    // stat describes the link itself and leaks nothing of the target.
    let st = f.files.stat("passwd").await.unwrap();
    assert_eq!(st.kind, FileKind::Symlink);
    assert_eq!(st.size, "/etc/passwd".len() as u64);
    // write replaces the link, never the target.
    f.files.write("passwd", b"mine".to_vec()).await.unwrap();
    assert_eq!(f.files.stat("passwd").await.unwrap().kind, FileKind::File);
    assert_eq!(fs::read("/etc/passwd").ok(), passwd_before);
}

#[tokio::test]
async fn symlinks_to_a_file_outside_are_refused() {
    let f = Fixture::new();
    symlink(f.outside.join("secret"), f.home.join("abs")).unwrap();
    symlink("../outside/secret", f.home.join("rel")).unwrap();
    fs::create_dir(f.home.join("deep")).unwrap();
    symlink("../../outside/secret", f.home.join("deep/rel")).unwrap();
    // A chain: inside link -> inside link -> outside.
    symlink("rel", f.home.join("chain")).unwrap();
    for p in ["abs", "rel", "deep/rel", "chain"] {
        assert_escape(f.files.read(p, 1 << 20).await);
        assert_escape(f.files.list(p).await);
        assert_escape(f.files.mkdir(&format!("{p}/x")).await);
        assert_escape(f.files.write(&format!("{p}/x"), b"x".to_vec()).await);
        f.assert_outside_untouched();
    }
    // Removing a link removes the link only.
    f.files.remove("abs").await.unwrap();
    f.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_to_a_directory_outside_is_refused() {
    let f = Fixture::new();
    symlink(&f.outside, f.home.join("out-abs")).unwrap();
    symlink("../outside", f.home.join("out-rel")).unwrap();
    symlink("..", f.home.join("up")).unwrap();
    symlink("/", f.home.join("root")).unwrap();
    for link in ["out-abs", "out-rel"] {
        assert_escape(f.files.list(link).await);
        assert_all_ops_escape(&f, &format!("{link}/secret")).await;
        assert_all_ops_escape(&f, &format!("{link}/new")).await;
        assert_escape(f.files.stat(&format!("{link}/secret")).await);
        assert_escape(f.files.mkdir(&format!("{link}/a/b")).await);
    }
    for link in ["up", "root"] {
        assert_escape(f.files.list(link).await);
        assert_escape(f.files.read(&format!("{link}/outside/secret"), 100).await);
        assert_escape(f.files.read(&format!("{link}/etc/passwd"), 1 << 20).await);
        assert_escape(f.files.remove(&format!("{link}/outside/secret")).await);
    }
    f.assert_outside_untouched();
    // The links themselves can be listed, moved and removed.
    f.files.remove("here").await.unwrap();
    let list = f.files.list("").await.unwrap();
    let got: Vec<_> = list.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        got,
        [
            ("out-abs", FileKind::Symlink),
            ("out-rel", FileKind::Symlink),
            ("root", FileKind::Symlink),
            ("up", FileKind::Symlink)
        ]
    );
    f.files.rename("out-abs", "moved").await.unwrap();
    for link in ["moved", "out-rel", "up", "root"] {
        f.files.remove(link).await.unwrap();
    }
    assert!(names(&f.home).is_empty());
    f.assert_outside_untouched();
}

#[tokio::test]
async fn directory_replaced_by_a_symlink_between_calls() {
    let f = Fixture::new();
    f.files.mkdir("d").await.unwrap();
    f.files.write("d/secret", b"mine".to_vec()).await.unwrap();
    assert_eq!(f.files.read("d/secret", 100).await.unwrap(), b"mine");

    // The project swaps its directory for a link to the outside.
    fs::remove_dir_all(f.home.join("d")).unwrap();
    symlink(&f.outside, f.home.join("d")).unwrap();

    assert_escape(f.files.list("d").await);
    assert_escape(f.files.stat("d/secret").await);
    assert_all_ops_escape(&f, "d/secret").await;
    assert_all_ops_escape(&f, "d/brand-new").await;
    assert_escape(f.files.mkdir("d/x/y").await);
    // Removing `d` now removes the link, not the directory outside.
    f.files.remove("d").await.unwrap();
    f.assert_outside_untouched();
}

#[tokio::test]
async fn home_replaced_after_open_keeps_the_original() {
    let f = Fixture::new();
    f.files.write("mine", b"mine".to_vec()).await.unwrap();
    let moved = f.home.with_file_name("home-moved");
    fs::rename(&f.home, &moved).unwrap();
    symlink(&f.outside, &f.home).unwrap();
    // Still the original directory: the handle was opened once.
    assert_eq!(f.files.read("mine", 100).await.unwrap(), b"mine");
    assert!(matches!(
        f.files.read("secret", 100).await,
        Err(FileError::NotFound(_))
    ));
    f.files.write("new", b"x".to_vec()).await.unwrap();
    assert!(moved.join("new").exists());
    assert_eq!(names(&f.outside), vec!["secret"]);
}

#[tokio::test]
async fn two_projects_cannot_reach_each_other() {
    let f = Fixture::new();
    let b = ProjectFiles::open(&f.other).unwrap();
    // Project B's own file is readable by B.
    assert_eq!(b.read("secret", 100).await.unwrap(), OTHER_SECRET);

    // Project A tries every trick on B's home.
    let abs = f.other.join("secret");
    symlink(&abs, f.home.join("b-abs")).unwrap();
    symlink("../other/secret", f.home.join("b-rel")).unwrap();
    symlink(&f.other, f.home.join("b-dir")).unwrap();
    symlink("../other", f.home.join("b-dir-rel")).unwrap();
    for p in [
        "../other/secret",
        abs.to_str().unwrap(),
        "b-abs",
        "b-rel",
        "b-dir/secret",
        "b-dir-rel/secret",
    ] {
        assert_escape(f.files.read(p, 1 << 20).await);
    }
    assert_escape(f.files.list("b-dir").await);
    assert_escape(f.files.list("b-dir-rel").await);
    assert_escape(f.files.write("b-dir/secret", b"x".to_vec()).await);
    assert_escape(f.files.remove("b-dir/secret").await);
    assert_escape(f.files.rename("b-dir/secret", "got-it").await);

    // And B on A's.
    f.files.write("a-secret", b"a".to_vec()).await.unwrap();
    symlink("../home/a-secret", f.other.join("a-rel")).unwrap();
    symlink(&f.home, f.other.join("a-dir")).unwrap();
    assert_escape(b.read("../home/a-secret", 100).await);
    assert_escape(b.read("a-rel", 100).await);
    assert_escape(b.read("a-dir/a-secret", 100).await);
    assert_escape(b.list("a-dir").await);
    assert_escape(b.remove("a-dir/a-secret").await);

    assert_eq!(fs::read(f.home.join("a-secret")).unwrap(), b"a");
    assert_eq!(fs::read(f.other.join("secret")).unwrap(), OTHER_SECRET);
    assert!(!f.home.join("got-it").exists());
}

#[tokio::test]
async fn errors_map_to_api_errors() {
    let cases = [
        (FileError::NotFound("a".into()), 404, "file_not_found"),
        (FileError::Escape("out".into()), 403, "path_escape"),
        (FileError::AlreadyExists("a".into()), 409, "already_exists"),
        (FileError::NotADirectory("a".into()), 409, "not_a_directory"),
        (FileError::IsADirectory("a".into()), 409, "is_a_directory"),
        (
            FileError::TooLarge {
                path: "a".into(),
                size: 2,
                max: 1,
            },
            413,
            "file_too_large",
        ),
        (FileError::Invalid("bad".into()), 400, "invalid_path"),
        (
            FileError::PermissionDenied("a".into()),
            403,
            "permission_denied",
        ),
        (FileError::Io("disk".into()), 500, "file_io"),
    ];
    for (e, status, code) in cases {
        assert_eq!((e.http_status(), e.code()), (status, code));
        let api = cocalc_core::ApiError::from(&e);
        assert_eq!((api.status, api.code.as_str()), (status, code));
        assert_eq!(api.message, e.to_string());
    }

    // Messages name the caller's path, never the host path of the home.
    let f = Fixture::new();
    let host = f.home.to_str().unwrap().to_owned();
    symlink("/etc/passwd", f.home.join("p")).unwrap();
    for e in [
        f.files.read("p", 10).await.unwrap_err(),
        f.files.read("missing", 10).await.unwrap_err(),
        f.files.list("p").await.unwrap_err(),
    ] {
        assert!(!e.to_string().contains(&host), "{e}");
    }
}

#[tokio::test]
async fn open_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        ProjectFiles::open(&dir.path().join("missing")),
        Err(FileError::NotFound(_))
    ));
    fs::write(dir.path().join("file"), b"x").unwrap();
    assert!(matches!(
        ProjectFiles::open(&dir.path().join("file")),
        Err(FileError::NotADirectory(_))
    ));
}
