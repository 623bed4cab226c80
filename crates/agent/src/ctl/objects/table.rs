//! The tables `trellis get` prints, column for column as `kubectl get` prints them.

use super::records::{now_unix, parse_rfc3339};
use trellis_model::endpoint_slice::EndpointSlice;
use trellis_model::service::{Service, ServiceType};
use trellis_model::{Kind, Object};

/// How many endpoint addresses a row shows before "+ N more...", as kubectl.
const SHOWN_ENDPOINTS: usize = 3;

/// The table of `objects` (all of `kind`); the NAMESPACE column only across namespaces,
/// and `wide` adds the selector of Services.
pub fn table(objects: &[Object], kind: Kind, all_namespaces: bool, wide: bool) -> String {
    render(objects, kind, all_namespaces, wide, now_unix())
}

fn render(objects: &[Object], kind: Kind, all_namespaces: bool, wide: bool, now: u64) -> String {
    let mut header: Vec<&str> = match kind {
        Kind::Service => vec![
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ],
        Kind::EndpointSlice => vec!["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        Kind::NetworkPolicy => vec!["NAME", "POD-SELECTOR", "AGE"],
        Kind::Namespace => vec!["NAME", "LABELS", "AGE"],
    };
    if wide && kind == Kind::Service {
        header.push("SELECTOR");
    }
    let all_namespaces = all_namespaces && kind.is_namespaced();
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for object in objects {
        let age = age(object, now);
        let mut row = match object {
            Object::Service(s) => service_row(s, age, wide),
            Object::EndpointSlice(s) => slice_row(s, age),
            Object::NetworkPolicy(p) => vec![
                p.metadata.name.clone(),
                selector_text(&p.spec.pod_selector),
                age,
            ],
            Object::Namespace(n) => {
                let labels: Vec<String> = (n.metadata.labels.iter())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                vec![n.metadata.name.clone(), or_none(labels, "<none>"), age]
            }
        };
        if all_namespaces {
            row.insert(0, object.metadata().namespace.clone());
        }
        rows.push(row);
    }
    align(&rows)
}

/// Columns padded to their widest cell, three spaces apart, as kubectl's tab writer.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[c]));
            }
        }
        out.push('\n');
    }
    out
}

/// A label selector as kubectl prints it (`app=web,tier in (a,b),!canary`; empty: `<none>`).
fn selector_text(selector: &trellis_model::LabelSelector) -> String {
    let text = selector.to_string();
    if text.is_empty() {
        "<none>".into()
    } else {
        text
    }
}

fn or_none(items: Vec<String>, none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(",")
    }
}

fn service_row(s: &Service, age: String, wide: bool) -> Vec<String> {
    let spec = &s.spec;
    let cluster_ip = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| "<none>".into());
    let external = match spec.type_ {
        ServiceType::ExternalName => spec.external_name.clone().unwrap_or_default(),
        ServiceType::LoadBalancer => {
            let mut lb: Vec<String> = s
                .status
                .load_balancer
                .ingress
                .iter()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect();
            lb.extend(spec.external_ips.iter().cloned());
            or_none(lb, "<pending>")
        }
        ServiceType::ClusterIP | ServiceType::NodePort => {
            or_none(spec.external_ips.clone(), "<none>")
        }
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| match p.node_port() {
            Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
            None => format!("{}/{}", p.port, p.protocol),
        })
        .collect();
    let mut row = vec![
        s.metadata.name.clone(),
        spec.type_.to_string(),
        cluster_ip,
        external,
        or_none(ports, "<none>"),
        age,
    ];
    if wide {
        let selector = spec
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        row.push(or_none(selector, "<none>"));
    }
    row
}

fn slice_row(s: &EndpointSlice, age: String) -> Vec<String> {
    let ports = s
        .ports
        .iter()
        .map(|p| p.port.map_or("<unset>".to_string(), |n| n.to_string()))
        .collect();
    let addresses: Vec<&String> = s.endpoints.iter().flat_map(|e| &e.addresses).collect();
    let mut endpoints = addresses
        .iter()
        .take(SHOWN_ENDPOINTS)
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(",");
    if addresses.len() > SHOWN_ENDPOINTS {
        endpoints += &format!(" + {} more...", addresses.len() - SHOWN_ENDPOINTS);
    }
    if endpoints.is_empty() {
        endpoints = "<unset>".into();
    }
    vec![
        s.metadata.name.clone(),
        s.address_type.to_string(),
        or_none(ports, "<unset>"),
        endpoints,
        age,
    ]
}

/// An object's age as kubectl prints it (`45s`, `3m12s`, `5h`, `12d`).
fn age(object: &Object, now: u64) -> String {
    let Some(created) = object
        .metadata()
        .creation_timestamp
        .as_deref()
        .and_then(parse_rfc3339)
    else {
        return "<unknown>".into();
    };
    human(now.saturating_sub(created))
}

fn human(seconds: u64) -> String {
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86400);
    match () {
        _ if seconds < 120 => format!("{seconds}s"),
        _ if m < 10 && !seconds.is_multiple_of(60) => format!("{m}m{}s", seconds % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && !m.is_multiple_of(60) => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 && !h.is_multiple_of(24) => format!("{d}d{}h", h % 24),
        _ if d < 365 * 2 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::super::records::rfc3339;
    use super::*;
    use trellis_model::service::{LoadBalancerIngress, ServicePort};
    use trellis_model::{AddressType, Protocol, SliceEndpoint};

    #[test]
    fn services_print_as_kubectl_prints_them() {
        let mut web = Service::new("default", "web");
        web.metadata.creation_timestamp = Some(rfc3339(1_000_000));
        web.spec.cluster_ip = Some("10.96.0.10".into());
        web.spec.ports = vec![ServicePort::new("http", 80), ServicePort::new("dns", 53)];
        web.spec.ports[1].protocol = Protocol::Udp;
        web.spec.selector.insert("app".into(), "web".into());
        let mut lb = web.clone();
        lb.metadata.name = "edge".into();
        lb.metadata.namespace = "prod".into();
        lb.spec.type_ = ServiceType::LoadBalancer;
        lb.spec.ports[0].node_port = Some(30080);
        let text = render(
            &[
                Object::Service(Box::new(web.clone())),
                Object::Service(Box::new(lb.clone())),
            ],
            Kind::Service,
            true,
            true,
            1_000_000 + 200,
        );
        let expected = [
            "NAMESPACE   NAME   TYPE           CLUSTER-IP   EXTERNAL-IP   PORT(S)               AGE     SELECTOR",
            "default     web    ClusterIP      10.96.0.10   <none>        80/TCP,53/UDP         3m20s   app=web",
            "prod        edge   LoadBalancer   10.96.0.10   <pending>     80:30080/TCP,53/UDP   3m20s   app=web",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        lb.status.load_balancer.ingress = vec![LoadBalancerIngress {
            ip: Some("203.0.113.9".into()),
            ..Default::default()
        }];
        let text = render(
            &[Object::Service(Box::new(lb))],
            Kind::Service,
            false,
            false,
            1_000_000,
        );
        assert!(text.contains(" 203.0.113.9 "), "{text}");
        assert!(!text.contains("prod"), "no namespace column: {text}");
    }

    #[test]
    fn slices_show_three_addresses_then_a_count() {
        let mut s = EndpointSlice::new("default", "web-1", "web", AddressType::IPv4);
        s.endpoints = (1..=5)
            .map(|i| SliceEndpoint {
                addresses: vec![format!("10.244.0.{i}")],
                ..Default::default()
            })
            .collect();
        let text = render(
            &[Object::EndpointSlice(Box::new(s))],
            Kind::EndpointSlice,
            false,
            false,
            0,
        );
        assert!(
            text.contains("10.244.0.1,10.244.0.2,10.244.0.3 + 2 more..."),
            "{text}"
        );
        assert!(text.contains("<unknown>"), "no creation time: {text}");
    }

    #[test]
    fn ages_as_kubectl() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (200, "3m20s"),
            (600, "10m"),
            (4 * 3600 + 60, "4h1m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (40 * 86400, "40d"),
            (800 * 86400, "2y"),
        ] {
            assert_eq!(human(s), want, "{s}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
        }
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(parse_rfc3339("2024-03-01T12:00:00Z"), Some(1_709_294_400));
    }
}
