use crate::InvalidField;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A WireGuard public key: 32 bytes, written in standard base64 as `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(field: &str, text: &str) -> Result<Self, InvalidField> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| InvalidField::new(field, text, "is not base64"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|v: Vec<u8>| {
            InvalidField::new(
                field,
                text,
                format!("decodes to {} bytes, a WireGuard key has 32", v.len()),
            )
        })?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("public key", s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse("public_key", &text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_input() {
        let key = PublicKey([7; 32]);
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        let short = PublicKey::parse("public_key", "AAAA").unwrap_err();
        assert!(short.reason.contains("3 bytes"), "{short}");
        assert!(PublicKey::parse("public_key", "not base64!").is_err());
    }
}
