//! What `trellis cni install` writes into a runtime's configuration directory (what a
//! DaemonSet's init container runs): the network's configuration list, with Trellis's
//! plugin first and, if asked, Debian's/upstream reference `portmap` and `bandwidth`
//! after it, as a runtime chains them.

use crate::spec::{CNI_VERSION, DEFAULT_IPAM_FILE, DEFAULT_NODE_FILE, DEFAULT_READY_FILE};
use serde_json::{Value, json};

/// The configuration list's file name: first in lexical order among the usual ones, so a
/// runtime that takes the first file in the directory takes this network.
pub const CONFLIST_NAME: &str = "10-trellis.conflist";

/// A plugin to chain after Trellis's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chained {
    /// Host ports (`hostPort`), from the runtime's `portMappings` capability.
    Portmap,
    /// Traffic shaping, from the runtime's `bandwidth` capability.
    Bandwidth,
}

impl Chained {
    pub fn parse(name: &str) -> Result<Chained, String> {
        match name {
            "portmap" => Ok(Chained::Portmap),
            "bandwidth" => Ok(Chained::Bandwidth),
            other => Err(format!(
                "--chain {other:?}: only portmap and bandwidth can be chained"
            )),
        }
    }
}

/// Where the plugin's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files {
    pub node_file: String,
    pub ipam_file: String,
    pub ready_file: String,
}

impl Default for Files {
    fn default() -> Files {
        Files {
            node_file: DEFAULT_NODE_FILE.into(),
            ipam_file: DEFAULT_IPAM_FILE.into(),
            ready_file: DEFAULT_READY_FILE.into(),
        }
    }
}

/// The network's configuration list.
pub fn conflist(name: &str, files: &Files, chain: &[Chained]) -> Value {
    let mut plugins = vec![json!({
        "type": "trellis-cni",
        "nodeFile": files.node_file,
        "ipamFile": files.ipam_file,
        "readyFile": files.ready_file,
    })];
    for chained in chain {
        plugins.push(match chained {
            Chained::Portmap => json!({
                "type": "portmap",
                "capabilities": {"portMappings": true},
                "snat": true,
            }),
            Chained::Bandwidth => json!({
                "type": "bandwidth",
                "capabilities": {"bandwidth": true},
            }),
        });
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": plugins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::NetConf;

    #[test]
    fn each_plugin_of_the_list_parses_as_the_runtime_would_hand_it_over() {
        let list = conflist(
            "trellis",
            &Files::default(),
            &[Chained::Portmap, Chained::Bandwidth],
        );
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[1]["type"], "portmap");
        // A runtime adds the list's name and version to each plugin's configuration.
        let mut first = plugins[0].clone();
        first["name"] = list["name"].clone();
        first["cniVersion"] = list["cniVersion"].clone();
        let conf = NetConf::parse(first.to_string().as_bytes()).unwrap();
        assert_eq!(conf.node_file, DEFAULT_NODE_FILE);
        assert_eq!(conf.plugin_type, "trellis-cni");
        assert!(Chained::parse("firewall").unwrap_err().contains("firewall"));
    }
}
