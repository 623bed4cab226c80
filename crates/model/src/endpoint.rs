use crate::InvalidField;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Where a WireGuard peer can be reached: `host:port`, `[v6]:port` or `dns.name:port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    Ip(IpAddr),
    Dns(String),
}

impl Endpoint {
    pub fn from_socket(addr: SocketAddr) -> Self {
        Self {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        }
    }

    /// The socket address when the host is an IP address; DNS names are resolved by the
    /// edge that applies the plan, never by the pure planner.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Dns(_) => None,
        }
    }

    pub fn parse(field: &str, text: &str) -> Result<Self, InvalidField> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(InvalidField::new(field, text, "port must not be 0"));
            }
            return Ok(Self::from_socket(addr));
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(InvalidField::new(field, text, "expected host:port"));
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| InvalidField::new(field, text, "port must be 1-65535"))?;
        let valid_dns = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_dns || host.contains(':') {
            return Err(InvalidField::new(
                field,
                text,
                "host must be an IP address or a DNS name (IPv6 in brackets)",
            ));
        }
        Ok(Self {
            host: Host::Dns(host.to_ascii_lowercase()),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Dns(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl FromStr for Endpoint {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("endpoint", s)
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse("endpoint", &text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_v6_and_dns_forms() {
        for (text, shown) in [
            ("198.18.0.1:51820", "198.18.0.1:51820"),
            ("[2001:db8::1]:51820", "[2001:db8::1]:51820"),
            ("GW.example.org:443", "gw.example.org:443"),
        ] {
            assert_eq!(
                Endpoint::parse("endpoint", text).unwrap().to_string(),
                shown
            );
        }
    }

    #[test]
    fn rejects_missing_or_bad_ports_and_hosts() {
        for bad in [
            "198.18.0.1",
            "198.18.0.1:0",
            "host:99999",
            ":80",
            "a b:80",
            "2001:db8::1:80x",
        ] {
            let err = Endpoint::parse("endpoint", bad).unwrap_err();
            assert_eq!(err.value, bad);
        }
    }
}
