//! Where Services get their addresses and node ports: the cluster's service CIDRs (one per
//! family, the first the primary) and node port range, as kube-apiserver's
//! `--service-cluster-ip-range` and `--service-node-port-range`.

use crate::service::IpFamily;
use crate::{InvalidField, Validate};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// kubeadm's defaults, and an IPv6 range of the same size.
pub const DEFAULT_SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/12", "fd00:10:96::/108"];
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    first: 30000,
    last: 32767,
};

/// `services` in the cluster settings; every field may be left out for its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// One per family, the primary first. Empty: both defaults, IPv4 first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port_range: Option<PortRange>,
}

impl ServiceSettings {
    /// The service CIDRs in force, the primary first.
    pub fn cidrs(&self) -> Vec<IpNet> {
        if self.cidrs.is_empty() {
            DEFAULT_SERVICE_CIDRS
                .iter()
                .map(|c| c.parse().expect("default CIDRs parse"))
                .collect()
        } else {
            self.cidrs.clone()
        }
    }

    pub fn cidr_for(&self, family: IpFamily) -> Option<IpNet> {
        self.cidrs()
            .into_iter()
            .find(|c| IpFamily::of_net(c) == family)
    }

    pub fn node_port_range(&self) -> PortRange {
        self.node_port_range.unwrap_or(DEFAULT_NODE_PORT_RANGE)
    }
}

impl Validate for ServiceSettings {
    fn validate(&self) -> Result<(), InvalidField> {
        if self.cidrs.len() > 2 {
            return Err(InvalidField::new(
                "services.cidrs",
                self.cidrs.len(),
                "at most two: one IPv4 and one IPv6",
            ));
        }
        for (i, cidr) in self.cidrs.iter().enumerate() {
            let field = format!("services.cidrs[{i}]");
            if cidr.trunc() != *cidr {
                return Err(InvalidField::new(
                    field,
                    cidr,
                    format!("has host bits set; did you mean {}?", cidr.trunc()),
                ));
            }
            if cidr.max_prefix_len() - cidr.prefix_len() < 2 {
                return Err(InvalidField::new(
                    field,
                    cidr,
                    "too small: the first and last addresses are never handed out",
                ));
            }
            if self.cidrs[..i]
                .iter()
                .any(|c| IpFamily::of_net(c) == IpFamily::of_net(cidr))
            {
                return Err(InvalidField::new(
                    field,
                    cidr,
                    "one CIDR per IP family: this family already has one",
                ));
            }
        }
        Ok(())
    }
}

/// An inclusive range of ports, written `first-last` as kube-apiserver's flag takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = InvalidField;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| InvalidField::new("services.node_port_range", text, reason);
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| invalid("expected FIRST-LAST, e.g. 30000-32767"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("ports are 1-65535"))
        };
        let range = PortRange {
            first: port(first)?,
            last: port(last)?,
        };
        if range.first > range.last {
            return Err(invalid("the first port is above the last"));
        }
        Ok(range)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_absent() {
        let s = ServiceSettings::default();
        assert_eq!(
            s.cidrs(),
            [
                "10.96.0.0/12".parse::<IpNet>().unwrap(),
                "fd00:10:96::/108".parse().unwrap()
            ]
        );
        assert_eq!(s.node_port_range().to_string(), "30000-32767");
        assert_eq!(
            s.cidr_for(IpFamily::IPv6).unwrap().to_string(),
            "fd00:10:96::/108"
        );
    }

    #[test]
    fn refuses_bad_ranges_by_name() {
        let parse = |json: &str| {
            serde_json::from_str::<ServiceSettings>(json)
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate().map_err(|e| e.to_string()))
        };
        parse(r#"{"cidrs":["10.0.0.0/16"],"node_port_range":"20000-20099"}"#).unwrap();
        for (json, says) in [
            (r#"{"cidrs":["10.0.0.1/16"]}"#, "host bits"),
            (
                r#"{"cidrs":["10.0.0.0/16","10.1.0.0/16"]}"#,
                "one CIDR per IP family",
            ),
            (r#"{"cidrs":["10.0.0.0/31"]}"#, "too small"),
            (r#"{"node_port_range":"32767-30000"}"#, "above the last"),
            (r#"{"node_port_range":"0-100"}"#, "1-65535"),
            (r#"{"node_port_range":"30000"}"#, "FIRST-LAST"),
            (r#"{"cidr":["10.0.0.0/16"]}"#, "unknown field"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
