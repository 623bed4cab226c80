//! The allocation state on the node's persistent disk: read, changed and written back
//! under an exclusive lock, so concurrent plugin calls (a runtime starts many pods at
//! once) never hand out one address twice, and a crash at any instant (kill -9 included)
//! leaves either the old state or the new one, never a half-written file.
//!
//! - The lock is `flock` on `FILE.lock`, taken with a deadline: a call that cannot get it
//!   in time answers "try again later" (CNI code 11) rather than hanging the runtime.
//!   The kernel releases a dead process's lock by itself.
//! - The new state goes to a temporary file in the same directory, is synced, and renamed
//!   over the old one (atomic on one filesystem), then the directory is synced.
//! - A missing file is an empty state (a fresh node); an unreadable one is refused with
//!   its path named, and the caller decides (DEL still succeeds).

use crate::ipam::Allocations;
use crate::spec::{CniError, code};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Reads the state at `path` under its lock, lets `change` modify it, and writes it back
/// if `change` succeeded and changed it. The lock is held throughout and released when
/// this returns (or the process dies).
pub fn with_state<T>(
    path: &Path,
    timeout: Duration,
    change: impl FnOnce(&mut Allocations) -> Result<T, CniError>,
) -> Result<T, CniError> {
    let _lock = lock(path, timeout)?;
    let before = read(path)?;
    let mut state = before.clone();
    let out = change(&mut state)?;
    if state != before {
        write(path, &state)?;
    }
    Ok(out)
}

/// The state at `path` as it is (no lock: for reports and tests).
pub fn read(path: &Path) -> Result<Allocations, CniError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("the IPAM state {} cannot be read", path.display()),
                e.to_string(),
            )
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Allocations::new()),
        Err(e) => Err(io(path, "reading", e)),
    }
}

fn write(path: &Path, state: &Allocations) -> Result<(), CniError> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| CniError::new(code::IO_FAILURE, "encoding the IPAM state", e.to_string()))?;
    write_atomically(path, &bytes, 0o644).map_err(|e| io(path, "writing", e))
}

/// Replaces `path` with `content`, whatever instant the process dies or the node loses
/// power: a temporary file in the same directory (created if missing), synced, renamed
/// over `path`, the directory synced. A reader sees the old content or the new one, and
/// a running binary replaced this way keeps its old inode. The agent's CNI files and
/// `trellis cni install` write through here too.
pub fn write_atomically(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = temporary(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

fn io(path: &Path, doing: &str, e: std::io::Error) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        format!("{doing} the IPAM state {}", path.display()),
        e.to_string(),
    )
}

/// An exclusive `flock`, released when dropped (the file is closed).
struct Lock(#[allow(dead_code)] File);

fn lock(path: &Path, timeout: Duration) -> Result<Lock, CniError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(path, "creating the directory of", e))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| io(path, "opening the lock of", e))?;
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(1);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Lock(file));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::WouldBlock && e.raw_os_error() != Some(libc::EINTR) {
            return Err(io(path, "locking", e));
        }
        if Instant::now() >= deadline {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the IPAM state {} is locked by another call for more than {timeout:?}",
                    path.display()
                ),
                "",
            ));
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Attachment;
    use ipnet::IpNet;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    /// A directory of its own, removed when dropped (a failing test included).
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn dir() -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "trellis-cni-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn pod(i: usize) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn concurrent_calls_never_hand_out_one_address_twice() {
        let d = dir();
        let path = Arc::new(d.join("ipam.json"));
        let pools: Arc<[IpNet]> = Arc::from(vec!["10.244.3.0/24".parse::<IpNet>().unwrap()]);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (path, pools) = (path.clone(), pools.clone());
                std::thread::spawn(move || {
                    for i in 0..20 {
                        with_state(&path, Duration::from_secs(10), |s| {
                            s.allocate(&pod(t * 100 + i), &pools)
                                .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let state = read(&path).unwrap();
        assert_eq!(state.len(), 160);
        let addrs: BTreeSet<_> = state.iter().flat_map(|(_, a)| a.iter().copied()).collect();
        assert_eq!(addrs.len(), 160, "every attachment has its own address");
    }

    #[test]
    fn a_held_lock_is_try_again_later_and_a_crash_before_the_rename_changes_nothing() {
        let d = dir();
        let path = d.join("ipam.json");
        let pools: [IpNet; 1] = ["10.244.4.0/24".parse().unwrap()];
        with_state(&path, Duration::from_secs(1), |s| {
            s.allocate(&pod(1), &pools)
                .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))
        })
        .unwrap();
        let before = std::fs::read(&path).unwrap();

        let held = lock(&path, Duration::from_secs(1)).unwrap();
        let e = with_state(&path, Duration::from_millis(50), |_| Ok(())).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        drop(held);

        // A writer killed after writing its temporary file and before the rename.
        std::fs::write(temporary(&path), b"{half").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(read(&path).unwrap().len(), 1);

        std::fs::write(&path, b"{half").unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        assert!(e.msg.contains("ipam.json"), "{}", e.msg);
    }
}
