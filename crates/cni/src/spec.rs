//! What the CNI specification (1.1.0) says a plugin reads and writes, as values: the
//! invocation from the environment, the network configuration from stdin, the result and
//! the error on stdout, and version negotiation down to 0.3.0. Pure: the binary hands
//! these the environment and stdin it got and prints what they give back.
//!
//! Every refusal names the variable or field and the value, with the specification's
//! error code, and no input makes them panic (property-tested).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The version this plugin speaks natively.
pub const CNI_VERSION: &str = "1.1.0";
/// Every version it answers in, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Where the agent writes the node-local file: persistent, so it is there after a reboot
/// before any agent runs.
pub const DEFAULT_NODE_FILE: &str = "/var/lib/trellis/cni/node.json";
/// Where the plugin keeps its allocations: on tmpfs, so a reboot (which ends every
/// container) also ends their allocations; kill -9 safety comes from the atomic write.
pub const DEFAULT_IPAM_FILE: &str = "/run/trellis/cni/ipam.json";
/// What the agent refreshes while the node's data plane is programmed.
pub const DEFAULT_READY_FILE: &str = "/run/trellis/cni/ready";
/// Where the agent lists the attachments whose network policy is in place.
pub const DEFAULT_POLICY_FILE: &str = "/run/trellis/cni/policy.json";
/// How long ADD waits for the agent to put a new pod's network policy in place.
pub const DEFAULT_POLICY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The operations (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Verb {
    fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "GC" => Verb::Gc,
            "STATUS" => Verb::Status,
            "VERSION" => Verb::Version,
            _ => return None,
        })
    }
}

/// The specification's error codes (section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
}

/// An error as the plugin prints it (and exits non-zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            cni_version: CNI_VERSION.into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn env(var: &str, value: Option<&str>, why: &str) -> CniError {
        let value = match value {
            Some(v) => format!("{v:?}"),
            None => "unset".into(),
        };
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("{var}={value}: {why}"),
            "",
        )
    }

    fn config(field: &str, value: &str, why: &str) -> CniError {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!("network configuration field {field:?} = {value}: {why}"),
            "",
        )
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// What the runtime asked, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub verb: Verb,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`: `KEY=VALUE;...`.
    pub args: Vec<(String, String)>,
    pub path: Vec<String>,
}

impl Invocation {
    /// The pod this call is for, when the runtime named it in `CNI_ARGS` (a kubelet's
    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME`), with `labels`.
    pub fn pod(
        &self,
        labels: &BTreeMap<String, String>,
        ports: &[crate::ipam::PodPort],
    ) -> Option<crate::ipam::PodIdentity> {
        let arg = |key: &str| {
            (self.args.iter())
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Some(crate::ipam::PodIdentity {
            namespace: arg("K8S_POD_NAMESPACE")?,
            name: arg("K8S_POD_NAME")?,
            labels: labels.clone(),
            ports: ports.to_vec(),
        })
    }

    /// Reads the `CNI_*` variables through `var`, checking what the verb needs.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let command = var("CNI_COMMAND");
        let verb = command.as_deref().and_then(Verb::parse).ok_or_else(|| {
            CniError::env(
                "CNI_COMMAND",
                command.as_deref(),
                "one of ADD, DEL, CHECK, GC, STATUS, VERSION",
            )
        })?;
        let needs = |name: &str| -> Result<Option<String>, CniError> {
            match var(name) {
                Some(v) if !v.is_empty() => Ok(Some(v)),
                other => Err(CniError::env(
                    name,
                    other.as_deref(),
                    &format!("required for {}", command.as_deref().unwrap_or_default()),
                )),
            }
        };
        let optional = |name: &str| var(name).filter(|v| !v.is_empty());
        let (container_id, netns, ifname) = match verb {
            Verb::Add | Verb::Check => (
                needs("CNI_CONTAINERID")?,
                needs("CNI_NETNS")?,
                needs("CNI_IFNAME")?,
            ),
            // DEL must work when the namespace is already gone.
            Verb::Del => (
                needs("CNI_CONTAINERID")?,
                optional("CNI_NETNS"),
                needs("CNI_IFNAME")?,
            ),
            Verb::Gc | Verb::Status | Verb::Version => (None, None, None),
        };
        if let Some(id) = &container_id {
            check_container_id(id)?;
        }
        if let Some(name) = &ifname {
            check_ifname(name)?;
        }
        let raw_args = optional("CNI_ARGS");
        let args = match &raw_args {
            None => Vec::new(),
            Some(raw) => parse_args(raw)?,
        };
        let path = optional("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Invocation {
            verb,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// The specification: at least one character, alphanumerics, `_`, `.` and `-`.
fn check_container_id(id: &str) -> Result<(), CniError> {
    let ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if id.is_empty() || !ok {
        return Err(CniError::env(
            "CNI_CONTAINERID",
            Some(id),
            "letters, digits, '_', '.' and '-' only",
        ));
    }
    Ok(())
}

/// An interface name the kernel accepts: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
fn check_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(CniError::env(
            "CNI_IFNAME",
            Some(name),
            "1 to 15 bytes, not '.' or '..', without '/', ':' or spaces",
        ));
    }
    Ok(())
}

fn parse_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    raw.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::env(
                "CNI_ARGS",
                Some(raw),
                &format!("{pair:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// One attachment the runtime still considers valid (`cni.dev/valid-attachments`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin: the fields every plugin reads and Trellis's own.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The interface MTU; without it, the overlay's (from the node-local file).
    pub mtu: Option<u32>,
    /// The node-local file the agent keeps on persistent disk (pod CIDRs, MTU).
    pub node_file: String,
    /// Where the plugin keeps its allocations.
    pub ipam_file: String,
    /// Present and fresh while the node's data plane is programmed (STATUS).
    pub ready_file: String,
    /// Where the agent lists the attachments whose network policy is in place: ADD waits
    /// (at most `policy_wait`) for its own while the agent is ready.
    pub policy_file: String,
    pub policy_wait: std::time::Duration,
    /// The result of the plugins before this one in a chain.
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Value>,
    /// GC only: the attachments to keep.
    pub valid_attachments: Option<BTreeSet<ValidAttachment>>,
    /// The pod's labels, from `args.cni.labels` (the CNI conventions' "args in network
    /// config": `[{"key": K, "value": V}, ...]`).
    pub labels: BTreeMap<String, String>,
    /// The pod's named ports, from `args.trellis.ports` (`[{"name", "protocol", "port"}]`).
    pub ports: Vec<crate::ipam::PodPort>,
}

impl NetConf {
    /// Parses stdin. Unknown fields are allowed (a conflist passes its own to every plugin).
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration on stdin is not JSON",
                e.to_string(),
            )
        })?;
        let obj = value.as_object().ok_or_else(|| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration on stdin is not a JSON object",
                truncate(&value.to_string()),
            )
        })?;
        let string = |field: &str, required: bool| -> Result<Option<String>, CniError> {
            match obj.get(field) {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(CniError::config(field, "missing", "required")),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(other) => Err(CniError::config(
                    field,
                    &truncate(&other.to_string()),
                    "a non-empty string",
                )),
            }
        };
        let cni_version = string("cniVersion", true)?.unwrap_or_default();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "network configuration field \"cniVersion\" = {cni_version:?}: this plugin speaks {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
                "",
            ));
        }
        let name = string("name", true)?.unwrap_or_default();
        let plugin_type = string("type", true)?.unwrap_or_default();
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(m) if (576..=65535).contains(&m) => Some(m as u32),
                _ => {
                    return Err(CniError::config(
                        "mtu",
                        &truncate(&v.to_string()),
                        "an integer from 576 to 65535",
                    ));
                }
            },
        };
        let path = |field: &str, default: &str| -> Result<String, CniError> {
            let p = string(field, false)?.unwrap_or_else(|| default.to_string());
            if p.starts_with('/') && !p.contains('\0') {
                Ok(p)
            } else {
                Err(CniError::config(field, &truncate(&p), "an absolute path"))
            }
        };
        let node_file = path("nodeFile", DEFAULT_NODE_FILE)?;
        let ipam_file = path("ipamFile", DEFAULT_IPAM_FILE)?;
        let ready_file = path("readyFile", DEFAULT_READY_FILE)?;
        let policy_file = path("policyFile", DEFAULT_POLICY_FILE)?;
        let policy_wait = match obj.get("policyWaitMs") {
            None | Some(Value::Null) => DEFAULT_POLICY_WAIT,
            Some(v) => match v.as_u64() {
                Some(ms) if ms <= 60_000 => std::time::Duration::from_millis(ms),
                _ => {
                    return Err(CniError::config(
                        "policyWaitMs",
                        &truncate(&v.to_string()),
                        "milliseconds from 0 to 60000",
                    ));
                }
            },
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<BTreeSet<ValidAttachment>>(v.clone()).map_err(|e| {
                    CniError::config(
                        "cni.dev/valid-attachments",
                        &truncate(&v.to_string()),
                        &format!("a list of {{\"containerID\", \"ifname\"}} ({e})"),
                    )
                })?,
            ),
        };
        let object = |field: &str| -> Result<Option<Value>, CniError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
                Some(v) => Err(CniError::config(
                    field,
                    &truncate(&v.to_string()),
                    "a JSON object",
                )),
            }
        };
        let labels = match obj
            .get("args")
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("labels"))
        {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(v) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Label {
                    key: String,
                    value: String,
                }
                let list: Vec<Label> = serde_json::from_value(v.clone()).map_err(|e| {
                    CniError::config(
                        "args.cni.labels",
                        &truncate(&v.to_string()),
                        &format!("a list of {{\"key\", \"value\"}} ({e})"),
                    )
                })?;
                list.into_iter().map(|l| (l.key, l.value)).collect()
            }
        };
        let ports = match obj
            .get("args")
            .and_then(|a| a.get("trellis"))
            .and_then(|t| t.get("ports"))
        {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => {
                let ports: Vec<crate::ipam::PodPort> =
                    serde_json::from_value(v.clone()).map_err(|e| {
                        CniError::config(
                            "args.trellis.ports",
                            &truncate(&v.to_string()),
                            &format!("a list of {{\"name\", \"protocol\", \"port\"}} ({e})"),
                        )
                    })?;
                if let Some(bad) = ports.iter().find(|p| {
                    !["TCP", "UDP", "SCTP"].contains(&p.protocol.as_str())
                        || p.port == 0
                        || p.name.is_empty()
                }) {
                    return Err(CniError::config(
                        "args.trellis.ports",
                        &truncate(&serde_json::to_string(bad).unwrap_or_default()),
                        "a name, a protocol of TCP, UDP or SCTP and a port from 1 to 65535",
                    ));
                }
                ports
            }
        };
        Ok(NetConf {
            labels,
            ports,
            cni_version,
            name,
            plugin_type,
            mtu,
            node_file,
            ipam_file,
            ready_file,
            policy_file,
            policy_wait,
            prev_result: object("prevResult")?,
            runtime_config: object("runtimeConfig")?,
            valid_attachments,
        })
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// VERSION's answer.
pub fn version_answer() -> Value {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// An interface of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultInterface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The namespace path, for interfaces inside the container.
    pub sandbox: Option<String>,
}

/// An address of a result, with the index of its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultIp {
    pub address: ipnet::IpNet,
    pub gateway: Option<std::net::IpAddr>,
    pub interface: Option<usize>,
}

/// A route of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultRoute {
    pub dst: ipnet::IpNet,
    pub gw: Option<std::net::IpAddr>,
    pub mtu: Option<u32>,
}

/// What ADD prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<ResultIp>,
    pub routes: Vec<ResultRoute>,
}

impl AddResult {
    /// The result in the version the configuration asked for: 1.1.0 as it is; 1.0.0
    /// without the interface and route MTUs (1.1.0 fields); 0.3.x and 0.4.0 also with each
    /// address's `version`.
    pub fn encode(&self, version: &str) -> Value {
        let old = version.starts_with("0.");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = serde_json::json!({"name": i.name, "mac": i.mac});
                // A 1.1.0 field.
                if let Some(mtu) = i.mtu
                    && version == "1.1.0"
                {
                    v["mtu"] = mtu.into();
                }
                if let Some(sandbox) = &i.sandbox {
                    v["sandbox"] = sandbox.clone().into();
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = serde_json::json!({"address": ip.address.to_string()});
                if old {
                    v["version"] = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    }
                    .into();
                }
                if let Some(gw) = ip.gateway {
                    v["gateway"] = gw.to_string().into();
                }
                if let Some(i) = ip.interface {
                    v["interface"] = i.into();
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({"dst": r.dst.to_string()});
                if let Some(gw) = r.gw {
                    v["gw"] = gw.to_string().into();
                }
                if let Some(mtu) = r.mtu
                    && version == "1.1.0"
                {
                    v["mtu"] = mtu.into();
                }
                v
            })
            .collect();
        serde_json::json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }
}

/// This plugin's result after the ones before it in a chain: their interfaces, addresses,
/// routes and DNS first, then this plugin's, its addresses' interface indices moved past
/// theirs. Without a `prevResult`, `ours` as it is.
pub fn chained(prev: Option<&Value>, mut ours: Value) -> Value {
    let Some(prev) = prev else {
        return ours;
    };
    let list = |v: &Value, key: &str| -> Vec<Value> {
        v.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut interfaces = list(prev, "interfaces");
    let offset = interfaces.len() as u64;
    interfaces.extend(list(&ours, "interfaces"));
    let mut ips = list(prev, "ips");
    ips.extend(list(&ours, "ips").into_iter().map(|mut ip| {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = (i + offset).into();
        }
        ip
    }));
    let mut routes = list(prev, "routes");
    routes.extend(list(&ours, "routes"));
    ours["interfaces"] = interfaces.into();
    ours["ips"] = ips.into();
    ours["routes"] = routes.into();
    if let Some(dns) = prev
        .get("dns")
        .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()))
    {
        ours["dns"] = dns.clone();
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1.2_x"),
        ("CNI_NETNS", "/var/run/netns/p"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("CNI_ARGS", "K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop"),
    ];

    #[test]
    fn an_add_reads_every_variable_and_a_del_needs_no_namespace() {
        let inv = Invocation::from_env(env(ADD)).unwrap();
        assert_eq!(inv.verb, Verb::Add);
        assert_eq!(inv.path, ["/opt/cni/bin", "/usr/lib/cni"]);
        assert_eq!(inv.args[1], ("K8S_POD_NAMESPACE".into(), "shop".into()));
        let del = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(del.netns, None);
    }

    #[test]
    fn the_pod_is_named_by_the_kubelets_args_and_labelled_by_the_configurations() {
        let inv = Invocation::from_env(env(ADD)).unwrap();
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t",
                 "args":{"cni":{"labels":[{"key":"app","value":"web"}]}}}"#,
        )
        .unwrap();
        let pod = inv.pod(&conf.labels, &conf.ports).unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("shop", "web"));
        assert_eq!(pod.labels["app"], "web");
        let unnamed = Invocation::from_env(env(&ADD[..5])).unwrap();
        assert_eq!(unnamed.pod(&conf.labels, &[]), None);
        let named = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t",
                 "args":{"trellis":{"ports":[{"name":"http","port":8080}]}}}"#,
        )
        .unwrap();
        assert_eq!(named.ports[0].protocol, "TCP");
        let bad = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t",
                 "args":{"trellis":{"ports":[{"name":"dns","protocol":"ICMP","port":53}]}}}"#,
        )
        .unwrap_err();
        assert!(
            bad.msg.contains("args.trellis.ports") && bad.msg.contains("ICMP"),
            "{bad:?}"
        );
        let bad = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","args":{"cni":{"labels":{"app":"web"}}}}"#,
        )
        .unwrap_err();
        assert!(bad.msg.contains("args.cni.labels"), "{bad:?}");
    }

    #[test]
    fn bad_variables_are_named_with_their_value_and_code_4() {
        for (var, value, expect) in [
            ("CNI_COMMAND", "JUMP", "CNI_COMMAND=\"JUMP\""),
            ("CNI_CONTAINERID", "a b", "CNI_CONTAINERID=\"a b\""),
            (
                "CNI_IFNAME",
                "a-very-long-ifname",
                "CNI_IFNAME=\"a-very-long-ifname\"",
            ),
            ("CNI_IFNAME", "eth/0", "CNI_IFNAME=\"eth/0\""),
            ("CNI_ARGS", "K8S_POD_NAME", "CNI_ARGS=\"K8S_POD_NAME\""),
            ("CNI_NETNS", "", "CNI_NETNS=\"\": required for ADD"),
        ] {
            let mut pairs: Vec<(&str, &str)> =
                ADD.iter().filter(|(k, _)| *k != var).copied().collect();
            pairs.push((var, value));
            let e = Invocation::from_env(env(&pairs)).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENVIRONMENT);
            assert!(e.msg.starts_with(expect), "{}", e.msg);
        }
    }

    #[test]
    fn the_configuration_names_a_bad_field_and_versions_are_negotiated() {
        let ok = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"trellis","type":"trellis-cni","mtu":1420,
                 "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],"other":1}"#,
        )
        .unwrap();
        assert_eq!(ok.mtu, Some(1420));
        assert_eq!(ok.valid_attachments.unwrap().len(), 1);
        let e = NetConf::parse(br#"{"cniVersion":"2.0.0","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"t","mtu":70000}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        assert!(e.msg.contains("\"mtu\" = 70000"), "{}", e.msg);
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","type":"t"}"#).unwrap_err();
        assert!(e.msg.contains("\"name\" = missing"), "{}", e.msg);
        let e = NetConf::parse(b"not json").unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        assert_eq!(
            version_answer()["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn results_are_written_in_the_version_asked_for() {
        let r = AddResult {
            interfaces: vec![ResultInterface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1420),
                sandbox: Some("/var/run/netns/p".into()),
            }],
            ips: vec![ResultIp {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![ResultRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                mtu: Some(1420),
            }],
        };
        let new = r.encode("1.1.0");
        assert_eq!(
            new["ips"][0],
            serde_json::json!({"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 0})
        );
        assert_eq!(new["routes"][0]["mtu"], 1420);
        let old = r.encode("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["routes"][0].get("mtu").is_none());
        assert_eq!(old["cniVersion"], "0.3.1");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn no_input_makes_the_parsers_panic(
            stdin in proptest::collection::vec(any::<u8>(), 0..200),
            json_ish in "[{}\\[\\]\":,a-zA-Z0-9 .\\-/]{0,120}",
            vars in proptest::collection::vec(("[A-Z_]{3,16}", "\\PC{0,20}"), 0..8),
        ) {
            let _ = NetConf::parse(&stdin);
            let _ = NetConf::parse(json_ish.as_bytes());
            let map: BTreeMap<String, String> = vars.into_iter().collect();
            let _ = Invocation::from_env(|k| map.get(k).cloned());
            let mut with_command = map.clone();
            with_command.insert("CNI_COMMAND".into(), "ADD".into());
            let _ = Invocation::from_env(|k| with_command.get(k).cloned());
        }
    }

    #[test]
    fn a_chained_result_keeps_what_came_before_and_renumbers_its_interfaces() {
        let prev = serde_json::json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "br0"}],
            "ips": [{"address": "192.0.2.5/24", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]},
        });
        let ours = serde_json::json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth1"}],
            "ips": [{"address": "10.244.1.2/32", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        });
        let out = chained(Some(&prev), ours.clone());
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 2);
        assert_eq!(out["ips"][1]["interface"], 1);
        assert_eq!(out["ips"][0]["address"], "192.0.2.5/24");
        assert_eq!(out["dns"]["nameservers"][0], "192.0.2.53");
        assert_eq!(chained(None, ours.clone()), ours);
    }
}
