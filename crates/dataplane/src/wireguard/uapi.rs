//! A client of the WireGuard cross-platform control protocol (`get=1`), as served on
//! `/var/run/wireguard/NAME.sock` by userspace implementations (gotatun, wireguard-go).
//! Lets `trellis lab status` and the tests read any device, ours or a reference one.

use super::PeerStatus;
use crate::error::{Error, Result};
use ipnet::IpNet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use trellis_model::PublicKey;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub public_key: Option<PublicKey>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerStatus>,
}

/// What [`get`] and [`parse_get`] say they were doing.
const ACTION: &str = "reading the device state (get=1)";

/// The device state, asked over the control socket at `socket`.
pub async fn get(socket: &Path, timeout: Duration) -> Result<DeviceInfo> {
    let scope = format!("control socket {}", socket.display());
    match tokio::time::timeout(timeout, get_inner(socket, &scope)).await {
        Ok(Err(Error::Protocol { action, what, .. })) => Err(Error::Protocol {
            action,
            scope,
            what,
        }),
        Ok(Err(Error::Kernel {
            action,
            errno,
            message,
            ..
        })) => Err(Error::Kernel {
            action,
            scope,
            errno,
            message,
        }),
        Ok(result) => result,
        Err(_elapsed) => Err(Error::Timeout {
            action: ACTION.into(),
            scope,
            after: timeout,
        }),
    }
}

async fn get_inner(socket: &Path, scope: &str) -> Result<DeviceInfo> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| Error::io(format!("connecting to {scope}"), e))?;
    let exchange = |e| Error::io(format!("{ACTION} over {scope}"), e);
    stream.write_all(b"get=1\n\n").await.map_err(exchange)?;
    let mut lines = BufReader::new(stream).lines();
    let mut body = Vec::new();
    while let Some(line) = lines.next_line().await.map_err(exchange)? {
        if line.is_empty() {
            break;
        }
        body.push(line);
    }
    parse_get(&body, SystemTime::now())
}

fn malformed(what: String) -> Error {
    Error::Protocol {
        action: ACTION.into(),
        scope: String::new(),
        what,
    }
}

fn hex_key(value: &str) -> Result<PublicKey> {
    let not_hex = || malformed(format!("key {value:?} is not 64 hex digits"));
    if value.len() != 64 {
        return Err(not_hex());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let digits = value.get(2 * i..2 * i + 2).ok_or_else(not_hex)?;
        *byte = u8::from_str_radix(digits, 16).map_err(|_| not_hex())?;
    }
    Ok(PublicKey(out))
}

/// Parse the key=value lines of a `get=1` answer. `now` turns absolute handshake times
/// into ages. A malformed answer is an [`Error::Protocol`]; a device answering with an
/// errno an [`Error::Kernel`] with it.
pub fn parse_get(lines: &[String], now: SystemTime) -> Result<DeviceInfo> {
    let mut info = DeviceInfo::default();
    let mut handshake_secs: u64 = 0;
    let mut handshake_nanos: u64 = 0;
    let finish = |peer: &mut Option<PeerStatus>, secs: u64, nanos: u64, info: &mut DeviceInfo| {
        if let Some(mut p) = peer.take() {
            if secs != 0 || nanos != 0 {
                let at = UNIX_EPOCH + Duration::new(secs, nanos as u32);
                p.last_handshake = Some(now.duration_since(at).unwrap_or_default());
            }
            info.peers.push(p);
        }
    };
    let mut peer: Option<PeerStatus> = None;
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(malformed(format!("malformed line {line:?}")));
        };
        match key {
            "errno" if value != "0" => {
                return Err(match value.parse::<i32>() {
                    Ok(errno) => Error::Kernel {
                        action: ACTION.into(),
                        scope: String::new(),
                        errno: errno.abs(),
                        message: Some("the device refused".into()),
                    },
                    Err(_) => malformed(format!("errno={value}")),
                });
            }
            "private_key" => {
                let secret = hex_key(value)?;
                let secret = x25519_dalek::StaticSecret::from(secret.0);
                info.public_key =
                    Some(PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes()));
            }
            "listen_port" => info.listen_port = value.parse().ok(),
            "public_key" => {
                finish(&mut peer, handshake_secs, handshake_nanos, &mut info);
                handshake_secs = 0;
                handshake_nanos = 0;
                peer = Some(PeerStatus::new(hex_key(value)?));
            }
            _ => {
                let Some(p) = peer.as_mut() else { continue };
                match key {
                    "endpoint" => p.config.endpoint = value.parse().ok(),
                    "allowed_ip" => {
                        let net: IpNet = value
                            .parse()
                            .map_err(|e| malformed(format!("allowed_ip {value:?}: {e}")))?;
                        p.config.allowed_ips.insert(net);
                    }
                    "persistent_keepalive_interval" => {
                        p.config.persistent_keepalive = value.parse().ok().filter(|k| *k != 0)
                    }
                    "last_handshake_time_sec" => handshake_secs = value.parse().unwrap_or(0),
                    "last_handshake_time_nsec" => handshake_nanos = value.parse().unwrap_or(0),
                    "rx_bytes" => p.rx_bytes = value.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    finish(&mut peer, handshake_secs, handshake_nanos, &mut info);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_wireguard_go_answer() {
        let key = "58".repeat(32);
        let lines: Vec<String> = [
            "listen_port=51820".to_string(),
            format!("public_key={key}"),
            "endpoint=198.18.0.2:51820".into(),
            "last_handshake_time_sec=100".into(),
            "last_handshake_time_nsec=0".into(),
            "rx_bytes=42".into(),
            "tx_bytes=7".into(),
            "persistent_keepalive_interval=25".into(),
            "allowed_ip=10.244.1.0/24".into(),
            "allowed_ip=100.64.0.2/32".into(),
            "errno=0".into(),
        ]
        .into();
        let info = parse_get(&lines, UNIX_EPOCH + Duration::from_secs(130)).unwrap();
        assert_eq!(info.listen_port, Some(51820));
        let p = &info.peers[0];
        assert_eq!(p.config.public_key, PublicKey([0x58; 32]));
        assert_eq!(p.last_handshake, Some(Duration::from_secs(30)));
        assert_eq!(p.config.allowed_ips.len(), 2);
        assert_eq!(p.config.persistent_keepalive, Some(25));
        assert_eq!((p.rx_bytes, p.tx_bytes), (42, 7));
        let err = parse_get(&["errno=2".into()], SystemTime::now()).unwrap_err();
        assert!(err.has_errno(libc::ENOENT), "{err:?}");
        let err = parse_get(&["public_key=zz".into()], SystemTime::now()).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_device_is_a_timeout_and_a_missing_one_an_io_error() {
        let dir = std::env::temp_dir().join(format!("trellis-uapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("silent.sock");
        let _ = std::fs::remove_file(&path);
        // Accepts (the backlog does) but never answers.
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let err = get(&path, Duration::from_millis(20)).await.unwrap_err();
        assert!(
            matches!(&err, Error::Timeout { after, .. } if *after == Duration::from_millis(20)),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        let missing = dir.join("missing.sock");
        let err = get(&missing, Duration::from_secs(1)).await.unwrap_err();
        assert!(err.has_errno(libc::ENOENT), "{err:?}");
        assert!(err.to_string().contains("missing.sock"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
