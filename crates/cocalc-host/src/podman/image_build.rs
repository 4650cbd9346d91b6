//! Building the small busybox test image locally (no registry is reachable).

use std::path::Path;

use super::service::PodmanEnv;
use super::PodmanError;

/// The uid and gid of the unprivileged `user` the test image defines.
pub const TEST_IMAGE_UID: u32 = 2001;

/// Builds a rootfs from a static busybox (`/bin/busybox` plus one link per
/// applet, `/etc/passwd` with `root` and `user` (uid 2001), `/home/user`,
/// `/tmp`) in `work_dir`, tars it and imports it as `name` with
/// `CMD ["/bin/sh"]`.
///
/// Uses the podman **CLI** (`podman import`): importing through the API
/// ignores the tag. `busybox` is looked up at `/bin/busybox` and
/// `/usr/bin/busybox`; it must be statically linked (Debian's
/// `busybox-static`).
pub async fn import_busybox_image(
    env: &PodmanEnv,
    work_dir: &Path,
    name: &str,
) -> Result<(), PodmanError> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| {
            PodmanError::Setup("busybox not found (install Debian's busybox-static)".into())
        })?;
    let io = |what: &str, e: std::io::Error| PodmanError::Setup(format!("{what}: {e}"));
    let root = work_dir.join("busybox-rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin",
        "etc",
        "home/user",
        "tmp",
        "proc",
        "sys",
        "dev",
        "root",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| io("creating rootfs", e))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| io("chmod /tmp", e))?;
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| io("copying busybox", e))?;
    let list = tokio::process::Command::new(busybox)
        .arg("--list")
        .output()
        .await
        .map_err(|e| io("busybox --list", e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .map_err(|e| io("linking applets", e))?;
    }
    let uid = TEST_IMAGE_UID;
    std::fs::write(
        root.join("etc/passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\nuser:x:{uid}:{uid}:user:/home/user:/bin/sh\n"),
    )
    .map_err(|e| io("writing /etc/passwd", e))?;
    std::fs::write(
        root.join("etc/group"),
        format!("root:x:0:\nuser:x:{uid}:\n"),
    )
    .map_err(|e| io("writing /etc/group", e))?;
    let tar = work_dir.join("busybox-rootfs.tar");
    run(
        tokio::process::Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        "tar",
    )
    .await?;
    let mut import = tokio::process::Command::new("podman");
    import
        .args(["import", "--quiet", "--change", r#"CMD ["/bin/sh"]"#])
        .arg(&tar)
        .arg(name);
    env.apply_tokio(&mut import);
    run(&mut import, "podman import").await?;
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
    Ok(())
}

async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<(), PodmanError> {
    let out = cmd
        .output()
        .await
        .map_err(|e| PodmanError::Setup(format!("running {what}: {e}")))?;
    if !out.status.success() {
        return Err(PodmanError::Setup(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
