//! Where the agent reaches the API server — never through a service address if anything
//! else is known (seed 003: a CNI chain reached the API through its ClusterIP before any
//! proxy was up, and the whole cluster stayed down).
//!
//! In order: the `--kube-api` flag; the server of the kubelet's kubeconfig (the kubelet
//! itself must reach the API without the cluster's network, so its address is a real
//! one); the in-cluster environment (`KUBERNETES_SERVICE_HOST`, which is the `kubernetes`
//! Service's ClusterIP: the last resort, and said so).

use serde_json::Value;
use trellis_model::InvalidField;

/// Where the address came from, for the log line that says which was used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    /// The kubelet's kubeconfig at this path.
    KubeletKubeconfig(String),
    /// `KUBERNETES_SERVICE_HOST` and `_PORT`: a service address.
    InCluster,
}

/// The API server's address and how it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiAddress {
    /// `https://host:port` (or `http://` for a test double).
    pub url: String,
    pub source: Source,
}

impl ApiAddress {
    /// Whether the agent's path to the API depends on a service proxy being up.
    pub fn through_a_service(&self) -> bool {
        self.source == Source::InCluster
    }
}

/// Picks the API server's address. `kubelet_kubeconfig` is the path and content of the
/// kubelet's kubeconfig if one was found; `env` reads the environment.
pub fn choose(
    flag: Option<&str>,
    kubelet_kubeconfig: Option<(&str, &str)>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ApiAddress, InvalidField> {
    if let Some(url) = flag {
        return Ok(ApiAddress {
            url: checked_url("--kube-api", url)?,
            source: Source::Flag,
        });
    }
    if let Some((path, text)) = kubelet_kubeconfig {
        let server = kubeconfig_server(text)
            .map_err(|why| InvalidField::new(format!("kubeconfig {path}"), "", why))?;
        return Ok(ApiAddress {
            url: checked_url(&format!("kubeconfig {path}: server"), &server)?,
            source: Source::KubeletKubeconfig(path.to_string()),
        });
    }
    match (
        env("KUBERNETES_SERVICE_HOST"),
        env("KUBERNETES_SERVICE_PORT"),
    ) {
        (Some(host), Some(port)) => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            Ok(ApiAddress {
                url: checked_url("KUBERNETES_SERVICE_HOST", &format!("https://{host}:{port}"))?,
                source: Source::InCluster,
            })
        }
        _ => Err(InvalidField::new(
            "--kube-api",
            "",
            "no API server address: give --kube-api, or the kubelet's kubeconfig, or run in a pod",
        )),
    }
}

/// The `server` of a kubeconfig's current context's cluster (or of its only cluster).
pub fn kubeconfig_server(text: &str) -> Result<String, String> {
    let config: Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("not a kubeconfig: {e}"))?;
    let clusters = config["clusters"].as_array().cloned().unwrap_or_default();
    let wanted = config["current-context"].as_str().and_then(|current| {
        config["contexts"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == current)?["context"]["cluster"]
            .as_str()
            .map(str::to_string)
    });
    let cluster = match wanted {
        Some(name) => clusters
            .iter()
            .find(|c| c["name"] == name.as_str())
            .ok_or_else(|| format!("the current context's cluster {name:?} is not listed"))?,
        None if clusters.len() == 1 => &clusters[0],
        None => return Err("no current context, and not exactly one cluster".into()),
    };
    cluster["cluster"]["server"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "its cluster has no server".into())
}

fn checked_url(field: &str, url: &str) -> Result<String, InvalidField> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| InvalidField::new(field, url, "expected https://HOST[:PORT]"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(InvalidField::new(
            field,
            url,
            "expected https://HOST[:PORT]",
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: default-cluster
  cluster:
    certificate-authority: /etc/kubernetes/pki/ca.crt
    server: https://10.0.0.10:6443
- name: other
  cluster:
    server: https://other:6443
contexts:
- name: default-context
  context:
    cluster: default-cluster
    user: default-auth
current-context: default-context
users:
- name: default-auth
  user:
    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem
"#;

    fn in_cluster(name: &str) -> Option<String> {
        match name {
            "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".into()),
            "KUBERNETES_SERVICE_PORT" => Some("443".into()),
            _ => None,
        }
    }

    #[test]
    fn the_real_address_wins_over_the_service_address() {
        let flag = choose(
            Some("https://api.example.org:6443/"),
            Some(("k", KUBELET)),
            in_cluster,
        )
        .unwrap();
        assert_eq!(flag.url, "https://api.example.org:6443");
        assert_eq!(flag.source, Source::Flag);
        let kubelet = choose(
            None,
            Some(("/etc/kubernetes/kubelet.conf", KUBELET)),
            in_cluster,
        )
        .unwrap();
        assert_eq!(kubelet.url, "https://10.0.0.10:6443");
        assert!(!kubelet.through_a_service());
        let last = choose(None, None, in_cluster).unwrap();
        assert_eq!(last.url, "https://10.96.0.1:443");
        assert!(last.through_a_service(), "said so");
        assert!(choose(None, None, |_| None).is_err());
    }

    #[test]
    fn bad_input_is_named() {
        let e = choose(Some("10.0.0.10:6443"), None, |_| None).unwrap_err();
        assert_eq!(e.field, "--kube-api");
        let e = choose(None, Some(("/k.conf", "clusters: []")), |_| None).unwrap_err();
        assert_eq!(e.field, "kubeconfig /k.conf");
        let lost = KUBELET.replace("cluster: default-cluster", "cluster: missing");
        let e = choose(None, Some(("/k.conf", &lost)), |_| None).unwrap_err();
        assert!(e.reason.contains("\"missing\""), "{e:?}");
        let v6 = choose(None, None, |n| match n {
            "KUBERNETES_SERVICE_HOST" => Some("fd00:10:96::1".into()),
            "KUBERNETES_SERVICE_PORT" => Some("443".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(v6.url, "https://[fd00:10:96::1]:443");
    }
}
