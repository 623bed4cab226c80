use crate::InvalidField;

/// Names of nodes, locations and peers become store keys, interface suffixes and DNS-like
/// labels, so they follow RFC 1123 labels: lowercase letters, digits and '-', at most 63.
pub fn validate_name(field: &str, value: &str) -> Result<(), InvalidField> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > 63 {
        Some("must be at most 63 characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may contain only lowercase letters, digits and '-'")
    } else if value.starts_with('-') || value.ends_with('-') {
        Some("must start and end with a letter or digit")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidField::new(field, value, reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels_and_rejects_the_rest() {
        for ok in ["a", "a1", "site-a", "x".repeat(63).as_str()] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a/b", "x".repeat(64).as_str()] {
            let err = validate_name("name", bad).unwrap_err();
            assert_eq!(err.field, "name");
            assert_eq!(err.value, bad);
        }
    }
}
