//! A client of the WireGuard cross-platform control protocol (`get=1`), as served on
//! `/var/run/wireguard/NAME.sock` by userspace implementations (gotatun, wireguard-go).
//! Lets `trellis lab status` and the tests read any device, ours or a reference one.

use super::PeerStatus;
use anyhow::{Context, bail};
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

pub async fn get(socket: &Path, timeout: Duration) -> anyhow::Result<DeviceInfo> {
    tokio::time::timeout(timeout, get_inner(socket))
        .await
        .with_context(|| format!("{} did not answer within {timeout:?}", socket.display()))?
}

async fn get_inner(socket: &Path) -> anyhow::Result<DeviceInfo> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.write_all(b"get=1\n\n").await?;
    let mut lines = BufReader::new(stream).lines();
    let mut body = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
        body.push(line);
    }
    parse_get(&body, SystemTime::now())
}

fn hex_key(value: &str) -> anyhow::Result<PublicKey> {
    if value.len() != 64 {
        bail!("key {value:?} is not 64 hex digits");
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16)
            .with_context(|| format!("key {value:?} is not hex"))?;
    }
    Ok(PublicKey(out))
}

/// Parse the key=value lines of a `get=1` answer. `now` turns absolute handshake times
/// into ages.
pub fn parse_get(lines: &[String], now: SystemTime) -> anyhow::Result<DeviceInfo> {
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
            bail!("malformed line {line:?}");
        };
        match key {
            "errno" if value != "0" => bail!("device answered errno={value}"),
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
                            .with_context(|| format!("allowed_ip {value:?}"))?;
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
        assert!(parse_get(&["errno=2".into()], SystemTime::now()).is_err());
    }
}
