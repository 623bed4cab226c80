//! Where the store is: an address (`etcd://…`, `unix:…` or `kubernetes`) and, for etcd,
//! how to authenticate; for Kubernetes, where the API server is (never a service address if
//! anything else is known: seed 003). Parsed and checked before anything starts; every problem names the flag
//! and the value. The lab resolves its own names to one of these: nothing here knows labs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use trellis_model::InvalidField;
use trellis_store::Store;
use trellis_store::etcd::{ConfigError, Credentials, EtcdConfig, EtcdStore, TlsFiles};

/// Why a store client could not be made: always bad input, named.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error(transparent)]
    Etcd(#[from] ConfigError),
    #[error(transparent)]
    Kube(#[from] trellis_kube::client::KubeError),
}

/// How long one store call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAddress {
    /// The etcd v3 API on a Unix socket: a lab's embedded store (or an etcd listening on
    /// one). Same client, same protocol as a networked etcd.
    Unix(PathBuf),
    /// An etcd cluster: its members as HOST:PORT.
    Etcd(Vec<String>),
    /// The cluster's Kubernetes API (`trellis_kube::store`).
    Kubernetes(KubeOptions),
}

/// How to reach the Kubernetes API and where Trellis keeps its own objects there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOptions {
    /// `--kube-api`: the API server's real address.
    pub api: Option<String>,
    /// The kubelet's kubeconfig, whose server address comes next if present.
    pub kubeconfig: PathBuf,
    /// Where the Leases and the settings ConfigMap live.
    pub namespace: String,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            api: None,
            kubeconfig: "/etc/kubernetes/kubelet.conf".into(),
            namespace: "trellis-system".into(),
        }
    }
}

impl KubeOptions {
    /// The API server's address: the flag, the kubelet's kubeconfig, the in-cluster
    /// environment, in that order (`trellis_kube::api_address`).
    pub fn address(&self) -> Result<trellis_kube::api_address::ApiAddress, InvalidField> {
        let path = self.kubeconfig.display().to_string();
        let text = match std::fs::read_to_string(&self.kubeconfig) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(InvalidField::new("--kubeconfig", &path, e.to_string())),
        };
        trellis_kube::api_address::choose(
            self.api.as_deref(),
            text.as_deref().map(|t| (path.as_str(), t)),
            |name| std::env::var(name).ok(),
        )
    }

    /// A client of the API, said where it was found.
    pub async fn client(&self) -> Result<trellis_kube::client::Kube, OpenError> {
        let address = self.address()?;
        if address.through_a_service() {
            tracing::warn!(
                api = %address.url,
                "reaching the Kubernetes API through its service address (KUBERNETES_SERVICE_HOST): \
                 it needs a service proxy to be up; give --kube-api or the kubelet's kubeconfig"
            );
        } else {
            tracing::info!(api = %address.url, source = ?address.source, "Kubernetes API");
        }
        Ok(trellis_kube::client::Kube::connect(&address, CALL_TIMEOUT).await?)
    }

    /// The store on the API: a mirror that starts listing at once.
    pub async fn open(&self) -> Result<Arc<trellis_kube::store::KubeStore>, OpenError> {
        Ok(Arc::new(trellis_kube::store::KubeStore::start(
            self.client().await?,
            &self.namespace,
        )))
    }
}

/// How to talk to an etcd cluster, beyond its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Key prefix; keeps Trellis's keys apart from other users of the cluster.
    pub prefix: String,
    /// CA certificate (PEM) that signed the members' certificates; turns TLS on.
    pub ca: Option<PathBuf>,
    /// Client certificate and its key (PEM), for members with --client-cert-auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// User and the file holding the password, for clusters with authentication.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            prefix: "/trellis/".into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        }
    }
}

impl EtcdOptions {
    fn config(&self, members: &[String]) -> Result<EtcdConfig, InvalidField> {
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(InvalidField::new(
                "--etcd-prefix",
                &self.prefix,
                "must start and end with '/'",
            ));
        }
        let tls = self.ca.clone().map(|ca| TlsFiles {
            ca,
            cert: self.cert.clone(),
            key: self.key.clone(),
        });
        if tls.is_none() && (self.cert.is_some() || self.key.is_some()) {
            let (flag, file) = match (&self.cert, &self.key) {
                (Some(cert), _) => ("--etcd-cert", cert),
                (None, Some(key)) => ("--etcd-key", key),
                (None, None) => unreachable!("checked above"),
            };
            return Err(InvalidField::new(
                flag,
                file.display(),
                "needs --etcd-ca (TLS) too",
            ));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let credentials = match (&self.user, &self.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file).map_err(|e| {
                    InvalidField::new("--etcd-password-file", file.display(), e.to_string())
                })?;
                Some(Credentials {
                    user: user.clone(),
                    password: password.trim_end_matches(['\n', '\r']).to_string(),
                })
            }
            (Some(user), None) => {
                return Err(InvalidField::new(
                    "--etcd-user",
                    user,
                    "needs --etcd-password-file",
                ));
            }
            (None, Some(file)) => {
                return Err(InvalidField::new(
                    "--etcd-password-file",
                    file.display(),
                    "needs --etcd-user",
                ));
            }
        };
        Ok(EtcdConfig {
            endpoints: members.iter().map(|m| format!("{scheme}://{m}")).collect(),
            prefix: self.prefix.clone(),
            tls,
            credentials,
            call_timeout: CALL_TIMEOUT,
            dialer: None,
        })
    }
}

impl StoreAddress {
    pub fn parse(text: &str) -> Result<Self, InvalidField> {
        let invalid = |reason: &str| InvalidField::new("--store", text, reason);
        if let Some(path) = text
            .strip_prefix("unix://")
            .or_else(|| text.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(invalid("the unix: form needs a socket path"));
            }
            return Ok(StoreAddress::Unix(PathBuf::from(path)));
        }
        if text == "kubernetes" {
            return Ok(StoreAddress::Kubernetes(KubeOptions::default()));
        }
        if let Some(members) = text.strip_prefix("etcd://") {
            let members: Vec<String> = members.split(',').map(str::to_string).collect();
            for m in &members {
                let valid = m
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !valid {
                    return Err(invalid(&format!("member {m:?} is not HOST:PORT")));
                }
            }
            return Ok(StoreAddress::Etcd(members));
        }
        Err(invalid(
            "expected etcd://HOST:PORT[,HOST:PORT...], unix:/path/to/store.sock or kubernetes",
        ))
    }

    /// A client of the store. Must run inside a tokio runtime: clients spawn their
    /// connection tasks on it.
    /// The Kubernetes API is opened with [`KubeOptions::open`] (its credentials are read
    /// asynchronously).
    pub fn open(&self, etcd: &EtcdOptions) -> Result<Arc<dyn Store>, OpenError> {
        Ok(match self {
            StoreAddress::Kubernetes(_) => {
                return Err(OpenError::Invalid(InvalidField::new(
                    "--store",
                    "kubernetes",
                    "only the agent keeps a Kubernetes mirror; read the cluster with kubectl \
                 (kubectl get nodes,locations; kubectl -n trellis-system get leases)",
                )));
            }
            StoreAddress::Unix(path) => EtcdStore::new(EtcdConfig {
                endpoints: vec![format!("unix://{}", path.display())],
                tls: None,
                credentials: None,
                ..etcd.config(&[])?
            })?,
            StoreAddress::Etcd(members) => EtcdStore::new(etcd.config(members)?)?,
        })
    }
}

impl std::fmt::Display for StoreAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            StoreAddress::Etcd(members) => write!(f, "etcd://{}", members.join(",")),
            StoreAddress::Kubernetes(kube) => match &kube.api {
                Some(api) => write!(f, "kubernetes ({api})"),
                None => write!(f, "kubernetes"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_names_bad_values() {
        assert_eq!(
            StoreAddress::parse("unix:/a/b.sock").unwrap(),
            StoreAddress::Unix("/a/b.sock".into())
        );
        assert_eq!(
            StoreAddress::parse("unix:///a/b.sock").unwrap(),
            StoreAddress::Unix("/a/b.sock".into())
        );
        assert_eq!(
            StoreAddress::parse("etcd://10.0.0.1:2379,etcd-b:2379").unwrap(),
            StoreAddress::Etcd(vec!["10.0.0.1:2379".into(), "etcd-b:2379".into()])
        );
        let err = StoreAddress::parse("etcd://10.0.0.1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"10.0.0.1\" is not HOST:PORT"), "{err}");
        let err = StoreAddress::parse("tcp://x").unwrap_err().to_string();
        assert!(err.contains("--store") && err.contains("tcp://x"), "{err}");
        assert!(StoreAddress::parse("unix:").is_err());
        assert!(
            StoreAddress::parse("lab:x").is_err(),
            "labs resolve their own names"
        );
    }

    #[test]
    fn etcd_options_name_the_flag_at_fault() {
        let bad_prefix = EtcdOptions {
            prefix: "trellis".into(),
            ..Default::default()
        };
        let err = bad_prefix.config(&["h:1".into()]).unwrap_err().to_string();
        assert!(
            err.contains("--etcd-prefix") && err.contains("trellis"),
            "{err}"
        );
        let cert_without_ca = EtcdOptions {
            cert: Some("/c.pem".into()),
            ..Default::default()
        };
        let err = cert_without_ca
            .config(&["h:1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--etcd-cert") && err.contains("--etcd-ca"),
            "{err}"
        );
        let user_without_password = EtcdOptions {
            user: Some("root".into()),
            ..Default::default()
        };
        let err = user_without_password
            .config(&["h:1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--etcd-user") && err.contains("--etcd-password-file"),
            "{err}"
        );
    }
}
