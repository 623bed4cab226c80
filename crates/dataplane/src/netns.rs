//! Named network namespaces, laid out exactly like iproute2 does it
//! (`/run/netns/NAME` bind-mounted from a namespace file), so `ip netns exec
//! NAME ...` and `ip -n NAME ...` work on everything created here.
//!
//! A network namespace belongs to a *thread*, not to a process. Everything
//! that switches namespace here therefore does it on a fresh OS thread that
//! dies afterwards, so no thread of a runtime is ever left in the wrong
//! namespace by accident. Sockets keep the namespace they were created in,
//! which is how callers get a socket "inside" a namespace (see [`run_in`]).

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use crate::error::{Error, Result};

/// Where iproute2 keeps its named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The namespace file of the calling thread (not of the process: the
/// process's main thread may well be in another namespace).
const THREAD_NETNS_PATH: &str = "/proc/thread-self/ns/net";

/// Serialises the one-time preparation of [`NETNS_RUN_DIR`] inside this
/// process: two threads racing through it would stack two bind mounts.
static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

/// Creates the named network namespace, like `ip netns add NAME`.
///
/// Fails with [`Error::AlreadyExists`] if it already exists.
pub fn create(name: &str) -> Result<()> {
    check_name(name)?;
    prepare_run_dir().map_err(|(step, error)| {
        Error::namespace(
            name,
            format!("creating network namespace {name}: preparing {NETNS_RUN_DIR}: {step}"),
            error,
        )
    })?;
    let path = path_of(name);
    claim_name(&path, name)?;
    if let Err((step, error)) = bind_fresh_netns_on(&path) {
        // Leave no half-made namespace behind: the name must be usable again.
        let _ = fs::remove_file(&path);
        return Err(Error::namespace(
            name,
            format!("creating network namespace {name}: {step}"),
            error,
        ));
    }
    Ok(())
}

/// Deletes the named network namespace, like `ip netns del NAME`.
///
/// Succeeds if it does not exist. The namespace itself lives on as long as a
/// process or socket still uses it; only the name goes away.
pub fn delete(name: &str) -> Result<()> {
    check_name(name)?;
    let path = path_of(name);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(());
    }
    detach_mount(&path).map_err(|error| {
        Error::namespace(name, format!("unmounting network namespace {name}"), error)
    })?;
    match fs::remove_file(&path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(Error::namespace(
            name,
            format!(
                "deleting network namespace {name}: removing {}",
                path.display()
            ),
            error,
        )),
        _ => Ok(()),
    }
}

/// Whether a namespace of that name exists in [`NETNS_RUN_DIR`].
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && path_of(name).exists()
}

/// The names in [`NETNS_RUN_DIR`], sorted (empty if the folder is missing).
pub fn list() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Opens the namespace file, e.g. to hand its descriptor to netlink
/// (`IFLA_NET_NS_FD`) or to [`enter_fd`]. [`Error::NotFound`] if there is no
/// namespace of that name.
pub fn open(name: &str) -> Result<File> {
    check_name(name)?;
    let path = path_of(name);
    File::open(&path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            Error::NotFound {
                action: String::new(),
                what: format!("network namespace {name}"),
                scope: NETNS_RUN_DIR.into(),
            }
        } else {
            Error::namespace(
                name,
                format!("opening network namespace {name} ({})", path.display()),
                error,
            )
        }
    })
}

/// Runs `f` on a fresh OS thread that lives inside the namespace and returns
/// its result. A panic inside `f` is passed on to the caller.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    // Opened here rather than on the thread so a bad name fails early, with
    // the caller's context.
    let namespace = open(name)?;
    let worker = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> io::Result<T> {
            enter_fd(namespace.as_raw_fd())?;
            drop(namespace);
            Ok(f())
        })
        .map_err(|error| {
            Error::namespace(
                name,
                format!("starting a thread for network namespace {name}"),
                error,
            )
        })?;
    match worker.join() {
        Ok(result) => result.map_err(|error| {
            Error::namespace(name, format!("entering network namespace {name}"), error)
        }),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread into the namespace.
///
/// Meant for the start of a process that is to live entirely inside one
/// namespace: call it on the main thread before any other thread (such as a
/// tokio runtime's) exists, since threads started later inherit it but
/// threads started earlier do not.
pub fn enter(name: &str) -> Result<()> {
    let namespace = open(name)?;
    enter_fd(namespace.as_raw_fd()).map_err(|error| {
        Error::namespace(name, format!("entering network namespace {name}"), error)
    })
}

/// Moves the calling thread into the namespace behind `fd`.
///
/// Async-signal-safe (a single `setns` call and no allocation), so it may be
/// used in `CommandExt::pre_exec` with a descriptor opened beforehand.
pub fn enter_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor number; an invalid one is
    // reported through errno.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The processes whose network namespace is this one, like `ip netns pids`.
/// Empty if the namespace does not exist.
pub fn pids_in(name: &str) -> Vec<i32> {
    let Some(wanted) = check_name(name)
        .ok()
        .and_then(|()| namespace_identity(&path_of(name)))
    else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| namespace_identity(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(wanted))
        .collect();
    pids.sort_unstable();
    pids
}

/// A named namespace that is deleted again when this value is dropped, so
/// that a failing test or an aborted start leaves nothing behind.
#[derive(Debug)]
pub struct OwnedNetns {
    name: String,
}

impl OwnedNetns {
    /// Creates the namespace (see [`create`]) and takes ownership of it.
    pub fn create(name: &str) -> Result<Self> {
        create(name)?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if let Err(err) = delete(&self.name) {
            tracing::warn!("could not delete network namespace {}: {err:#}", self.name);
        }
    }
}

fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Names become file names under [`NETNS_RUN_DIR`]: refuse anything that
/// would point elsewhere.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::invalid(
            "network namespace name",
            name,
            format!("must be a file name in {NETNS_RUN_DIR}"),
        ));
    }
    if name.len() > 255 {
        return Err(Error::invalid(
            "network namespace name",
            name,
            "longer than 255 bytes",
        ));
    }
    Ok(())
}

/// A failed step of creating a namespace, and its error.
type Step = (String, io::Error);

/// Makes sure [`NETNS_RUN_DIR`] exists and is a shared mount point, as
/// iproute2 does, so that namespace mounts made here propagate to mount
/// namespaces created later (e.g. by `ip netns exec`) and vice versa.
fn prepare_run_dir() -> std::result::Result<(), Step> {
    let _serialised = RUN_DIR_SETUP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_RUN_DIR)
        .map_err(|e| (format!("creating {NETNS_RUN_DIR}"), e))?;
    let mut made_mount_point = false;
    loop {
        match mount(None, NETNS_RUN_DIR, libc::MS_SHARED | libc::MS_REC) {
            Ok(()) => return Ok(()),
            // EINVAL: not a mount point yet; turn it into one (once) and retry.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && !made_mount_point => {
                mount(
                    Some(NETNS_RUN_DIR),
                    NETNS_RUN_DIR,
                    libc::MS_BIND | libc::MS_REC,
                )
                .map_err(|e| (format!("bind-mounting {NETNS_RUN_DIR} onto itself"), e))?;
                made_mount_point = true;
            }
            Err(err) => {
                return Err((format!("making {NETNS_RUN_DIR} a shared mount"), err));
            }
        }
    }
}

/// Creates the empty file that will carry the namespace; `create_new` makes
/// two concurrent creators of the same name see each other.
fn claim_name(path: &Path, name: &str) -> Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Err(Error::AlreadyExists {
            action: format!("creating network namespace {name}"),
            scope: String::new(),
            what: format!("network namespace {name}"),
        }),
        Err(err) => Err(Error::namespace(
            name,
            format!(
                "creating network namespace {name}: creating {}",
                path.display()
            ),
            err,
        )),
    }
}

/// Unshares a new network namespace on a throw-away thread and pins it by
/// bind-mounting the thread's namespace file onto `path`.
fn bind_fresh_netns_on(path: &Path) -> std::result::Result<(), Step> {
    let target = path.to_owned();
    let worker = thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> std::result::Result<(), Step> {
            // SAFETY: plain syscall; it affects only this short-lived thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err((
                    "unshare(CLONE_NEWNET)".to_owned(),
                    io::Error::last_os_error(),
                ));
            }
            mount(Some(THREAD_NETNS_PATH), &target, libc::MS_BIND).map_err(|e| {
                let step = format!(
                    "bind-mounting {THREAD_NETNS_PATH} onto {}",
                    target.display()
                );
                (step, e)
            })
        })
        .map_err(|e| ("starting a thread to create the namespace".to_owned(), e))?;
    match worker.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn detach_mount(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: `target` is a valid NUL-terminated string for the call's duration.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // EINVAL: the file is not a mount point (a half-made namespace); the
    // unlink that follows is all that is left to do.
    if err.raw_os_error() == Some(libc::EINVAL) {
        return Ok(());
    }
    Err(err)
}

fn mount(source: Option<&str>, target: impl AsRef<Path>, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map(|s| c_path(Path::new(s))).transpose()?;
    let target = c_path(target.as_ref())?;
    let fstype = c"none";
    // SAFETY: every pointer is a valid NUL-terminated string (or null for
    // the optional source/data) that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(c"".as_ptr(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Namespaces are identified by the (device, inode) of their nsfs file,
/// which is the same whether reached via /proc or via a bind mount.
fn namespace_identity(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|meta| (meta.dev(), meta.ino()))
}
