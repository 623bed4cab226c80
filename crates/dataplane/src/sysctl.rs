//! Kernel parameters under `/proc/sys`.
//!
//! The `net.*` entries belong to the network namespace of the *calling
//! thread* at the time the file is opened; to change another namespace's,
//! call these inside [`crate::netns::run_in`].

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, Result};

const PROC_SYS: &str = "/proc/sys";

/// Sets a parameter, named like `sysctl` does (`net.ipv4.ip_forward`) or
/// as a path (`net/ipv4/conf/eth0.100/forwarding`; needed when a component
/// itself contains dots, such as a VLAN interface name).
pub fn set(path: &str, value: &str) -> Result<()> {
    let file = proc_path(path)?;
    let mut handle = fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .map_err(|e| Error::io(format!("opening sysctl {path} ({})", file.display()), e))?;
    // One write call: procfs parses each write separately.
    handle
        .write_all(value.as_bytes())
        .map_err(|e| Error::io(format!("setting sysctl {path} = {value:?}"), e))
}

/// Reads a parameter (same naming as [`set`]), without the trailing newline.
pub fn get(path: &str) -> Result<String> {
    let file = proc_path(path)?;
    let text = fs::read_to_string(&file)
        .map_err(|e| Error::io(format!("reading sysctl {path} ({})", file.display()), e))?;
    Ok(text.trim_end_matches('\n').to_owned())
}

fn proc_path(path: &str) -> Result<PathBuf> {
    let relative = path
        .strip_prefix(PROC_SYS)
        .unwrap_or(path)
        .trim_start_matches('/');
    let relative = if relative.contains('/') {
        relative.to_owned()
    } else {
        relative.replace('.', "/")
    };
    let escapes = relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..");
    if escapes {
        return Err(Error::invalid(
            "sysctl name",
            path,
            format!("must name a file under {PROC_SYS}"),
        ));
    }
    Ok(PathBuf::from(PROC_SYS).join(relative))
}

#[cfg(test)]
mod tests {
    use super::proc_path;

    #[test]
    fn dotted_and_slashed_names_map_to_proc_sys() {
        let expected = "/proc/sys/net/ipv4/ip_forward";
        assert_eq!(
            proc_path("net.ipv4.ip_forward").unwrap().to_str(),
            Some(expected)
        );
        assert_eq!(
            proc_path("net/ipv4/ip_forward").unwrap().to_str(),
            Some(expected)
        );
        assert_eq!(
            proc_path("/proc/sys/net/ipv4/ip_forward").unwrap().to_str(),
            Some(expected)
        );
    }

    #[test]
    fn slashed_names_keep_dots_inside_components() {
        let path = proc_path("net/ipv4/conf/eth0.100/forwarding").unwrap();
        assert_eq!(
            path.to_str(),
            Some("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
    }

    #[test]
    fn names_leaving_proc_sys_are_refused() {
        assert!(proc_path("net/../../etc/passwd").is_err());
        assert!(proc_path("").is_err());
        assert!(proc_path("net..ipv4").is_err());
    }
}
