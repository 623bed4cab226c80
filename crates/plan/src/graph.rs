//! The topology as a GraphViz graph: locations as clusters, gateways drawn bold, tunnels
//! as solid edges, "served by" relations as dashed arrows.

use crate::Topology;
use std::fmt::Write;

pub fn dot(topology: &Topology) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph trellis {{");
    let _ = writeln!(
        out,
        "  label=\"granularity {}\"; labelloc=t; node [shape=box, fontname=monospace];",
        topology.settings.granularity
    );
    let mut locations: Vec<&str> = topology.gateways.keys().map(String::as_str).collect();
    locations.dedup();
    for (i, location) in locations.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_{i} {{");
        let _ = writeln!(out, "    label=\"{location}\";");
        for node in topology.nodes.values().filter(|n| n.location == *location) {
            let pods: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
            let style = if topology.is_gateway(node) {
                ", style=bold, color=blue"
            } else {
                ""
            };
            let public = node
                .endpoint
                .as_ref()
                .map(|e| format!("\\n{e}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    \"{name}\" [label=\"{name}\\n{overlay}\\n{pods}{public}\"{style}];",
                name = node.name,
                overlay = node.overlay_ip,
                pods = pods.join(" "),
            );
        }
        let _ = writeln!(out, "  }}");
    }
    for peer in topology.peers.values() {
        let ips: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  \"{name}\" [label=\"{name}\\n{ips}\", shape=ellipse];",
            name = peer.name,
            ips = ips.join(" ")
        );
    }
    let nodes: Vec<_> = topology.nodes.values().collect();
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            if topology.has_tunnel(a, b) {
                let _ = writeln!(out, "  \"{}\" -- \"{}\";", a.name, b.name);
            }
        }
        if topology.is_direct(a) {
            for peer in topology.peers.values() {
                let _ = writeln!(out, "  \"{}\" -- \"{}\" [color=gray];", a.name, peer.name);
            }
        }
    }
    for (node, gateway) in &topology.serving {
        let _ = writeln!(
            out,
            "  \"{node}\" -- \"{gateway}\" [style=dashed, dir=forward, label=\"via\"];"
        );
    }
    let _ = writeln!(out, "}}");
    out
}
