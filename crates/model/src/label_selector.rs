//! `metav1.LabelSelector`: `matchLabels` and `matchExpressions`, ANDed, as NetworkPolicy
//! (and Deployments, and `kubectl -l`) use them. An empty selector selects everything; an
//! absent one is the caller's to interpret.

use crate::meta::nullable;
use crate::{InvalidField, dns};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// kubectl's selector syntax: `app=web,tier in (a,b),!legacy`; empty for the empty
/// selector (which selects everything).
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = (self.match_labels.iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

impl LabelSelector {
    /// Whether `labels` satisfy every label and every expression.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// The API server's checks (`ValidateLabelSelector`), with `field` as the path.
    pub fn validate(&self, field: &str) -> Result<(), InvalidField> {
        dns::labels(&format!("{field}.matchLabels"), &self.match_labels)?;
        for (i, r) in self.match_expressions.iter().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            dns::qualified_name(&format!("{at}.key"), &r.key)?;
            match (r.operator, r.values.is_empty()) {
                (Operator::In | Operator::NotIn, true) => {
                    return Err(InvalidField::new(
                        format!("{at}.values"),
                        "[]",
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    ));
                }
                (Operator::Exists | Operator::DoesNotExist, false) => {
                    return Err(InvalidField::new(
                        format!("{at}.values"),
                        r.values.join(","),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    ));
                }
                _ => {}
            }
            for (j, v) in r.values.iter().enumerate() {
                dns::label_value(&format!("{at}.values[{j}]"), v)?;
            }
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_and_expressions_are_anded_and_empty_selects_all() {
        let s: LabelSelector = serde_json::from_str(
            r#"{"matchLabels": {"app": "web"}, "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "edge"]},
                {"key": "canary", "operator": "DoesNotExist"}]}"#,
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "edge")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert!(!s.matches(&labels(&[("app", "web")])), "In needs the key");
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("canary", "")
        ])));
        assert!(LabelSelector::default().matches(&labels(&[])));
        let not_in = Requirement {
            key: "env".into(),
            operator: Operator::NotIn,
            values: vec!["prod".into()],
        };
        assert!(not_in.matches(&labels(&[])), "NotIn holds without the key");
        assert!(!not_in.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn bad_selectors_are_named() {
        let bad: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}"#,
        )
        .unwrap();
        let e = bad.validate("spec.podSelector").unwrap_err();
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
        let empty_in: LabelSelector =
            serde_json::from_str(r#"{"matchExpressions": [{"key": "a", "operator": "In"}]}"#)
                .unwrap();
        assert!(empty_in.validate("s").is_err());
        let bad_value: LabelSelector =
            serde_json::from_str(r#"{"matchLabels": {"app": "no spaces"}}"#).unwrap();
        assert!(bad_value.validate("s").is_err());
        assert!(
            serde_json::from_str::<LabelSelector>(
                r#"{"matchExpressions": [{"key": "a", "operator": "Near"}]}"#
            )
            .is_err()
        );
    }
}
