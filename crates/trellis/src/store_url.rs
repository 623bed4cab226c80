//! Which store a command talks to: `--store URL`, `--lab NAME`, or the only running lab.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use trellis_store::Store;
use trellis_store::etcd::{Credentials, EtcdConfig, EtcdStore, TlsFiles};
use trellis_store::remote::RemoteStore;

/// How to reach an etcd cluster: everything but the member list, which the URL holds.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// Key prefix in etcd; keeps Trellis's keys apart from other users of the cluster.
    #[arg(long, global = true, default_value = "/trellis/")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed the members' certificates; turns TLS on.
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), for members started with --client-cert-auth.
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, for clusters with authentication enabled.
    #[arg(long, global = true)]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (kept out of the process list).
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    fn config(&self, members: &[String]) -> anyhow::Result<EtcdConfig> {
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            bail!(
                "invalid --etcd-prefix {:?}: must start and end with '/'",
                self.etcd_prefix
            );
        }
        let tls = self.etcd_ca.clone().map(|ca| TlsFiles {
            ca,
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        });
        if tls.is_none() && (self.etcd_cert.is_some() || self.etcd_key.is_some()) {
            bail!("invalid --etcd-cert/--etcd-key: they need --etcd-ca (TLS) too");
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let credentials = match (&self.etcd_user, &self.etcd_password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file).with_context(|| {
                    format!("invalid --etcd-password-file {:?}", file.display())
                })?;
                Some(Credentials {
                    user: user.clone(),
                    password: password.trim_end_matches(['\n', '\r']).to_string(),
                })
            }
            (Some(user), None) => bail!("invalid --etcd-user {user:?}: needs --etcd-password-file"),
            (None, Some(file)) => bail!(
                "invalid --etcd-password-file {:?}: needs --etcd-user",
                file.display()
            ),
        };
        Ok(EtcdConfig {
            endpoints: members.iter().map(|m| format!("{scheme}://{m}")).collect(),
            prefix: self.etcd_prefix.clone(),
            tls,
            credentials,
            call_timeout: CALL_TIMEOUT,
            dialer: None,
        })
    }
}

/// How long one store call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// An embedded store served on a Unix socket (a lab's store).
    Unix(PathBuf),
    /// An etcd cluster: its members as HOST:PORT.
    Etcd(Vec<String>),
    /// A lab's store, whichever kind it runs (reached from inside the lab's namespaces).
    Lab(String),
}

impl StoreUrl {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if let Some(path) = text
            .strip_prefix("unix://")
            .or_else(|| text.strip_prefix("unix:"))
        {
            if path.is_empty() {
                bail!("invalid --store {text:?}: the unix: form needs a socket path");
            }
            return Ok(StoreUrl::Unix(PathBuf::from(path)));
        }
        if let Some(name) = text.strip_prefix("lab:") {
            return Ok(StoreUrl::Lab(name.to_string()));
        }
        if let Some(members) = text.strip_prefix("etcd://") {
            let members: Vec<String> = members.split(',').map(str::to_string).collect();
            for m in &members {
                let valid = m
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !valid {
                    bail!("invalid --store {text:?}: member {m:?} is not HOST:PORT");
                }
            }
            return Ok(StoreUrl::Etcd(members));
        }
        bail!(
            "invalid --store {text:?}: expected etcd://HOST:PORT[,HOST:PORT...], unix:/path/to/store.sock or lab:NAME"
        )
    }

    pub fn open(&self, etcd: &EtcdArgs) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            StoreUrl::Unix(path) => Arc::new(RemoteStore::connect(path.clone(), CALL_TIMEOUT)),
            StoreUrl::Etcd(members) => EtcdStore::new(etcd.config(members)?)?,
            StoreUrl::Lab(name) => crate::lab::open_store(name)?,
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            StoreUrl::Etcd(members) => write!(f, "etcd://{}", members.join(",")),
            StoreUrl::Lab(name) => write!(f, "lab:{name}"),
        }
    }
}

/// Resolve `--store` / `--lab` for a command; with neither, the only running lab.
pub fn resolve(store: Option<&str>, lab: Option<&str>) -> anyhow::Result<StoreUrl> {
    match (store, lab) {
        (Some(_), Some(_)) => bail!("give either --store or --lab, not both"),
        (Some(url), None) => StoreUrl::parse(url),
        (None, Some(name)) => Ok(StoreUrl::Lab(name.to_string())),
        (None, None) => {
            let labs = crate::lab::state::running_labs().context("looking for running labs")?;
            match labs.as_slice() {
                [only] => Ok(StoreUrl::Lab(only.clone())),
                [] => bail!(
                    "no --store given and no lab is running: start one with `trellis lab up` or pass --store"
                ),
                many => bail!(
                    "no --store given and {} labs are running ({}): pass --lab NAME",
                    many.len(),
                    many.join(", ")
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_lab_forms_and_names_bad_values() {
        assert_eq!(
            StoreUrl::parse("unix:/a/b.sock").unwrap(),
            StoreUrl::Unix("/a/b.sock".into())
        );
        assert_eq!(
            StoreUrl::parse("unix:///a/b.sock").unwrap(),
            StoreUrl::Unix("/a/b.sock".into())
        );
        assert_eq!(StoreUrl::parse("lab:x").unwrap(), StoreUrl::Lab("x".into()));
        assert_eq!(
            StoreUrl::parse("etcd://10.0.0.1:2379,etcd-b:2379").unwrap(),
            StoreUrl::Etcd(vec!["10.0.0.1:2379".into(), "etcd-b:2379".into()])
        );
        let err = StoreUrl::parse("etcd://10.0.0.1").unwrap_err().to_string();
        assert!(err.contains("\"10.0.0.1\" is not HOST:PORT"), "{err}");
        let err = StoreUrl::parse("tcp://x").unwrap_err().to_string();
        assert!(err.contains("--store") && err.contains("tcp://x"), "{err}");
        assert!(StoreUrl::parse("unix:").is_err());
    }
}
