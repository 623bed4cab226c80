//! The `nft` binary as an independent reader of what the kernel has, and `ping` between
//! namespaces.

use std::process::Command;

use serde_json::Value;

pub use crate::netns::Routed;

/// Runs `nft ARGS...` inside the namespace, panics unless it succeeds,
/// returns its stdout.
pub fn nft(netns_name: &str, args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", netns_name, "nft"])
        .args(args)
        .output()
        .expect("running nft");
    assert!(
        output.status.success(),
        "nft {} in {netns_name} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `nft -j list ruleset` in the namespace: the objects of its `nftables` array.
pub fn ruleset_json(netns_name: &str) -> Vec<Value> {
    let text = nft(netns_name, &["-j", "list", "ruleset"]);
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("nft printed bad JSON ({err}): {text}"));
    json["nftables"]
        .as_array()
        .unwrap_or_else(|| panic!("no nftables array in {text}"))
        .clone()
}

/// The objects of one kind ("table", "chain", "rule") in a ruleset.
pub fn objects<'a>(ruleset: &'a [Value], kind: &str) -> Vec<&'a Value> {
    ruleset
        .iter()
        .filter_map(|object| object.get(kind))
        .collect()
}

/// The chain object named `chain` of `family table`.
pub fn chain<'a>(ruleset: &'a [Value], family: &str, table: &str, chain: &str) -> &'a Value {
    objects(ruleset, "chain")
        .into_iter()
        .find(|c| c["family"] == family && c["table"] == table && c["name"] == chain)
        .unwrap_or_else(|| panic!("no chain {family} {table}/{chain} in {ruleset:#?}"))
}

/// The rule objects of one chain, in order.
pub fn rules<'a>(ruleset: &'a [Value], family: &str, table: &str, chain: &str) -> Vec<&'a Value> {
    objects(ruleset, "rule")
        .into_iter()
        .filter(|r| r["family"] == family && r["table"] == table && r["chain"] == chain)
        .collect()
}

/// The kernel's expressions of each rule of a chain, as
/// `nft --debug=netlink list chain` prints them (`[ meta load iifname =>
/// reg 1 ]`, ..., `userdata = { ... }`): nft's reading of the bytecode.
pub fn bytecode(netns_name: &str, family: &str, table: &str, chain: &str) -> Vec<Vec<String>> {
    let text = nft(
        netns_name,
        &["--debug=netlink", "list", "chain", family, table, chain],
    );
    let header = format!("{family} {table} {chain} ");
    let mut rules: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with(&header) {
            rules.push(Vec::new());
        } else if let Some(rule) = rules.last_mut() {
            let line = line.trim();
            if line.starts_with('[') || line.starts_with("userdata") {
                rule.push(line.to_owned());
            } else if line.is_empty() || line.starts_with("table") {
                // The human-readable listing follows the debug output.
                continue;
            }
        }
    }
    rules
}

/// Sends `count` pings from `from` to `to` (every `interval` seconds, each
/// waited for at most a second) and returns how many were answered.
pub fn ping(from: &str, to: &str, count: u32, interval: &str) -> u32 {
    let output = Command::new("ip")
        .args([
            "netns", "exec", from, "ping", "-q", "-n", "-W", "1", "-i", interval,
        ])
        .args(["-c", &count.to_string(), to])
        .output()
        .expect("running ping");
    let text = String::from_utf8_lossy(&output.stdout);
    // "200 packets transmitted, 97 received, 51.5% packet loss, time 1234ms"
    text.lines()
        .find(|line| line.contains("packets transmitted"))
        .and_then(|line| line.split(", ").nth(1))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ping output: {text}"))
}

/// Whether one ping gets through (three tries, for the first ARP exchange).
pub fn ping_works(from: &str, to: &str) -> bool {
    (0..3).any(|_| ping(from, to, 1, "1") == 1)
}

/// Whether a single ping gets through (no retry: for "must fail" checks).
pub fn ping_once(from: &str, to: &str) -> bool {
    ping(from, to, 1, "1") == 1
}
