//! A real etcd (Debian's 3.4) for the tests: one member on loopback, on free ports, with a
//! temporary data directory; stopped and removed when dropped, even when a test fails.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_store::Store;
use trellis_store::etcd::{EtcdConfig, EtcdStore};

pub struct Etcd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    /// Extra flags (TLS, say) the member is started with, kept for restarts.
    extra: Vec<String>,
    pub scheme: &'static str,
    name: String,
    /// `--initial-cluster`: this member alone, or every member of a cluster.
    initial_cluster: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(Vec::new(), "http")
    }

    pub fn start_with(extra: Vec<String>, scheme: &'static str) -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("trt-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("etcd test directory");
        let peer_port = free_port();
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port,
            extra,
            scheme,
            name: "t".into(),
            initial_cluster: format!("t=http://127.0.0.1:{peer_port}"),
        };
        etcd.spawn();
        etcd.wait_listening();
        etcd
    }

    /// `n` members on loopback forming one cluster; each is started, stopped and
    /// restarted on its own.
    pub fn cluster(n: usize) -> Vec<Etcd> {
        let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let initial_cluster = peer_ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("m{i}=http://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = peer_ports
            .into_iter()
            .enumerate()
            .map(|(i, peer_port)| {
                let dir = std::env::temp_dir().join(format!(
                    "trt-etcd-{}-{}",
                    std::process::id(),
                    free_port()
                ));
                std::fs::create_dir_all(&dir).expect("etcd test directory");
                Etcd {
                    child: None,
                    dir,
                    client_port: free_port(),
                    peer_port,
                    extra: Vec::new(),
                    scheme: "http",
                    name: format!("m{i}"),
                    initial_cluster: initial_cluster.clone(),
                }
            })
            .collect();
        // All first: a member serves clients only once the cluster has a quorum.
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_listening();
        }
        members
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd (apt-get install etcd-server)");
        self.child = Some(child);
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port));
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen within 20 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("etcd running").id() as i32
    }

    /// SIGSTOP: connections stay open and nothing answers.
    /// Stops etcd with SIGSTOP and returns once the kernel shows it stopped: the signal is
    /// delivered asynchronously, and on a busy machine etcd could otherwise still answer
    /// the call a test makes right after.
    pub fn freeze(&self) {
        let pid = self.pid();
        let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
        let stopped = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // The state follows the command name, which is in parentheses.
                    let after = &stat[stat.rfind(')')? + 1..];
                    after.split_whitespace().next().map(|state| state == "T")
                })
                .unwrap_or(false)
        };
        crate::wait_until(
            "etcd to stop after SIGSTOP",
            std::time::Duration::from_secs(5),
            stopped,
        );
    }

    pub fn thaw(&self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGCONT);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same data directory and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_listening();
    }

    pub fn store(&self, prefix: &str) -> Arc<EtcdStore> {
        EtcdStore::new(self.config(prefix)).expect("valid etcd config")
    }

    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.url()],
            prefix: prefix.to_string(),
            tls: None,
            credentials: None,
            call_timeout: Duration::from_secs(2),
            dialer: None,
        }
    }

    /// Runs etcdctl against this member; panics with its output when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url()))
            .args(args)
            .output()
            .expect("running etcdctl (apt-get install etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill(); // SIGKILL ends a frozen (SIGSTOPped) member too
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the store answers (after a start or a thaw).
pub async fn wait_answering(store: &dyn Store) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.get("probe").await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "store never answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("running openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "otherca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=trellis test {ca}"),
            ]);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("server.ext");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .expect("client.ext");
        for (name, ca) in [("server", "ca"), ("client", "ca"), ("stranger", "otherca")] {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ]);
            let ext = if name == "server" {
                "server.ext"
            } else {
                "client.ext"
            };
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}
