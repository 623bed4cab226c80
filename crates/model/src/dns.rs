//! The API server's name rules (k8s.io/apimachinery's `validation`), each naming the
//! field and value it refuses with the API server's own explanation.

use crate::InvalidField;
use std::collections::BTreeMap;

fn alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_label(s: &str, first: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && first(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || c == b'-')
}

fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| is_label(l, alnum))
}

/// A DNS-1123 label: namespaces, port names, hostnames.
pub fn label(field: &str, value: &str) -> Result<(), InvalidField> {
    if is_label(value, alnum) {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        "a lowercase RFC 1123 label must consist of at most 63 lower case alphanumeric \
         characters or '-', and must start and end with an alphanumeric character",
    ))
}

/// A DNS-1035 label: Service names, which become DNS names that must not start with a digit.
pub fn dns1035_label(field: &str, value: &str) -> Result<(), InvalidField> {
    if is_label(value, |b| b.is_ascii_lowercase()) {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        "a DNS-1035 label must consist of at most 63 lower case alphanumeric characters or \
         '-', start with an alphabetic character, and end with an alphanumeric character",
    ))
}

/// A DNS-1123 subdomain: EndpointSlice names, node names, external names.
pub fn subdomain(field: &str, value: &str) -> Result<(), InvalidField> {
    if is_subdomain(value) {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        "a lowercase RFC 1123 subdomain must consist of at most 253 lower case alphanumeric \
         characters, '-' or '.', and must start and end with an alphanumeric character",
    ))
}

/// An IANA service name: what a `targetPort` given by name must be.
pub fn iana_service_name(field: &str, value: &str) -> Result<(), InvalidField> {
    let reason = if value.is_empty() || value.len() > 15 {
        "must be no more than 15 characters"
    } else if !value.bytes().all(|b| alnum(b) || b == b'-') {
        "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
    } else if value.contains("--") {
        "must not contain consecutive hyphens"
    } else if !value.bytes().any(|b| b.is_ascii_lowercase()) {
        "must contain at least one letter (a-z)"
    } else if value.starts_with('-') || value.ends_with('-') {
        "must not begin or end with a hyphen"
    } else {
        return Ok(());
    };
    Err(InvalidField::new(field, value, reason))
}

fn is_qualified_part(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= 63
        && edge(b[0])
        && edge(b[b.len() - 1])
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A qualified name (`prefix/name` or `name`): label and annotation keys, `appProtocol`.
pub fn qualified_name(field: &str, value: &str) -> Result<(), InvalidField> {
    let valid = match value.split_once('/') {
        Some((prefix, name)) => is_subdomain(prefix) && is_qualified_part(name),
        None => is_qualified_part(value),
    };
    if valid {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        "must be a name of at most 63 alphanumeric characters, '-', '_' or '.', starting and \
         ending with an alphanumeric character, with an optional DNS subdomain prefix and '/'",
    ))
}

/// A label value: empty, or like the name part of a qualified name.
pub fn label_value(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() || is_qualified_part(value) {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        "a valid label value must be empty or at most 63 alphanumeric characters, '-', '_' \
         or '.', starting and ending with an alphanumeric character",
    ))
}

/// A label map (labels, selectors): every key a qualified name, every value a label value.
pub fn labels(field: &str, map: &BTreeMap<String, String>) -> Result<(), InvalidField> {
    for (key, value) in map {
        qualified_name(field, key)?;
        label_value(&format!("{field}[{key}]"), value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_api_servers_rules() {
        for ok in ["web", "a", "web-1", &"x".repeat(63)] {
            dns1035_label("n", ok).unwrap();
            label("n", ok).unwrap();
        }
        for bad in ["1web", "Web", "web-", "-web", "web_1", "", &"x".repeat(64)] {
            assert!(dns1035_label("n", bad).is_err(), "{bad}");
        }
        assert!(
            label("n", "1web").is_ok(),
            "1123 labels may start with a digit"
        );
        for ok in ["web.example.com", "a-b.c", "web-abc12"] {
            subdomain("n", ok).unwrap();
        }
        for bad in ["web..com", ".web", "Web.com", "web_x"] {
            assert!(subdomain("n", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn iana_service_names() {
        for ok in ["http", "h2c", "my-port", "a1"] {
            iana_service_name("p", ok).unwrap();
        }
        for (bad, why) in [
            ("8080", "at least one letter"),
            ("Http!", "alpha-numeric"),
            ("a--b", "consecutive"),
            ("-http", "begin or end"),
            ("a-very-long-port-name", "15 characters"),
            ("", "15 characters"),
        ] {
            let e = iana_service_name("p", bad).unwrap_err();
            assert!(e.reason.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn qualified_names_and_label_values() {
        for ok in [
            "app",
            "kubernetes.io/service-name",
            "app.kubernetes.io/name",
            "A_b.c",
        ] {
            qualified_name("k", ok).unwrap();
        }
        for bad in ["", "/x", "a/", "-a", "x/y/z", "Bad.Prefix/x"] {
            assert!(qualified_name("k", bad).is_err(), "{bad}");
        }
        label_value("v", "").unwrap();
        label_value("v", "web.v1_x").unwrap();
        assert!(label_value("v", "web!").is_err());
    }
}
