//! Agent → node disk: what the CNI plugin (`trellis-cni`) reads instead of asking anyone
//! (seed 003: nothing off the node on the pod path).
//!
//! - The node file (`--cni-node-file`, on persistent disk): this node's pod CIDRs and the
//!   overlay's MTU, in the shape `trellis_cni::node::NodeNetwork` parses. Written when
//!   they change, atomically, so after a reboot it is there before any agent runs and a
//!   reader never sees half of it.
//! - The ready file (`--cni-ready-file`, on tmpfs): touched every few seconds while the
//!   data plane is programmed (`/readyz`), removed when it is not. The plugin's STATUS
//!   reads its age, so an agent that died or hangs stops vouching within seconds.

use ipnet::IpNet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the ready file is refreshed; the plugin takes it as stale after 5 s, so an
/// agent killed outright (which takes the userspace data plane with it) stops vouching
/// for the node within seconds.
pub const READY_REFRESH: Duration = Duration::from_secs(1);

/// The node file's content: the plugin's own type, so the two cannot drift apart.
pub fn node_file_content(pod_cidrs: &[IpNet], mtu: u32) -> Vec<u8> {
    let body = trellis_cni::node::NodeNetwork {
        pod_cidrs: pod_cidrs.to_vec(),
        mtu,
    };
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Keeps the node file equal to what it was last given, writing only on change.
pub struct NodeFile {
    path: PathBuf,
    written: Option<Vec<u8>>,
}

impl NodeFile {
    pub fn new(path: PathBuf) -> NodeFile {
        // What is on disk already counts as written: an agent restart rewrites nothing.
        let written = std::fs::read(&path).ok();
        NodeFile { path, written }
    }

    /// Writes the node's network if it differs from the file's; a node with no pod CIDR
    /// yet (the leader has not allocated one) leaves the file as it is.
    pub fn keep(&mut self, pod_cidrs: &[IpNet], mtu: u32) {
        if pod_cidrs.is_empty() {
            return;
        }
        let content = node_file_content(pod_cidrs, mtu);
        if self.written.as_ref() == Some(&content) {
            return;
        }
        match write_atomically(&self.path, &content) {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), ?pod_cidrs, mtu, "CNI node file written");
                self.written = Some(content);
            }
            // Retried on the next pass; pods keep the file's previous content meanwhile.
            Err(e) => tracing::warn!(path = %self.path.display(), "writing the CNI node file: {e}"),
        }
    }
}

/// Touches `path` every [`READY_REFRESH`] while `ready(now)` says so, removes it when
/// not, until the task is dropped.
pub async fn keep_ready_file(path: PathBuf, ready: impl Fn(Instant) -> bool) {
    let mut ticker = tokio::time::interval(READY_REFRESH);
    let mut was: Option<bool> = None;
    loop {
        ticker.tick().await;
        let now = ready(Instant::now());
        let result = if now {
            touch(&path)
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        };
        match result {
            Err(e) => tracing::warn!(path = %path.display(), "keeping the CNI ready file: {e}"),
            Ok(()) if was != Some(now) => {
                tracing::info!(path = %path.display(), ready = now, "CNI ready file");
                was = Some(now);
            }
            Ok(()) => {}
        }
    }
}

/// Moves the file's modification time to now, creating it if missing: a refresh every
/// second writes no data.
fn touch(path: &Path) -> std::io::Result<()> {
    match std::fs::File::options().write(true).open(path) {
        Ok(file) => file.set_modified(std::time::SystemTime::now()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomically(path, b"ready\n"),
        Err(e) => Err(e),
    }
}

/// Old content or new, whatever instant the node loses power (the plugin's own writer).
fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    trellis_cni::state::write_atomically(path, content, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_file_is_written_on_change_only_and_never_emptied() {
        let dir = std::env::temp_dir().join(format!("trt-nodefile-{}", std::process::id()));
        let path = dir.join("cni/node.json");
        let cidrs: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        let mut file = NodeFile::new(path.clone());
        file.keep(&[], 1420);
        assert!(!path.exists(), "no pod CIDR yet: nothing written");
        file.keep(&cidrs, 1420);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"podCIDRs\"") && text.contains("10.244.1.0/24"));
        std::fs::write(&path, "tampered").unwrap();
        file.keep(&cidrs, 1420);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "tampered",
            "unchanged input: no write"
        );
        file.keep(&cidrs, 1380);
        assert!(std::fs::read_to_string(&path).unwrap().contains("1380"));
        // A restarted agent finds its file and does not rewrite it.
        let again = NodeFile::new(path.clone());
        assert_eq!(
            again.written.as_deref(),
            Some(node_file_content(&cidrs, 1380).as_slice())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_ready_file_follows_readiness() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = std::env::temp_dir().join(format!("trt-readyfile-{}", std::process::id()));
        let path = dir.join("ready");
        let ready = Arc::new(AtomicBool::new(true));
        let flag = ready.clone();
        let task = tokio::spawn(keep_ready_file(path.clone(), move |_| {
            flag.load(Ordering::Relaxed)
        }));
        tokio::time::sleep(READY_REFRESH / 2).await;
        assert!(path.exists(), "ready: the file is there");
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        tokio::time::sleep(READY_REFRESH).await;
        let later = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(later > first, "refreshed: {first:?} -> {later:?}");
        ready.store(false, Ordering::Relaxed);
        tokio::time::sleep(READY_REFRESH).await;
        assert!(!path.exists(), "not ready: the file is gone");
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
