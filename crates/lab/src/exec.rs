//! `lab exec`: run a command inside a node's, a pod's or a host's namespace.

use crate::state::LabState;
use anyhow::bail;
use trellis_dataplane::netns;

/// Replaces this process with `command` run inside the namespace. Must be called while
/// the process is single-threaded: entering a namespace applies to the calling thread.
pub fn exec(lab: &str, node: &str, pod: Option<&str>, command: &[String]) -> anyhow::Error {
    match namespace_of(lab, node, pod) {
        Ok(netns_name) => {
            use std::os::unix::process::CommandExt;
            if let Err(e) = netns::enter(&netns_name) {
                return e.into();
            }
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .exec();
            anyhow::anyhow!("running {:?} in {netns_name}: {err}", command[0])
        }
        Err(e) => e,
    }
}

fn namespace_of(lab: &str, node: &str, pod: Option<&str>) -> anyhow::Result<String> {
    let lab = LabState::load(lab)?;
    Ok(
        match (pod, lab.spec.hosts.iter().find(|h| h.name == node)) {
            (None, Some(host)) => host.netns.clone(),
            (None, None) => lab.spec.node(node)?.netns.clone(),
            (Some(pod), _) => {
                let node = lab.spec.node(node)?;
                let full = if pod.starts_with(&format!("{}-", node.name)) {
                    pod.to_string()
                } else {
                    format!("{}-{pod}", node.name)
                };
                match node.pods.iter().find(|p| p.name == full) {
                    Some(p) => p.netns.clone(),
                    None => bail!("node {} has no pod {pod:?}", node.name),
                }
            }
        },
    )
}
