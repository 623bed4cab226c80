use crate::node::overlaps;
use crate::{Endpoint, InvalidField, PublicKey, Validate, validate_name};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A WireGuard peer outside the cluster (a laptop, a VM) that reaches the mesh through the
/// nodes other locations can reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalPeer {
    pub name: String,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

impl Validate for ExternalPeer {
    fn validate(&self) -> Result<(), InvalidField> {
        validate_name("name", &self.name)?;
        if self.allowed_ips.is_empty() {
            return Err(InvalidField::new(
                "allowed_ips",
                "",
                "must list at least one CIDR",
            ));
        }
        for (i, a) in self.allowed_ips.iter().enumerate() {
            if a.trunc() != *a {
                return Err(InvalidField::new(
                    "allowed_ips",
                    a,
                    format!("has host bits set; did you mean {}?", a.trunc()),
                ));
            }
            if let Some(b) = self.allowed_ips[i + 1..].iter().find(|b| overlaps(a, b)) {
                return Err(InvalidField::new("allowed_ips", a, format!("overlaps {b}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_overlapping_allowed_ips() {
        let mut p = ExternalPeer {
            name: "laptop".into(),
            public_key: PublicKey([2; 32]),
            allowed_ips: vec![],
            endpoint: None,
            persistent_keepalive: None,
        };
        assert_eq!(p.validate().unwrap_err().field, "allowed_ips");
        p.allowed_ips = vec![
            "10.5.0.0/24".parse().unwrap(),
            "10.5.0.1/32".parse().unwrap(),
        ];
        assert!(p.validate().unwrap_err().reason.contains("overlaps"));
        p.allowed_ips.pop();
        assert!(p.validate().is_ok());
    }
}
